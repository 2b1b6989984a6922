"""The main job, end to end at toy size: dataset, partial labels, three runs, evaluation, export."""

import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    command = [sys.executable, "-m", "imcl_tf.demo", f"--output_dir={out}", "--num_train=60",
               "--num_val=20", "--num_test=20", "--train_steps=3"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "IMCL - continued" in result.stdout
    assert "mAP (classes with known +/-)" in result.stdout
    for run in ("logistic", "logistic_continued", "imcl"):
        assert (out / "runs" / run / "best.keras").exists()
    assert (out / "runs" / "imcl" / "eval" / "test" / "metrics.json").exists()
    versions = os.listdir(out / "export" / "fashion_scenes")
    assert versions == ["1"]
    assert (out / "export" / "fashion_scenes" / "1" / "saved_model.pb").exists()

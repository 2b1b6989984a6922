"""bench/refresh_quality.py: IMCL with the atoms' label states refreshed every n steps."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import refresh_quality  # noqa: E402


@pytest.mark.slow
def test_quick_run_trains_each_interval_from_the_stage_and_tabulates_against_n_1(tmp_path):
    out = tmp_path / "refresh"
    command = [sys.executable, os.path.join(ROOT, "bench", "refresh_quality.py"), "--quick",
               "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    stage = str(out / "runs" / "uniform_30_seed0" / "logistic")
    for every in refresh_quality.REFRESH_EVERY:
        row = results[f"imcl_refresh{every}|scores|0.3|0"]
        assert 0.0 <= row["test_mAP"] <= 1.0
        assert f"--label_state_refresh_every={every}" in row["command"]
        assert f"--warm_start={stage}" in row["command"] and "--method=imcl" in row["command"]
        config = json.loads((out / "runs" / "uniform_30_seed0" / f"extra_imcl_refresh{every}" /
                             "run_config.json").read_text())["config"]
        assert config["label_state_refresh_every"] == every
    assert {"imcl|scores|0.3|0", "logistic|scores|0.3|0"} <= set(results)
    table = refresh_quality.table(results, [0])
    lines = table.splitlines()
    assert lines[2].startswith("| 1 step(s) |") and "+0.00 ± 0.00" in lines[2]
    expected = 100 * (results["imcl_refresh10|scores|0.3|0"]["test_mAP"]
                      - results["imcl|scores|0.3|0"]["test_mAP"])
    assert f"{expected:+.2f}" in lines[3]
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)  # all reused
    assert again.returncode == 0 and "training" not in again.stdout, again.stdout[-2000:]

"""bench/label_statistics.py: pairwise-complete correlations against a NumPy loop, and the CLI."""

import os
import subprocess
import sys

import numpy as np
import pytest

from imcl_tf import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import label_statistics  # noqa: E402


def reference_correlation(rows):
    num_classes = rows.shape[1]
    out = np.full((num_classes, num_classes), np.nan)
    for l in range(num_classes):
        for j in range(num_classes):
            both = (rows[:, l] != 0) & (rows[:, j] != 0)
            x, y = (rows[both, l] > 0).astype(float), (rows[both, j] > 0).astype(float)
            if both.sum() >= 2 and x.std() > 0 and y.std() > 0:
                out[l, j] = np.corrcoef(x, y)[0, 1]
    return out


def test_pairwise_correlation_matches_a_loop_on_partial_labels(rng):
    full = np.where(rng.random((300, 6)) < 0.35, 1.0, -1.0)
    full[:, 1] = np.where(rng.random(300) < 0.85, full[:, 0], -full[:, 0])
    full[:, 5] = -1.0  # constant: undefined correlations
    rows = full * (rng.random(full.shape) < 0.5)
    np.testing.assert_allclose(label_statistics.pairwise_correlation(rows),
                               reference_correlation(rows), rtol=1e-9, atol=1e-12)
    # With full labels it is numpy's correlation matrix.
    np.testing.assert_allclose(label_statistics.pairwise_correlation(full[:, :5]),
                               np.corrcoef((full[:, :5] > 0).T), rtol=1e-9, atol=1e-12)


def test_statistics_of_independent_and_correlated_labels(rng):
    independent = np.where(rng.random((4000, 5)) < 0.3, 1.0, -1.0)
    stats = label_statistics.statistics(independent)
    assert stats["mean_abs_correlation"] < 0.05 and stats["known_fraction"] == 1.0
    correlated = independent.copy()
    correlated[:, 1:] = correlated[:, :1]
    assert label_statistics.statistics(correlated)["mean_abs_correlation"] == pytest.approx(1.0)
    assert stats["positives_per_class_min"] == int((independent > 0).sum(0).min())


def test_command_line_reads_a_dataset_folder(tmp_path, rng):
    rows = np.where(rng.random((12, 3)) < 0.5, 1.0, -1.0) * (rng.random((12, 3)) < 0.8)
    with data.SplitWriter(str(tmp_path), "train", 2) as writer:
        for index, row in enumerate(rows):
            writer.write(data.make_example(f"x{index}", np.flatnonzero(row > 0).tolist(),
                                           np.flatnonzero(row < 0).tolist(), 3,
                                           embedding=np.zeros(2, np.float32)))
    data.save_dataset_info(str(tmp_path), data.DatasetInfo(
        class_names=["a", "b", "c"], splits={"train": writer.split_info}, mode="features",
        embedding_dim=2, labels={"source": "test"}))
    out = tmp_path / "stats.md"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "label_statistics.py"),
                           "--data_dir", str(tmp_path), "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    assert "| images | 12 |" in text
    expected = label_statistics.statistics(rows.astype(np.float32))["known_fraction"]
    assert f"| known fraction | {expected:.3f} |" in text
    missing = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "label_statistics.py"),
                              "--data_dir", str(tmp_path), "--split", "test"], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "label_statistics:" in missing.stderr
    assert "Traceback" not in missing.stderr

"""Tests of tfrecords_tools.inspect: the tables, the JSON summary and the exit status."""

import io
import json

import numpy as np

from imcl_tf import data
from tfrecords_tools import inspect

CLASS_NAMES = ["cat", "dog", "long class name"]


def write_dataset(out_dir, rows_by_split):
    """Features-mode dataset whose label rows are given ({split: [N, L] in {+1, -1, 0}})."""
    splits = {}
    for split, rows in rows_by_split.items():
        with data.SplitWriter(str(out_dir), split, 2) as writer:
            for i, row in enumerate(rows):
                writer.write(data.make_example(f"{split}-{i}", np.flatnonzero(row > 0),
                                               np.flatnonzero(row < 0), len(CLASS_NAMES),
                                               embedding=[float(i), 0.0]))
        splits[split] = writer.split_info
    data.save_dataset_info(str(out_dir), data.DatasetInfo(
        class_names=CLASS_NAMES, splits=splits, mode="features", embedding_dim=2,
        labels={"protocol": "uniform", "known_ratio": 0.5, "seed": 3}))


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    status = inspect.run(["inspect"] + argv, stdout=out, stderr=err)
    return status, out.getvalue(), err.getvalue()


def test_json_summary_matches_numpy_counts(tmp_path, rng):
    rows = {"train": rng.choice([1.0, -1.0, 0.0], size=[9, 3]),
            "test": rng.choice([1.0, -1.0], size=[4, 3])}
    rows["train"][0] = [-1.0, 0.0, 0.0]  # an image with no known positive
    write_dataset(tmp_path, rows)
    status, out, _ = run([str(tmp_path), "--json"])
    assert status == 0
    summary = json.loads(out)
    assert summary["ok"] and summary["num_classes"] == 3
    assert list(summary["splits"]) == ["train", "test"]  # train first
    for split, matrix in rows.items():
        s = summary["splits"][split]
        assert s["num_examples"] == len(matrix) and s["num_shards"] == 2
        assert s["known_positives"] == int((matrix > 0).sum())
        assert s["known_negatives"] == int((matrix < 0).sum())
        assert abs(s["known_ratio"] - float((matrix != 0).mean())) < 1e-9
        assert abs(s["label_cardinality"] - float((matrix > 0).sum(axis=1).mean())) < 1e-9
        assert s["images_without_positive"] == int(((matrix > 0).sum(axis=1) == 0).sum())
        for c in summary["classes"]:
            assert c["positives"][split] == int((matrix[:, c["index"]] > 0).sum())
            assert c["negatives"][split] == int((matrix[:, c["index"]] < 0).sum())
    assert summary["labels"] == {"protocol": "uniform", "known_ratio": 0.5, "seed": 3}


def test_tables_show_splits_and_classes(tmp_path):
    rows = np.array([[1.0, -1.0, 0.0], [1.0, 1.0, -1.0], [-1.0, 0.0, 1.0]])
    write_dataset(tmp_path, {"train": rows})
    status, out, _ = run([str(tmp_path)])
    assert status == 0
    assert "all shards parse: OK" in out
    lines = out.splitlines()
    train = next(line for line in lines if line.startswith("train"))
    # images, shards, known ratio, positives per image, images without positive, pos, neg
    assert train.split()[1:8] == ["3", "2", "0.778", "1.333", "0", "4", "3"]
    dog = next(line for line in lines if " dog " in line)
    assert dog.split()[-2:] == ["1", "1"]
    assert "long class name" in out

    status, out, _ = run([str(tmp_path), "--max_classes=1"])
    assert "... 2 more classes" in out and " dog " not in out


def test_a_bad_dataset_exits_non_zero_with_the_reason(tmp_path):
    write_dataset(tmp_path, {"train": np.ones([4, 3])})
    shard = tmp_path / "train-00000-of-00002.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-10])
    status, out, err = run([str(tmp_path)])
    assert status == 1
    assert "train-00000-of-00002.tfrecord" in err and "truncated" in err
    status, out, err = run([str(tmp_path), "--json"])
    assert status == 1 and json.loads(out)["ok"] is False


def test_usage_errors(tmp_path):
    assert run([])[0] == 2
    status, _, err = run([str(tmp_path / "missing")])
    assert status == 1 and "dataset.json not found" in err

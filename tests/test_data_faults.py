"""Hostile dataset folders and interrupted writes (issue 13): confined shard names, malformed
dataset.json lists, decompression bombs in shards, all-or-nothing rebuilds, stale temporaries.

Every fixture is a tiny dataset written by the test itself; bombs are built from bytes
(tests/image_bombs.py), never decoded.
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from imcl_tf import data
from image_bombs import png_bomb

NUM_CLASSES = 3


def write_dataset(out_dir, rng, num_examples=6, num_shards=2, split="train", image=None):
    with data.SplitWriter(str(out_dir), split, num_shards) as writer:
        for i in range(num_examples):
            encoded = image if image is not None and i == num_examples - 1 else \
                tf.io.encode_png(rng.integers(0, 256, [8, 8, 3], dtype=np.uint8)).numpy()
            writer.write(data.make_example(f"img-{i}", [i % NUM_CLASSES], [], NUM_CLASSES,
                                           encoded_image=encoded))
    info = data.DatasetInfo(class_names=[f"c{i}" for i in range(NUM_CLASSES)],
                            splits={split: writer.split_info}, image_size=8)
    data.save_dataset_info(str(out_dir), info)
    return info


def edit_dataset_json(out_dir, edit):
    path = os.path.join(str(out_dir), data.DATASET_JSON)
    with open(path) as f:
        obj = json.load(f)
    edit(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


# ---- dataset.json: shard names confined to the folder, empty lists ------------------------------


@pytest.mark.parametrize("bad_name", ["../outside.tfrecord", "/abs/outside.tfrecord",
                                      "sub/train.tfrecord", "..", ""])
def test_shard_names_outside_the_folder_are_refused_and_nothing_is_touched(tmp_path, rng,
                                                                          bad_name):
    out = tmp_path / "data"
    write_dataset(out, rng)
    victim = tmp_path / "outside.tfrecord"  # what "../outside.tfrecord" points at
    victim.write_bytes(b"precious")

    def edit(obj):
        obj["splits"]["train"]["shards"][0] = bad_name
    edit_dataset_json(out, edit)
    for action in (lambda: data.load_dataset_info(str(out)),
                   lambda: data.verify_dataset(str(out)),
                   lambda: data.make_dataset(str(out), "train", batch_size=2)):
        with pytest.raises(data.DataError) as caught:
            action()
        assert "not a plain file name" in str(caught.value)
        assert repr(bad_name) in str(caught.value) and "split 'train'" in str(caught.value)
    # A rewriting tool neither trusts nor deletes what an untrustworthy old file lists.
    data.replace_dataset_info(str(out), data.DatasetInfo(
        class_names=["c0", "c1", "c2"], splits={"train": data.SplitInfo(
            shards=["train-00000-of-00002.tfrecord"], num_examples=3)}))
    assert victim.read_bytes() == b"precious"


@pytest.mark.parametrize("edit, message", [
    (lambda obj: obj["splits"]["train"].update(shards=[]), "split 'train' lists no shards"),
    (lambda obj: obj.update(splits=[]), '"splits" must be a non-empty object'),
    (lambda obj: obj.update(splits={}), '"splits" must be a non-empty object'),
    (lambda obj: obj["splits"]["train"].update(shards="train.tfrecord"), "lists no shards"),
    (lambda obj: obj["splits"]["train"].update(num_examples="6"), "num_examples must be"),
    (lambda obj: obj["splits"]["train"].update(shard_sizes=[1]), "shard_sizes"),
    (lambda obj: obj["splits"].update(train=[1, 2]), "malformed dataset description"),
])
def test_malformed_lists_in_dataset_json_are_clear_errors(tmp_path, rng, edit, message):
    out = tmp_path / "data"
    write_dataset(out, rng)
    edit_dataset_json(out, edit)
    with pytest.raises(data.DataError, match=message):
        data.load_dataset_info(str(out))

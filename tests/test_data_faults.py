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


# ---- a rebuild in place publishes all or nothing ------------------------------------------------

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Rebuilds the dataset with the labels of build `sys.argv[2]`; with a third argument N the process
# SIGKILLs itself at the N-th file rename (between the shard renames, or before dataset.json's).
REBUILD_SCRIPT = '''
import os, signal, sys
import numpy as np
import tensorflow as tf
from tfrecords_tools import common

out, build = sys.argv[1], int(sys.argv[2])
kill_at = int(sys.argv[3]) if len(sys.argv) > 3 else 0
if kill_at:
    rename, calls = tf.io.gfile.rename, [0]

    def dying_rename(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(*args, **kwargs)
    tf.io.gfile.rename = dying_rename
rng = np.random.default_rng(0)
records = [common.Record(f"img-{i}", [(i + build) % 3], [], source=f"row {i}",
                         image_bytes=tf.io.encode_png(
                             rng.integers(0, 256, [8, 8, 3], dtype=np.uint8)).numpy())
           for i in range(12)]
common.convert_split(records, output_dir=out, class_names=["a", "b", "c"], converter="test",
                     num_shards=4, shuffle=False, num_workers=1, stream=open(os.devnull, "w"))
'''


def rebuild(tmp_path, out, build, kill_at=None):
    import subprocess
    import sys
    script = tmp_path / "rebuild.py"
    script.write_text(REBUILD_SCRIPT)
    command = [sys.executable, str(script), str(out), str(build)] + (
        [str(kill_at)] if kill_at else [])
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                                 "PYTHONPATH": REPO_ROOT})
    return result


def train_labels(out):
    """The single positive class of img-0 .. img-11."""
    _, labels, ids = data.load_split_arrays(str(out), "train", image_size=8, string_ids=True)
    by_id = {image_id.decode(): int(np.argmax(row)) for image_id, row in zip(ids, labels)}
    return np.array([by_id[f"img-{i}"] for i in range(12)])


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [3])  # between the shard renames (of 4, then dataset.json)
def test_a_rebuild_killed_in_place_leaves_the_old_dataset_and_the_next_run_cleans_up(
        tmp_path, kill_at):
    import signal
    out = tmp_path / "data"
    first = rebuild(tmp_path, out, build=0)
    assert first.returncode == 0, first.stderr[-2000:]
    old_files = sorted(os.listdir(out))
    old_labels = train_labels(out)
    np.testing.assert_array_equal(old_labels, np.arange(12) % 3)

    killed = rebuild(tmp_path, out, build=1, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = sorted(set(os.listdir(out)) - set(old_files))
    assert leftovers  # new shards (renamed or still temporary) the kill left behind
    # The published dataset is the old one, whole: it verifies and has the old labels.
    report = data.verify_dataset(str(out))
    assert report.splits["train"].num_examples == 12
    np.testing.assert_array_equal(train_labels(out), old_labels)
    assert sorted(data.load_dataset_info(str(out)).splits["train"].shards) == sorted(
        name for name in old_files if name.endswith(".tfrecord"))

    again = rebuild(tmp_path, out, build=1)
    assert again.returncode == 0, again.stderr[-2000:]
    np.testing.assert_array_equal(train_labels(out), (np.arange(12) + 1) % 3)
    info = data.load_dataset_info(str(out))
    assert sorted(os.listdir(out)) == sorted(["dataset.json"] + info.splits["train"].shards)
    assert not set(info.splits["train"].shards) & set(old_files)  # a fresh generation
    data.verify_dataset(str(out))


def test_stale_temporaries_are_removed_on_the_next_write(tmp_path, rng):
    out = tmp_path / "data"
    out.mkdir()
    dead_pid = 2 ** 22 + 12345  # above the default pid_max of 4194304: never a live process
    stale = [f".train-00000-of-00002.tfrecord.tmp-{dead_pid}", f"dataset.json.tmp-{dead_pid}"]
    live = f".val-00000-of-00001.tfrecord.tmp-{os.getpid()}"  # a writer still running
    for name in stale + [live]:
        (out / name).write_bytes(b"half written")
    write_dataset(out, rng)
    names = set(os.listdir(out))
    assert not names & set(stale)
    assert live in names


def test_a_rebuild_with_the_same_shard_count_never_overwrites_published_shards(tmp_path, rng):
    out = tmp_path / "data"
    first = write_dataset(out, rng)
    old = first.splits["train"].shards
    with data.SplitWriter(str(out), "train", 2) as writer:
        writer.write(data.make_example("x", [0], [], NUM_CLASSES, encoded_image=b"\x89PNG"))
    assert writer.split_info.shards == data.shard_names("train", 2, generation=1)
    assert all(os.path.exists(out / name) for name in old)  # untouched until published
    data.replace_dataset_info(str(out), data.DatasetInfo(
        class_names=first.class_names, splits={"train": writer.split_info}, image_size=8))
    assert sorted(os.listdir(out)) == sorted(["dataset.json"] + writer.split_info.shards)


# ---- decompression bombs and non-images in shards -----------------------------------------------


def test_a_bomb_in_a_shard_fails_in_the_pipeline_naming_the_record_before_decoding(tmp_path, rng):
    out = tmp_path / "data"
    write_dataset(out, rng, image=png_bomb(20000, 20000))  # img-5 is the bomb
    for training in (False, True):
        dataset = data.make_dataset(str(out), "train", batch_size=6, training=training,
                                    augment=training, seed=0)
        with pytest.raises(tf.errors.InvalidArgumentError) as caught:
            next(iter(dataset))
        message = caught.value.message
        assert "image img-5" in message and "20000 x 20000" in message
        assert "--max_image_pixels=50000000" in message
    # A higher limit is the documented way out (here a smaller bomb, to stay cheap).
    small = tmp_path / "small"
    write_dataset(small, rng, image=png_bomb(300, 300))
    with pytest.raises(tf.errors.InvalidArgumentError, match="300 x 300"):
        next(iter(data.make_dataset(str(small), "train", batch_size=6, max_image_pixels=50_000)))
    images, _, _ = next(iter(data.make_dataset(str(small), "train", batch_size=6,
                                               max_image_pixels=90_000)))
    assert images.shape == (6, 8, 8, 3)


@pytest.mark.parametrize("image, message", [
    (png_bomb(20000, 20000), r"record 2 \(id 'img-5'\): image of 20000 x 20000 pixels "
                             r"\(400,000,000 pixels\) is over the limit.*--max_image_pixels"),
    (b"just some bytes, no image", r"record 2 \(id 'img-5'\).*not a PNG, JPEG, GIF or BMP"),
])
def test_verification_reads_every_header_and_names_file_and_record(tmp_path, rng, image,
                                                                   message):
    out = tmp_path / "data"
    info = write_dataset(out, rng, image=image)  # img-5: the last record of shard 1 of 2
    data.verify_dataset(str(out))  # without the header check the bytes pass
    shard = info.splits["train"].shards[1]
    with pytest.raises(data.DataError, match=shard + ": " + message):
        data.verify_dataset(str(out), max_image_pixels=50_000_000)


def test_training_refuses_a_bomb_before_it_starts(tmp_path, rng):
    from imcl_tf.training.config import TrainConfig
    from imcl_tf.training.trainer import _Trainer
    out = tmp_path / "data"
    info = write_dataset(out, rng, image=png_bomb(20000, 20000))
    config = TrainConfig(data_dir=str(out), model_dir=str(tmp_path / "run"), method="logistic",
                         val_split="", train_steps=2, batch_size=2, verbose=0)
    config.validate()
    trainer = _Trainer(config)
    with pytest.raises(data.DataError, match=info.splits["train"].shards[1] +
                       r": record 2 \(id 'img-5'\): image of 20000 x 20000"):
        trainer.setup()
    assert not os.path.exists(tmp_path / "run" / "checkpoints")

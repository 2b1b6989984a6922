"""Tests of the demo dataset builder (tfrecords_tools.fashion_scenes), on a few scenes."""

import json

import numpy as np
import pytest

from imcl_tf import data
from tfrecords_tools import fashion_scenes as fs

TINY = {"train": 10, "val": 4, "test": 6}


@pytest.fixture(scope="module")
def fashion():
    return {kind: fs.load_fashion_mnist(fs.DEFAULT_FASHION_MNIST_DIR, kind)
            for kind in ("train", "t10k")}


def test_vendored_files_load(fashion):
    images, labels = fashion["train"]
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,) and set(np.unique(labels)) == set(range(10))
    assert fashion["t10k"][0].shape == (10000, 28, 28)


def test_scene_classes_are_the_classes_of_the_items_drawn(fashion):
    rng = np.random.default_rng(5)
    for split, source in fs.SPLIT_SOURCES.items():
        images, labels = fashion[source.file]
        for scene in fs.compose_scenes(images, labels, source, 30, rng):
            assert scene.image.shape == (64, 64, 3) and scene.image.dtype == np.uint8
            assert 1 <= len(scene.item_indices) <= fs.MAX_ITEMS
            assert scene.classes == frozenset(int(labels[i]) for i in scene.item_indices)
            assert len(scene.classes) == len(scene.item_indices)  # one item per class
            assert all(source.start <= i < source.stop for i in scene.item_indices)


def test_split_sources_are_disjoint():
    ranges = [(s.file, s.start, s.stop) for s in fs.SPLIT_SOURCES.values()]
    for i, (file_a, start_a, stop_a) in enumerate(ranges):
        for file_b, start_b, stop_b in ranges[i + 1:]:
            assert file_a != file_b or stop_a <= start_b or stop_b <= start_a


def test_classes_co_occur_through_the_templates():
    rng = np.random.default_rng(0)
    draws = [fs.draw_classes(rng) for _ in range(3000)]
    assert all(1 <= len(d) <= fs.MAX_ITEMS and len(set(d)) == len(d) for d in draws)
    rows = np.zeros([len(draws), 10])
    for row, classes in zip(rows, draws):
        row[classes] = 1
    def lift(a, b):  # P(a, b) / (P(a) P(b)): 1 when independent
        return (rows[:, a] * rows[:, b]).mean() / (rows[:, a].mean() * rows[:, b].mean())

    # Sandal and bag share two outfits; dress and trouser share none.
    assert lift(fs.SANDAL, fs.BAG) > 1.5
    assert lift(fs.DRESS, fs.TROUSER) < 0.6


def test_build_writes_full_labels_that_match_the_composition(tmp_path, fashion):
    info = fs.build(str(tmp_path), num_examples=TINY, seed=7, num_shards=2)
    assert info.class_names == fs.CLASS_NAMES
    assert {s: i.num_examples for s, i in info.splits.items()} == TINY
    assert info.image_size == 64
    saved = json.loads((tmp_path / data.DATASET_JSON).read_text())
    assert saved["provenance"]["seed"] == 7
    assert "Zalando" in saved["provenance"]["source"]
    assert saved["labels"]["known_ratio"] == 1.0

    for index, split in enumerate(fs.SPLIT_ORDER):
        inputs, labels, ids = data.load_split_arrays(str(tmp_path), split, string_ids=True)
        source = fs.SPLIT_SOURCES[split]
        images, fashion_labels = fashion[source.file]
        scenes = list(fs.compose_scenes(images, fashion_labels, source, TINY[split],
                                        np.random.default_rng([7, index])))
        for x, y, image_id in zip(inputs, labels, ids):
            scene = scenes[int(image_id.decode().split("-")[1])]
            expected = -np.ones(10, np.float32)
            expected[sorted(scene.classes)] = 1.0
            np.testing.assert_array_equal(y, expected)  # full labels: no unknowns
            np.testing.assert_array_equal(x, scene.image.astype(np.float32))
    data.verify_dataset(str(tmp_path))


def test_build_is_deterministic_given_the_seed(tmp_path):
    def shards(seed, name):
        out = tmp_path / name
        fs.build(str(out), num_examples={"train": 6}, seed=seed, num_shards=2)
        return [p.read_bytes() for p in sorted(out.glob("*.tfrecord"))]

    first, again, other = shards(1, "a"), shards(1, "b"), shards(2, "c")
    assert first == again
    assert first != other


def test_command_line_flags(tmp_path):
    info = fs.run(["fashion_scenes", f"--output_dir={tmp_path}", "--num_train=3", "--num_val=0",
                   "--num_test=2", "--num_shards=1", "--seed=3", "--image_size=48"])
    assert sorted(info.splits) == ["test", "train"]
    assert info.image_size == 48
    inputs, _, _ = data.load_split_arrays(str(tmp_path), "test")
    assert inputs.shape == (2, 48, 48, 3)


def test_missing_fashion_mnist_dir_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="--fashion_mnist_dir"):
        fs.build(str(tmp_path / "out"), fashion_mnist_dir=str(tmp_path), num_examples={"train": 1})


def test_rebuilding_in_place_leaves_no_stale_shards(tmp_path):
    fs.build(str(tmp_path), num_examples={"train": 4, "val": 2}, num_shards=3)
    fs.build(str(tmp_path), num_examples={"train": 4}, num_shards=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        [data.DATASET_JSON] + data.shard_names("train", 2))
    assert data.verify_dataset(str(tmp_path)).splits["train"].num_examples == 4

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


# ---- the long-tailed item x tint x position label space and the reserved pretraining items -----


def test_label_space_names_and_index():
    names = fs.label_names("item_tint_position")
    assert len(names) == 80 == len(set(names))
    for item in range(10):
        for tint in range(len(fs.TINT_NAMES)):
            for position in range(len(fs.POSITION_NAMES)):
                assert names[fs.label_index(item, tint, position)] == (
                    f"{fs.CLASS_NAMES[item]} {fs.TINT_NAMES[tint]} "
                    f"{fs.POSITION_NAMES[position]}")
    assert fs.label_names("items") == fs.CLASS_NAMES
    with pytest.raises(ValueError, match="label_space must be one of"):
        fs.label_names("colours")


def test_longtail_scene_labels_name_the_items_drawn(fashion):
    images, labels = fashion["train"]
    scenes = list(fs.compose_scenes(images, labels, fs.RESERVED_TRAIN_SOURCE, 40,
                                    np.random.default_rng(2), label_space="item_tint_position"))
    per_tint = len(fs.POSITION_NAMES)
    per_item = len(fs.TINT_NAMES) * per_tint
    for scene in scenes:
        assert len(scene.labels) == len(scene.item_indices) == len(scene.classes)
        assert {label // per_item for label in scene.labels} == scene.classes
        assert scene.classes == frozenset(int(labels[i]) for i in scene.item_indices)
        assert all(i < fs.PRETRAIN_SOURCE.start for i in scene.item_indices)
    # Both halves and several tints occur.
    all_labels = [label for scene in scenes for label in scene.labels]
    assert {label % per_tint for label in all_labels} == {0, 1}
    assert len({(label // per_tint) % len(fs.TINT_NAMES) for label in all_labels}) >= 3


def test_longtail_position_is_the_half_holding_the_item_centre(fashion, monkeypatch):
    images, labels = fashion["train"]
    boxes_seen = []
    paste = fs._paste_item

    def recording_paste(canvas, item, rng, boxes, tint=None):
        paste(canvas, item, rng, boxes, tint=tint)
        boxes_seen.append(boxes[-1])

    monkeypatch.setattr(fs, "_paste_item", recording_paste)
    rng = np.random.default_rng(4)
    for scene in fs.compose_scenes(images, labels, fs.RESERVED_TRAIN_SOURCE, 20, rng,
                                   label_space="item_tint_position"):
        boxes, boxes_seen[:] = list(boxes_seen), []
        halves = sorted(int(left + side / 2 >= 32) for _, left, side in boxes)
        assert sorted(label % 2 for label in scene.labels) == halves


def test_longtail_draws_have_a_long_tail_and_shared_colour_schemes():
    rng = np.random.default_rng(0)
    draws = [fs.draw_longtail_classes(rng) for _ in range(4000)]
    tint_counts = np.bincount([t for _, tints in draws for t in tints], minlength=4)
    assert list(tint_counts) == sorted(tint_counts, reverse=True)  # red > green > blue > purple
    assert tint_counts[0] > 4 * tint_counts[3]
    same = [len(set(tints)) == 1 for classes, tints in draws if len(classes) >= 2]
    assert np.mean(same) > 0.4  # most multi-item scenes share one colour scheme
    rows = np.zeros([len(draws), 80])
    for row, (classes, tints) in zip(rows, draws):
        assert len(set(classes)) == len(classes) == len(tints)
        for c, t in zip(classes, tints):
            row[fs.label_index(c, t, 0)] = 1  # position not drawn here
    frequency = rows.sum(0).reshape(10, 4, 2)[:, :, 0].ravel()
    assert frequency.max() > 20 * max(frequency.min(), 1)


def test_reserved_items_are_used_by_no_split():
    sources = fs.split_sources(reserve_pretrain_items=True)
    reserved = fs.PRETRAIN_SOURCE
    for source in sources.values():
        assert source.file != reserved.file or source.stop <= reserved.start or (
            reserved.stop <= source.start)
    assert fs.split_sources() == fs.SPLIT_SOURCES


def test_build_longtail_writes_80_classes_matching_the_composition(tmp_path, fashion):
    sizes = {"train": 8, "test": 4}
    info = fs.build(str(tmp_path), num_examples=sizes, seed=5, num_shards=1,
                    label_space="item_tint_position", reserve_pretrain_items=True)
    assert info.class_names == fs.label_names("item_tint_position")
    assert info.provenance["unused_item_source"] == {"file": "train", "start": 40000,
                                                     "stop": 50000}
    assert info.provenance["item_sources"]["train"]["stop"] == 40000
    for split in sizes:
        index = fs.SPLIT_ORDER.index(split)
        source = fs.split_sources(True)[split]
        images, fashion_labels = fashion[source.file]
        scenes = list(fs.compose_scenes(images, fashion_labels, source, sizes[split],
                                        np.random.default_rng([5, index]),
                                        label_space="item_tint_position"))
        inputs, labels, ids = data.load_split_arrays(str(tmp_path), split, string_ids=True)
        for x, y, image_id in zip(inputs, labels, ids):
            scene = scenes[int(image_id.decode().split("-")[1])]
            expected = -np.ones(80, np.float32)
            expected[sorted(scene.labels)] = 1.0
            np.testing.assert_array_equal(y, expected)
            np.testing.assert_array_equal(x, scene.image.astype(np.float32))


def test_items_label_space_labels_are_the_classes(fashion):
    images, labels = fashion["t10k"]
    for scene in fs.compose_scenes(images, labels, fs.SPLIT_SOURCES["test"], 10,
                                   np.random.default_rng(3)):
        assert scene.labels == scene.classes


def test_command_line_label_space_flags(tmp_path):
    info = fs.run(["fashion_scenes", f"--output_dir={tmp_path}", "--num_train=2", "--num_val=0",
                   "--num_test=0", "--num_shards=1", "--label_space=item_tint_position",
                   "--reserve_pretrain_items"])
    assert info.num_classes == 80
    assert info.provenance["flags"]["reserve_pretrain_items"] is True

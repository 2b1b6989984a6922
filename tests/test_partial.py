"""Tests of partial-label simulation (tfrecords_tools.partial): known counts, protocols, seeds."""

import json
import math

import numpy as np
import pytest

from imcl_tf import data
from tfrecords_tools import partial

NUM_CLASSES = 6
SIZES = {"train": 40, "val": 12, "test": 10}


def write_full_dataset(out_dir, rng, sizes=SIZES, unknown_fraction=0.1, empty_rows=()):
    """Features-mode dataset (no image decoding needed) with mostly full labels.

    Returns {split: {id: (label row, embedding)}}.
    """
    expected, splits = {}, {}
    for split, count in sizes.items():
        expected[split] = {}
        with data.SplitWriter(str(out_dir), split, 3) as writer:
            for i in range(count):
                row = np.where(rng.random(NUM_CLASSES) < 0.4, 1.0, -1.0).astype(np.float32)
                row[rng.random(NUM_CLASSES) < unknown_fraction] = 0.0
                if i in empty_rows:
                    row[row > 0] = -1.0
                elif not (row > 0).any():
                    row[rng.integers(NUM_CLASSES)] = 1.0
                embedding = rng.normal(size=3).astype(np.float32)
                image_id = f"{split}-{i}"
                writer.write(data.make_example(image_id, np.flatnonzero(row > 0),
                                               np.flatnonzero(row < 0), NUM_CLASSES,
                                               embedding=embedding))
                expected[split][image_id] = (row, embedding)
        splits[split] = writer.split_info
    data.save_dataset_info(str(out_dir), data.DatasetInfo(
        class_names=[f"c{i}" for i in range(NUM_CLASSES)], splits=splits, mode="features",
        embedding_dim=3, labels={"source": "test fixture"}))
    return expected


def read_rows(data_dir, split):
    """{id: (label row, embedding)} of a written split."""
    inputs, labels, ids = data.load_split_arrays(str(data_dir), split, string_ids=True)
    return {i.decode(): (y, x) for x, y, i in zip(inputs, labels, ids)}


def flat_pairs(rows):
    """Flat (row, class) pairs of the positives and negatives of a [N, L] label matrix."""
    positive_rows, positive_classes = np.nonzero(rows > 0)
    negative_rows, negative_classes = np.nonzero(rows < 0)
    return positive_rows, positive_classes, negative_rows, negative_classes


def random_rows(rng, num_images, num_classes):
    return rng.choice([1.0, -1.0, 0.0], p=[0.3, 0.6, 0.1], size=[num_images, num_classes])


# ---- the masking rules against plain loops -------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 1.0])
def test_per_class_keeps_the_cub_quota_of_each_class(rng, ratio):
    rows = random_rows(rng, 50, 8)
    rows[:, 7] = -1.0  # a class with no positive at all
    pairs = flat_pairs(rows)
    keep_positive, keep_negative = partial.mask_labels(
        *pairs, 8, "per_class", ratio, np.random.default_rng(0))
    for keep, classes, sign in ((keep_positive, pairs[1], 1.0), (keep_negative, pairs[3], -1.0)):
        for c in range(8):
            n = int((rows[:, c] == sign).sum())
            expected = max(math.floor(ratio * n), 1) if n else 0
            assert int(keep[classes == c].sum()) == expected, (sign, c, n)


def test_per_class_is_reproducible_by_seed_and_varies_with_it(rng):
    pairs = flat_pairs(random_rows(rng, 60, 5))
    first = partial.mask_labels(*pairs, 5, "per_class", 0.3, np.random.default_rng(11))
    again = partial.mask_labels(*pairs, 5, "per_class", 0.3, np.random.default_rng(11))
    other = partial.mask_labels(*pairs, 5, "per_class", 0.3, np.random.default_rng(12))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_uniform_keeps_each_entry_with_probability_r(rng):
    pairs = flat_pairs(random_rows(rng, 2000, 10))
    keep_positive, keep_negative = partial.mask_labels(
        *pairs, 10, "uniform", 0.2, np.random.default_rng(1))
    kept = np.concatenate([keep_positive, keep_negative])
    sigma = math.sqrt(0.2 * 0.8 / len(kept))
    assert abs(kept.mean() - 0.2) < 5 * sigma
    all_kept = partial.mask_labels(*pairs, 10, "uniform", 1.0, np.random.default_rng(1))
    assert all_kept[0].all() and all_kept[1].all()


def test_single_positive_keeps_one_random_positive_per_image(rng):
    rows = random_rows(rng, 300, 6)
    rows[:5] = -1.0  # images without a positive
    pairs = flat_pairs(rows)
    keep_positive, keep_negative = partial.mask_labels(
        *pairs, 6, "single_positive", None, np.random.default_rng(2))
    assert not keep_negative.any()
    kept_per_image = np.bincount(pairs[0][keep_positive], minlength=300)
    has_positive = (rows > 0).any(axis=1)
    np.testing.assert_array_equal(kept_per_image, has_positive.astype(int))
    # Uniform among an image's positives: over many draws each of 3 positives wins about 1/3.
    three = np.zeros([1, 6])
    three[0, [1, 3, 4]] = 1.0
    pairs = flat_pairs(three)
    wins = np.zeros(6)
    draw_rng = np.random.default_rng(3)
    for _ in range(900):
        keep, _ = partial.mask_labels(*pairs, 6, "single_positive", None, draw_rng)
        wins[pairs[1][keep]] += 1
    assert wins[[0, 2, 5]].sum() == 0
    assert all(abs(w - 300) < 60 for w in wins[[1, 3, 4]])


# ---- whole datasets ------------------------------------------------------------------------------


def test_simulate_per_class_writes_a_traceable_masked_copy(tmp_path, rng):
    source = write_full_dataset(tmp_path / "full", rng)
    info = partial.simulate(str(tmp_path / "full"), str(tmp_path / "p25"), "per_class", 0.25,
                            seed=1)
    train = read_rows(tmp_path / "p25", "train")
    full = np.stack([source["train"][k][0] for k in sorted(source["train"])])
    masked = np.stack([train[k][0] for k in sorted(source["train"])])
    # Kept labels are labels of the input; nothing becomes known that was not.
    assert ((masked == 0) | (masked == full)).all()
    for c in range(NUM_CLASSES):
        for sign in (1.0, -1.0):
            n = int((full[:, c] == sign).sum())
            assert int((masked[:, c] == sign).sum()) == (max(math.floor(0.25 * n), 1) if n else 0)
    for k in source["train"]:  # the rest of each record is untouched
        np.testing.assert_array_equal(train[k][1], source["train"][k][1])
    for split in ("val", "test"):  # not masked: copied with full labels
        copied = read_rows(tmp_path / "p25", split)
        assert sorted(copied) == sorted(source[split])
        for k, (row, embedding) in source[split].items():
            np.testing.assert_array_equal(copied[k][0], row)
    labels = json.loads((tmp_path / "p25" / data.DATASET_JSON).read_text())["labels"]
    assert (labels["protocol"], labels["known_ratio"], labels["seed"]) == ("per_class", 0.25, 1)
    assert labels["masked_splits"] == ["train"]
    assert labels["source_labels"] == {"source": "test fixture"}
    assert labels["known"]["train"]["known_positives"] == int((masked > 0).sum())
    assert labels["known"]["train"]["known_negatives"] == int((masked < 0).sum())
    assert labels["known"]["train"]["classes_without_positive"] == int(
        ((masked > 0).sum(axis=0) == 0).sum())
    assert info.labels == labels
    data.verify_dataset(str(tmp_path / "p25"))


def test_simulate_is_reproducible_by_seed(tmp_path, rng):
    write_full_dataset(tmp_path / "full", rng, sizes={"train": 30})

    def masked(seed, name):
        partial.simulate(str(tmp_path / "full"), str(tmp_path / name), "uniform", 0.5, seed=seed)
        rows = read_rows(tmp_path / name, "train")
        return np.stack([rows[k][0] for k in sorted(rows)])

    first, again, other = masked(4, "a"), masked(4, "b"), masked(5, "c")
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_simulate_masks_every_named_split(tmp_path, rng):
    source = write_full_dataset(tmp_path / "full", rng, unknown_fraction=0.0)
    partial.run(["partial", f"--input_dir={tmp_path / 'full'}", f"--output_dir={tmp_path / 'sp'}",
                 "--protocol=single_positive", "--splits=train,val", "--seed=0"])
    for split in ("train", "val"):
        rows = read_rows(tmp_path / "sp", split)
        for k, (row, _) in rows.items():
            assert (row < 0).sum() == 0
            assert (row > 0).sum() == int((source[split][k][0] > 0).any())
            assert (row <= 0).all() or source[split][k][0][np.argmax(row)] == 1.0
    test_rows = read_rows(tmp_path / "sp", "test")
    for k, (row, _) in source["test"].items():
        np.testing.assert_array_equal(test_rows[k][0], row)


def test_single_positive_counts_images_without_positives(tmp_path, rng):
    write_full_dataset(tmp_path / "full", rng, sizes={"train": 20}, empty_rows=(0, 3, 7))
    info = partial.simulate(str(tmp_path / "full"), str(tmp_path / "sp"), "single_positive")
    known = info.labels["known"]["train"]
    assert known["images_without_positive"] == 3
    assert known["known_positives"] == 17 and known["known_negatives"] == 0
    assert data.load_split_arrays(str(tmp_path / "sp"), "train")[0].shape[0] == 20  # kept


def test_ratio_one_copies_labels_unchanged(tmp_path, rng):
    source = write_full_dataset(tmp_path / "full", rng, sizes={"train": 15})
    partial.simulate(str(tmp_path / "full"), str(tmp_path / "same"), "per_class", 1.0)
    rows = read_rows(tmp_path / "same", "train")
    for k, (row, _) in source["train"].items():
        np.testing.assert_array_equal(rows[k][0], row)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"protocol": "uniform", "known_ratio": 0.0}, ValueError, r"\(0, 1\]"),
    ({"protocol": "uniform", "known_ratio": 1.5}, ValueError, r"\(0, 1\]"),
    ({"protocol": "per_class"}, ValueError, "needs --known_ratio"),
    ({"protocol": "single_positive", "known_ratio": 0.5}, ValueError, "does not apply"),
    ({"protocol": "sometimes", "known_ratio": 0.5}, ValueError, "must be one of"),
    ({"protocol": "uniform", "known_ratio": 0.5, "splits": ["nope"]}, data.DataError,
     "does not have"),
])
def test_bad_options_are_rejected(tmp_path, rng, kwargs, error, message):
    write_full_dataset(tmp_path / "full", rng, sizes={"train": 3})
    with pytest.raises(error, match=message):
        partial.simulate(str(tmp_path / "full"), str(tmp_path / "out"), **kwargs)


def test_input_is_never_overwritten(tmp_path, rng):
    write_full_dataset(tmp_path / "full", rng, sizes={"train": 3})
    with pytest.raises(data.DataError, match="must differ"):
        partial.simulate(str(tmp_path / "full"), str(tmp_path / "full"), "uniform", 0.5)
    partial.simulate(str(tmp_path / "full"), str(tmp_path / "out"), "uniform", 0.5)
    with pytest.raises(data.DataError, match="--overwrite"):
        partial.simulate(str(tmp_path / "full"), str(tmp_path / "out"), "uniform", 0.5)
    partial.simulate(str(tmp_path / "full"), str(tmp_path / "out"), "uniform", 0.5,
                     overwrite=True)

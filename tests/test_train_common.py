"""Shared helpers of the training-application tests (tiny datasets, TensorBoard readers).

The other tests/test_train_*.py modules import these; the tests here check the helpers themselves.
"""

import glob
import os

import numpy as np
import tensorflow as tf

from imcl_tf import data

CLASS_NAMES = ["red", "green", "blue", "bright", "dark"]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scene(row, rng, image_size):
    """A 16x16-style image whose content follows its FULL label row (so training can learn).

    Class c in 0..2 paints a square of that colour channel in its own corner; class 3 brightens
    the background, class 4 darkens it; noise everywhere.
    """
    image = rng.integers(60, 120, [image_size, image_size, 3]).astype(np.float64)
    if row[3] > 0:
        image += 80
    if row[4] > 0:
        image -= 50
    half = image_size // 2
    corners = [(0, 0), (0, half), (half, 0)]
    for c, (top, left) in enumerate(corners):
        if row[c] > 0:
            image[top:top + half, left:left + half, c] = 250
    return np.clip(image, 0, 255).astype(np.uint8)


def write_dataset(data_dir, *, num_train=48, num_val=24, image_size=16, num_shards=4,
                  known_ratio=0.6, seed=0, splits=("train", "val")):
    """A tiny image dataset with partial training labels and fully labelled other splits."""
    rng = np.random.default_rng(seed)
    num_classes = len(CLASS_NAMES)
    split_infos = {}
    for split, count in (("train", num_train), ("val", num_val), ("test", num_val)):
        if split not in splits:
            continue
        full = np.where(rng.random([count, num_classes]) < 0.4, 1.0, -1.0)
        full[0, :] = 1.0  # every class has a positive and a negative in every split
        full[1, :] = -1.0
        labels = full.copy()
        if split == "train":
            labels[rng.random(labels.shape) > known_ratio] = 0.0
        with data.SplitWriter(data_dir, split, num_shards=num_shards) as writer:
            for index in range(count):
                png = tf.io.encode_png(scene(full[index], rng, image_size)).numpy()
                writer.write(data.make_example(
                    f"{split}-{index:04d}", np.flatnonzero(labels[index] > 0),
                    np.flatnonzero(labels[index] < 0), num_classes, png))
        split_infos[split] = writer.split_info
    data.save_dataset_info(data_dir, data.DatasetInfo(class_names=list(CLASS_NAMES),
                                                      splits=split_infos, image_size=image_size))
    return data_dir


def write_features_dataset(data_dir, *, num_train=32, dim=6, num_shards=2, seed=0,
                           known_ratio=1.0):
    """A tiny features-mode dataset (train split only); with known_ratio < 1 the other labels
    are unknown."""
    rng = np.random.default_rng(seed)
    num_classes = len(CLASS_NAMES)
    labels = np.where(rng.random([num_train, num_classes]) < 0.4, 1.0, -1.0)
    if known_ratio < 1.0:
        labels[rng.random(labels.shape) > known_ratio] = 0.0
    with data.SplitWriter(data_dir, "train", num_shards=num_shards) as writer:
        for index in range(num_train):
            writer.write(data.make_example(
                f"f-{index:04d}", np.flatnonzero(labels[index] > 0),
                np.flatnonzero(labels[index] < 0), num_classes,
                embedding=rng.normal(size=dim).astype(np.float32)))
    data.save_dataset_info(data_dir, data.DatasetInfo(
        class_names=list(CLASS_NAMES), splits={"train": writer.split_info}, mode="features",
        embedding_dim=dim))
    return data_dir


def read_events(log_dir):
    """{tag: [(step, value tensor as NumPy)]} of every event file under log_dir (recursively)."""
    events = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "events.out.tfevents.*"),
                                 recursive=True)):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.HasField("tensor"):
                    array = tf.make_ndarray(value.tensor)
                elif value.HasField("simple_value"):
                    array = np.asarray(value.simple_value)
                else:
                    array = None
                events.setdefault(value.tag, []).append((event.step, array))
    return events


def average_precision(scores, labels):
    """Non-interpolated AP of one class on its known entries (plain loop, sklearn's definition)."""
    known = labels != 0
    scores, positive = scores[known], labels[known] > 0
    if positive.sum() == 0 or (~positive).sum() == 0:
        return float("nan")
    total = 0.0
    for threshold in np.unique(scores[positive]):
        # precision at each distinct positive score, weighted by the recall step it brings
        selected = scores >= threshold
        precision = positive[selected].sum() / selected.sum()
        recall_step = (positive & (scores == threshold)).sum() / positive.sum()
        total += precision * recall_step
    return float(total)


def mean_ap(scores, labels):
    """Mean of the per-class APs over classes with a known positive and a known negative."""
    aps = [average_precision(scores[:, c], labels[:, c]) for c in range(labels.shape[1])]
    return float(np.nanmean(aps))


def test_written_dataset_reads_back(tmp_path):
    data_dir = write_dataset(str(tmp_path / "d"), num_train=12, num_val=6)
    inputs, labels, _ = data.load_split_arrays(data_dir, "val")
    assert inputs.shape == (6, 16, 16, 3)
    assert set(np.unique(labels)) == {-1.0, 1.0}  # val is fully labelled
    _, train_labels, _ = data.load_split_arrays(data_dir, "train")
    assert (train_labels == 0).any()  # train is partial
    features_dir = write_features_dataset(str(tmp_path / "f"), num_train=4)
    assert data.load_split_arrays(features_dir, "train")[0].shape == (4, 6)


def test_average_precision_reference_on_a_hand_example():
    # ranks: 0.9 (+), 0.8 (-), 0.7 (+), 0.1 (-): AP = (1/1 + 2/3) / 2; unknowns are ignored
    scores = np.array([0.9, 0.8, 0.7, 0.1, 0.95])
    labels = np.array([1, -1, 1, -1, 0])
    assert abs(average_precision(scores, labels) - (1 + 2 / 3) / 2) < 1e-12

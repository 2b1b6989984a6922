"""Reading parts of a split for training: all label rows, per-class counts, or given records."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from imcl_tf import data as data_lib
from imcl_tf.data.decoding import with_image_class


def read_split_labels(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Label rows [N, L] and id hashes [N] of a split, in shard order, without decoding images."""
    info = data_lib.load_dataset_info(data_dir)
    dataset = _records(data_dir, split, info).map(
        lambda parsed: (parsed["labels"], data_lib.id_hash(parsed["id"])))
    labels, ids = [], []
    for batch_labels, batch_ids in dataset.batch(4096):
        labels.append(batch_labels.numpy())
        ids.append(batch_ids.numpy())
    return np.concatenate(labels), np.concatenate(ids)


def count_split_labels(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Known positives [L] and known entries [L] per class of a split, and its record count.

    Streams the label rows (no [N, L] matrix is kept), so it suits splits of millions of images.
    """
    info = data_lib.load_dataset_info(data_dir)
    dataset = _records(data_dir, split, info).map(lambda parsed: parsed["labels"])
    positives = np.zeros(info.num_classes, np.int64)
    known = np.zeros(info.num_classes, np.int64)
    count = 0
    for batch in dataset.batch(4096):
        rows = batch.numpy()  # [b, L]
        positives += (rows > 0).sum(0)
        known += (rows != 0).sum(0)
        count += rows.shape[0]
    return positives, known, count


def read_split_subset(data_dir: str, split: str, indices: np.ndarray, image_size: int | None,
                      image_classes: int = 0, max_image_pixels: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, label rows and id hashes of the records at `indices` (shard order) of a split.

    image_classes > 0 extends the label rows by the image/class one-hot, as make_dataset does.
    """
    parts = list(zip(*iter_split_subset(data_dir, split, indices, image_size, image_classes,
                                        max_image_pixels)))
    return tuple(np.concatenate(part) for part in parts)


def iter_split_subset(data_dir: str, split: str, indices: np.ndarray, image_size: int | None,
                      image_classes: int = 0, max_image_pixels: int | None = None,
                      chunk_size: int = 256):
    """`read_split_subset` in chunks of `chunk_size` records: (inputs, labels, ids) arrays."""
    info = data_lib.load_dataset_info(data_dir)
    wanted = np.zeros(info.split(split).num_examples, bool)
    wanted[np.asarray(indices, np.int64)] = True
    wanted = tf.constant(wanted)
    dataset = _records(data_dir, split, info).enumerate().filter(
        lambda index, parsed: tf.gather(wanted, index))

    def prepare(index, parsed):
        if info.mode == "image":
            inputs = data_lib.decode_image(parsed["image"], image_size, parsed["id"],
                                           max_image_pixels)
        else:
            inputs = parsed["embedding"]
        labels = parsed["labels"]
        if image_classes:
            labels = with_image_class(labels, parsed["image_class"], image_classes, parsed["id"])
        return inputs, labels, data_lib.id_hash(parsed["id"])

    for batch in dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(chunk_size):
        yield tuple(values.numpy() for values in batch)


def _records(data_dir, split, info):
    split_info = info.split(split)
    paths = [os.path.join(data_dir, name) for name in split_info.shards]
    return tf.data.TFRecordDataset(paths).map(
        lambda record: data_lib.parse_example(record, info.num_classes, info.mode,
                                              info.embedding_dim))

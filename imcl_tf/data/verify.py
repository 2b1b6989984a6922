"""Verifying a dataset folder: dataset.json against its shards, record by record (verify_dataset)."""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import tensorflow as tf

from imcl_tf import image_header
from imcl_tf.data.dataset_info import DatasetInfo, SplitInfo, load_dataset_info
from imcl_tf.data.decoding import _decode_rgb, id_hash, parse_example
from imcl_tf.data.errors import DataError
from imcl_tf.data.schema import (DATASET_JSON, EMBEDDING_KEY, IMAGE_ENCODED_KEY, IMAGE_ID_KEY,
                                 NEGATIVE_KEY, POSITIVE_KEY)


@dataclasses.dataclass
class SplitStats:
    """What verify_dataset measured on one split (known labels counted per class)."""
    num_examples: int
    positives: np.ndarray  # int64 [L], images where the class is known PRESENT
    negatives: np.ndarray  # int64 [L], images where the class is known ABSENT
    images_without_positive: int  # images with no known positive label

    @property
    def known_ratio(self) -> float:
        """Fraction of the image-class entries that are known (positive or negative)."""
        entries = self.num_examples * len(self.positives)
        return float(self.positives.sum() + self.negatives.sum()) / entries if entries else 0.0

    @property
    def label_cardinality(self) -> float:
        """Mean number of known positives per image."""
        return float(self.positives.sum()) / self.num_examples if self.num_examples else 0.0


@dataclasses.dataclass
class DatasetReport:
    """verify_dataset's result: the description and per-split statistics."""
    info: DatasetInfo
    splits: dict[str, SplitStats]


def verify_dataset(data_dir: str, splits: Sequence[str] | None = None, *,
                   check_images: bool = False,
                   max_image_pixels: int | None = None) -> DatasetReport:
    """Checks dataset.json against its shards, record by record; returns per-split statistics.

    Checks: every listed shard exists and reads to its end (a truncated or corrupt shard is named);
    record counts equal dataset.json's (per shard when recorded, per split always); every record
    parses with the schema (id present, image bytes present or embedding of the stated length,
    class indices in [0, L), not repeated, not both positive and negative); ids are unique within a
    split. With `check_images` every image is also decoded (slower). With `max_image_pixels`
    every image's header is read (cheap: nothing is decoded): bytes that are not an image, and
    images with more pixels than the limit, are named before anything trains on them.

    Raises:
      DataError naming the file and the record index of the first problem found.
    """
    info = load_dataset_info(data_dir)
    names = list(info.splits) if splits is None else list(splits)
    report = DatasetReport(info=info, splits={})
    for split in names:
        report.splits[split] = _verify_split(data_dir, info, split, check_images,
                                             max_image_pixels)
    return report


def _verify_split(data_dir: str, info: DatasetInfo, split: str, check_images: bool,
                  max_image_pixels: int | None = None) -> SplitStats:
    split_info = info.split(split)
    num_classes = info.num_classes
    if info.mode == "features" and not info.embedding_dim:
        raise DataError(f"{data_dir}/{DATASET_JSON}: a features-mode dataset needs embedding_dim.")
    if split_info.shard_sizes and len(split_info.shard_sizes) != len(split_info.shards):
        raise DataError(f"{data_dir}/{DATASET_JSON}: split {split!r} lists "
                        f"{len(split_info.shards)} shards but {len(split_info.shard_sizes)} sizes.")
    paths = [os.path.join(data_dir, name) for name in split_info.shards]
    for path in paths:
        if not tf.io.gfile.exists(path):
            raise DataError(f"{path}: shard of split {split!r} listed in {DATASET_JSON} is "
                            "missing; the dataset is incomplete, rebuild it.")
    positives = np.zeros([num_classes], np.int64)
    negatives = np.zeros([num_classes], np.int64)
    images_without_positive = 0
    counts = np.zeros([len(paths)], np.int64)  # records read per shard
    hashes, where = [], []  # id hashes and (shard, record) of every record, for the duplicate check
    for shard_index, start, batch in _split_batches(paths, info, check_images,
                                                     max_image_pixels):
        size = len(batch["hash"])
        stats = _check_batch(paths[shard_index], start, batch, info, max_image_pixels)
        positives += stats[0]
        negatives += stats[1]
        images_without_positive += stats[2]
        hashes.append(batch["hash"])
        where.append(np.stack([np.full(size, shard_index), np.arange(start, start + size)], axis=1))
        counts[shard_index] += size
    if split_info.shard_sizes:
        for path, count, stated in zip(paths, counts, split_info.shard_sizes):
            if count != stated:
                raise DataError(f"{path}: holds {count} records but {DATASET_JSON} says {stated}; "
                                "the shard and its description disagree, rebuild the dataset.")
    total = int(counts.sum())
    if total != split_info.num_examples:
        raise DataError(f"split {split!r} of {data_dir}: the shards hold {total} records but "
                        f"{DATASET_JSON} says num_examples={split_info.num_examples}; rebuild the "
                        "dataset (or fix dataset.json if the shards are right).")
    if hashes:
        _check_unique_ids(data_dir, split_info, np.concatenate(hashes), np.concatenate(where))
    return SplitStats(num_examples=total, positives=positives, negatives=negatives,
                      images_without_positive=images_without_positive)


_VERIFY_BATCH = 1024


def _split_batches(paths: list[str], info: DatasetInfo, check_images: bool,
                   max_image_pixels: int | None = None):
    """Yields (shard index, index of the batch's first record in its shard, dict of NumPy arrays)
    for every batch of every shard, shards in order, records in file order.

    One tf.data pipeline reads all shards, so the parse function is traced once however many
    shards there are. Parse and decode run in the graph; when one fails, or a shard ends early or
    fails its CRC, the shards from the last good batch on are re-read record by record to name the
    file and record at fault.
    """
    mode = info.mode
    spec = {
        IMAGE_ID_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
        POSITIVE_KEY: tf.io.RaggedFeature(tf.int64),
        NEGATIVE_KEY: tf.io.RaggedFeature(tf.int64),
    }
    if mode == "image":
        spec[IMAGE_ENCODED_KEY] = tf.io.FixedLenFeature([], tf.string, default_value="")
    else:
        spec[EMBEDDING_KEY] = tf.io.RaggedFeature(tf.float32)

    def parse_batch(shard_index, batch_index, serialized):  # serialized: [B] records
        parsed = tf.io.parse_example(serialized, spec)
        out = {
            "hash": id_hash(parsed[IMAGE_ID_KEY]),
            "id": parsed[IMAGE_ID_KEY],
            "positive_values": parsed[POSITIVE_KEY].flat_values,
            "positive_lengths": parsed[POSITIVE_KEY].row_lengths(),
            "negative_values": parsed[NEGATIVE_KEY].flat_values,
            "negative_lengths": parsed[NEGATIVE_KEY].row_lengths(),
        }
        if mode == "image":
            out["encoded_length"] = tf.strings.length(parsed[IMAGE_ENCODED_KEY])
            if max_image_pixels is not None:  # header only; the limit is checked in _check_batch
                out["image_shape"] = tf.map_fn(
                    image_header.image_shape, parsed[IMAGE_ENCODED_KEY],
                    fn_output_signature=tf.TensorSpec([2], tf.int64))
            if check_images:
                out["decoded"] = tf.map_fn(
                    lambda args: tf.shape(_decode_rgb(args[0], args[1]))[0] > 0,
                    (parsed[IMAGE_ENCODED_KEY], parsed[IMAGE_ID_KEY]),
                    fn_output_signature=tf.bool)
        else:
            out["embedding_values"] = parsed[EMBEDDING_KEY].flat_values
            out["embedding_lengths"] = parsed[EMBEDDING_KEY].row_lengths()
        return shard_index, batch_index * _VERIFY_BATCH, out

    batches = tf.data.Dataset.from_tensor_slices(paths).enumerate().flat_map(
        lambda shard_index, path: tf.data.TFRecordDataset(path).batch(_VERIFY_BATCH).enumerate()
        .map(lambda batch_index, serialized: (shard_index, batch_index, serialized)))
    batches = batches.map(parse_batch, num_parallel_calls=tf.data.AUTOTUNE,
                          deterministic=True).prefetch(2)
    iterator = iter(batches)
    last_shard = 0
    while True:
        try:
            shard_index, start, batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.DataLossError as e:
            _raise_first_damaged_shard(paths[last_shard:], e)
            raise DataError(f"a shard of {paths} is unreadable ({_tf_message(e)}); rebuild the "
                            "dataset.") from e
        except tf.errors.InvalidArgumentError as e:
            for path in paths[last_shard:]:
                _raise_first_bad_record(path, info, check_images, max_image_pixels)
            raise DataError(f"a batch of records of {paths} failed to parse but no single record "
                            f"does ({_tf_message(e)}); the shards may be corrupt, rebuild them.") \
                from e
        last_shard = int(shard_index)
        yield last_shard, int(start), {key: value.numpy() for key, value in batch.items()}


def _raise_first_damaged_shard(paths: list[str], error: tf.errors.OpError) -> None:
    """DataError naming the first shard of `paths` that does not read to its end."""
    for path in paths:
        count = 0
        try:
            for _ in tf.data.TFRecordDataset(path):
                count += 1
        except tf.errors.DataLossError as e:
            raise DataError(f"{path}: the shard is truncated or corrupt after record {count - 1} "
                            f"({_tf_message(e)}); rebuild the dataset.") from error


def _check_batch(path: str, start: int, batch: dict[str, np.ndarray], info: DatasetInfo,
                 max_image_pixels: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Vectorised record checks of one batch; returns (positive counts [L], negative counts [L],
    images without a positive)."""
    num_classes = info.num_classes
    ids = batch["id"]

    def fail(row: int, what: str) -> None:
        image_id = ids[row].decode("utf-8", "replace")
        raise DataError(f"{path}: record {start + row} (id {image_id!r}): {what}")

    empty = np.flatnonzero(ids == b"")
    if len(empty):
        fail(int(empty[0]), "empty image/id; every record needs a unique id.")
    keys = {}
    for name in ("positive", "negative"):
        values, lengths = batch[f"{name}_values"], batch[f"{name}_lengths"]
        rows = np.repeat(np.arange(len(lengths)), lengths)  # record of each listed index
        bad = np.flatnonzero((values < 0) | (values >= num_classes))
        if len(bad):
            row = int(rows[bad[0]])
            fail(row, f"{name} class indices {values[rows == row].tolist()} are outside "
                      f"[0, {num_classes}); the dataset does not match its class list.")
        keys[name] = rows * num_classes + values
        unique, counts = np.unique(keys[name], return_counts=True)
        if (counts > 1).any():
            row = int(unique[counts > 1][0] // num_classes)
            fail(row, f"repeated {name} class indices {values[rows == row].tolist()}.")
    both = np.intersect1d(keys["positive"], keys["negative"])
    if len(both):
        row = int(both[0] // num_classes)
        fail(row, f"class {int(both[0] % num_classes)} is both positive and negative.")
    if info.mode == "image":
        missing = np.flatnonzero(batch["encoded_length"] == 0)
        if len(missing):
            fail(int(missing[0]), f"no {IMAGE_ENCODED_KEY} bytes in an image-mode dataset.")
        if max_image_pixels is not None and len(ids):
            height, width = batch["image_shape"][:, 0], batch["image_shape"][:, 1]
            over = np.flatnonzero(height * width > max_image_pixels)
            if len(over):
                row = int(over[0])
                flag = image_header.MAX_IMAGE_PIXELS_FLAG
                fail(row, f"image of {width[row]} x {height[row]} pixels "
                          f"({int(width[row]) * int(height[row]):,} pixels) is over the limit of "
                          f"{max_image_pixels:,} pixels ({flag}={max_image_pixels}); rebuild the "
                          f"dataset without it (converters refuse it), or raise {flag}.")
    else:
        lengths = batch["embedding_lengths"]
        wrong = np.flatnonzero(lengths != info.embedding_dim)
        if len(wrong):
            fail(int(wrong[0]), f"{EMBEDDING_KEY} has {int(lengths[wrong[0]])} values, "
                                f"dataset.json says embedding_dim={info.embedding_dim}.")
        finite = np.isfinite(batch["embedding_values"].reshape(len(lengths), -1)).all(axis=1) \
            if len(lengths) else np.zeros([0], bool)
        if not finite.all():
            fail(int(np.flatnonzero(~finite)[0]), f"{EMBEDDING_KEY} has NaN or inf values.")
    positive_counts = np.bincount(batch["positive_values"], minlength=num_classes)
    negative_counts = np.bincount(batch["negative_values"], minlength=num_classes)
    without_positive = int((batch["positive_lengths"] == 0).sum())
    return positive_counts, negative_counts, without_positive


def _check_unique_ids(data_dir: str, split_info: SplitInfo, hashes: np.ndarray,
                      where: np.ndarray) -> None:
    """DataError naming both records when two records of a split share an id."""
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    repeated = np.flatnonzero(sorted_hashes[1:] == sorted_hashes[:-1])
    if not len(repeated):
        return
    first, second = where[order[repeated[0]]], where[order[repeated[0] + 1]]
    image_id = _read_record_id(os.path.join(data_dir, split_info.shards[second[0]]), second[1])
    raise DataError(
        f"duplicate image id {image_id!r}: {split_info.shards[first[0]]} record {first[1]} and "
        f"{split_info.shards[second[0]]} record {second[1]}; ids must be unique within a split.")


def _read_record_id(path: str, index: int) -> str:
    record = next(iter(tf.data.TFRecordDataset(path).skip(int(index)).take(1)))
    example = tf.train.Example.FromString(record.numpy())
    return example.features.feature[IMAGE_ID_KEY].bytes_list.value[0].decode("utf-8", "replace")


def _raise_first_bad_record(path: str, info: DatasetInfo, check_images: bool,
                            max_image_pixels: int | None = None) -> None:
    """Re-reads a shard one record at a time; DataError at its first bad record, if any."""
    for index, record in enumerate(tf.data.TFRecordDataset(path)):
        try:
            parsed = parse_example(record, info.num_classes, info.mode, info.embedding_dim)
            if max_image_pixels is not None and info.mode == "image":
                image_header.read_image_size(parsed["image"].numpy(), "the image")
            if check_images and info.mode == "image":
                _decode_rgb(parsed["image"], parsed["id"])
        except tf.errors.InvalidArgumentError as e:
            raise DataError(f"{path}: record {index} ({_record_id_or_unknown(record)}) does not "
                            f"parse: {_tf_message(e)}") from e
        except image_header.ImageHeaderError as e:
            raise DataError(f"{path}: record {index} ({_record_id_or_unknown(record)}): {e} "
                            "Rebuild the dataset (converters refuse such images).") from e


def _record_id_or_unknown(record: tf.Tensor) -> str:
    try:
        example = tf.train.Example.FromString(record.numpy())
        values = example.features.feature[IMAGE_ID_KEY].bytes_list.value
        return f"id {values[0].decode('utf-8', 'replace')!r}" if values else "no id"
    except Exception:  # a record that is not an Example at all
        return "not a tf.train.Example"


def _tf_message(error: tf.errors.OpError) -> str:
    """The useful line of a TensorFlow error, without the function-node prefix."""
    message = error.message.split("\n")[0]
    if message.startswith("{{function_node"):
        message = message.split("}}", 1)[-1].strip()
    return message

"""The tf.data input pipelines of a split: make_dataset (batches) and load_split_arrays (NumPy)."""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from imcl_tf.data.dataset_info import DatasetInfo, SplitInfo, load_dataset_info
from imcl_tf.data.decoding import (_augmented_image, decode_image, id_hash, parse_example,
                                   with_image_class)
from imcl_tf.data.errors import DataError
from imcl_tf.data.schema import DATASET_JSON
from imcl_tf.image_header import DEFAULT_MAX_IMAGE_PIXELS


def make_dataset(data_dir: str,
                 split: str,
                 *,
                 batch_size: int,
                 image_size: int | None = None,
                 training: bool = False,
                 augment: bool = False,
                 shuffle_buffer: int = 1024,
                 seed: int | None = None,
                 repeat: bool = False,
                 drop_remainder: bool = False,
                 deterministic: bool = False,
                 max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                 input_context: tf.distribute.InputContext | None = None,
                 image_classes: int = 0) -> tf.data.Dataset:
    """The input pipeline of one split: batches of (inputs, labels, ids).

    Shards are read in parallel (interleaved); with `training` files and records are shuffled and,
    with `augment`, images get a random resized crop and flip. Elements:
      inputs: float32 [B, S, S, 3] in 0..255 (image mode) or float32 [B, D] (features mode);
      labels: float32 [B, L] in {+1, -1, 0} (present, absent, unknown);
      ids:    int64 [B], id_hash of image/id.
    Without `repeat` the cardinality is asserted from dataset.json, so Keras knows the steps per
    epoch and a dataset.json that disagrees with its shards fails loudly.

    Args:
      data_dir: dataset folder (dataset.json + shards).
      split: split name, e.g. "train".
      batch_size: GLOBAL batch size; with an `input_context` each input pipeline batches
        `input_context.get_per_replica_batch_size(batch_size)`.
      image_size: S; defaults to dataset.json's image_size hint (image mode only).
      training: shuffle files and records.
      augment: random resized crop + horizontal flip (needs `training`, image mode).
      shuffle_buffer: records in the shuffle buffer.
      seed: seeds file order, record order and augmentation; None draws a fresh seed.
      repeat: repeat forever (then the cardinality is infinite).
      drop_remainder: drop the last partial batch.
      deterministic: keep the element order a function of `seed` alone (slower; for tests and
        exact reproduction; seed None then means 0). Without it parallel reads may reorder
        elements.
      max_image_pixels: images with more pixels (width x height from the header) fail before
        they are decoded, naming the record (a decompression bomb in a shard); None: no limit.
      input_context: from `strategy.distribute_datasets_from_function`; with several input
        pipelines each reads a disjoint subset of the shard FILES (so there must be at least as
        many shards as pipelines).
      image_classes: C > 0 appends to every label row C always-known entries, +1 at the record's
        image/class and -1 elsewhere (`with_image_class`; the CUB class-label augmentation), so
        labels are [B, L + C]; 0 (default) leaves them [B, L].

    Example:
      ds = make_dataset("/data/demo", "train", batch_size=32, training=True, augment=True, seed=1)
      for images, labels, ids in ds.take(1): ...
    """
    info = load_dataset_info(data_dir)
    split_info = info.split(split)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1. Received: batch_size={batch_size}.")
    if augment and not training:
        raise ValueError("augment=True needs training=True (evaluation never augments).")
    if augment and info.mode != "image":
        raise ValueError(f"{data_dir} is a features-mode dataset; augment=True applies to images "
                         "only. Turn augmentation off for precomputed features.")
    image_size = _resolve_image_size(info, image_size, data_dir)
    if deterministic and seed is None:
        seed = 0  # a deterministic pipeline must not draw its seed from the OS

    files, num_examples = _pipeline_files(data_dir, split, split_info, input_context)
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    records = _read_records(files, training=training, seed=seed, deterministic=deterministic)
    records = records.apply(tf.data.experimental.assert_cardinality(num_examples))
    if training:
        records = records.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        records = records.repeat()

    num_classes, mode, embedding_dim = info.num_classes, info.mode, info.embedding_dim

    if augment:
        # One int64 per element drives its crop and flip: reproducible from `seed`, and new on
        # every epoch because the random stream continues across repetitions.
        randoms = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        elements = tf.data.Dataset.zip(records, randoms)

        def to_element(serialized, element_seed):
            parsed = parse_example(serialized, num_classes, mode, embedding_dim)
            image = _augmented_image(parsed["image"], image_size, parsed["id"], element_seed,
                                     max_image_pixels)
            labels = parsed["labels"]
            if image_classes:
                labels = with_image_class(labels, parsed["image_class"], image_classes,
                                          parsed["id"])
            return image, labels, id_hash(parsed["id"])
    else:
        elements = records

        def to_element(serialized):
            inputs, labels, image_id = _evaluation_element(serialized, num_classes, mode,
                                                           embedding_dim, image_size,
                                                           max_image_pixels, image_classes)
            return inputs, labels, id_hash(image_id)

    elements = elements.map(to_element, num_parallel_calls=tf.data.AUTOTUNE)
    elements = elements.batch(batch_size, drop_remainder=drop_remainder)
    elements = elements.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    if input_context is not None:
        # Already sharded by file above; tf.distribute must not shard again.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return elements.with_options(options)


def load_split_arrays(data_dir: str,
                      split: str,
                      image_size: int | None = None,
                      limit: int | None = None,
                      *,
                      string_ids: bool = False,
                      max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A small split in memory: (inputs, labels, ids) as NumPy arrays, in a fixed order.

    The order interleaves the shards record by record, which is the write order of a SplitWriter
    split of up to 16 shards.

    inputs float32 [N, S, S, 3] (image mode, evaluation view) or [N, D]; labels float32 [N, L];
    ids int64 [N] (id_hash, as in make_dataset) or, with `string_ids`, the id strings (object
    array). `limit` keeps the first `limit` records. Meant for the dictionary bank and evaluation
    of splits that fit in memory.
    """
    info = load_dataset_info(data_dir)
    split_info = info.split(split)
    image_size = _resolve_image_size(info, image_size, data_dir)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None. Received: limit={limit}.")
    files, num_examples = _pipeline_files(data_dir, split, split_info, None)
    records = _read_records(files, training=False, seed=None, deterministic=True)
    records = records.apply(tf.data.experimental.assert_cardinality(num_examples))
    if limit is not None:
        records = records.take(limit)
    num_classes, mode, embedding_dim = info.num_classes, info.mode, info.embedding_dim
    elements = records.map(
        lambda serialized: _evaluation_element(serialized, num_classes, mode, embedding_dim,
                                               image_size, max_image_pixels),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    inputs, labels, ids = [], [], []
    for batch_inputs, batch_labels, batch_ids in elements.batch(256).prefetch(2):
        inputs.append(batch_inputs.numpy())
        labels.append(batch_labels.numpy())
        ids.append(batch_ids.numpy())
    if mode == "image":
        empty_inputs = np.zeros([0, image_size, image_size, 3], np.float32)
    else:
        empty_inputs = np.zeros([0, embedding_dim], np.float32)
    inputs = np.concatenate(inputs) if inputs else empty_inputs
    labels = np.concatenate(labels) if labels else np.zeros([0, num_classes], np.float32)
    ids = np.concatenate(ids) if ids else np.zeros([0], object)
    if not string_ids:
        ids = id_hash(tf.constant(ids, tf.string)).numpy() if len(ids) else np.zeros([0], np.int64)
    return inputs, labels, ids


def _evaluation_element(serialized: tf.Tensor, num_classes: int, mode: str,
                        embedding_dim: int | None, image_size: int | None,
                        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
                        image_classes: int = 0) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """One record without augmentation: (inputs, labels [L] (+ C, see make_dataset), id string)."""
    parsed = parse_example(serialized, num_classes, mode, embedding_dim)
    if mode == "image":
        inputs = decode_image(parsed["image"], image_size, parsed["id"],
                              max_image_pixels)  # [S, S, 3]
    else:
        inputs = parsed["embedding"]  # [D]
    labels = parsed["labels"]
    if image_classes:
        labels = with_image_class(labels, parsed["image_class"], image_classes, parsed["id"])
    return inputs, labels, parsed["id"]


def _resolve_image_size(info: DatasetInfo, image_size: int | None, data_dir: str) -> int | None:
    if info.mode != "image":
        return None
    image_size = image_size if image_size is not None else info.image_size
    if image_size is None:
        raise DataError(f"{data_dir}/{DATASET_JSON} has no image_size hint; pass image_size "
                        "(e.g. --image_size=224).")
    if int(image_size) < 1:
        raise ValueError(f"image_size must be >= 1. Received: image_size={image_size}.")
    return int(image_size)


def _pipeline_files(data_dir: str, split: str, split_info: SplitInfo,
                    input_context: tf.distribute.InputContext | None) -> tuple[list[str], int]:
    """The shard paths this input pipeline reads and how many records they hold."""
    paths = [os.path.join(data_dir, name) for name in split_info.shards]
    sizes = _shard_sizes(split_info)
    missing = [p for p in paths if not tf.io.gfile.exists(p)]
    if missing:
        raise DataError(f"split {split!r}: {len(missing)} shard(s) listed in {DATASET_JSON} are "
                        f"missing, e.g. {missing[0]}; the dataset is incomplete, rebuild it.")
    if not paths:
        raise DataError(f"split {split!r} of {data_dir} has no shards.")
    if input_context is None or input_context.num_input_pipelines == 1:
        return paths, split_info.num_examples
    workers = input_context.num_input_pipelines
    if len(paths) < workers:
        raise DataError(f"split {split!r} has {len(paths)} shard files but there are {workers} "
                        "input pipelines; data is sharded by file, so rebuild the dataset with "
                        f"--num_shards >= {workers} (a multiple of it balances the load).")
    mine = range(input_context.input_pipeline_id, len(paths), workers)
    return [paths[i] for i in mine], sum(sizes[i] for i in mine)


def _shard_sizes(split_info: SplitInfo) -> list[int]:
    """Records per shard: as recorded, or else SplitWriter's round-robin layout."""
    if split_info.shard_sizes:
        return list(split_info.shard_sizes)
    count, num_shards = split_info.num_examples, len(split_info.shards)
    return [count // num_shards + (1 if i < count % num_shards else 0) for i in range(num_shards)]


_MAX_PARALLEL_SHARDS = 16  # open files at once; each keeps a read buffer


def _read_records(paths: list[str], *, training: bool, seed: int | None,
                  deterministic: bool) -> tf.data.Dataset:
    """Serialized records of `paths`, read by parallel interleave (files shuffled when training)."""
    files = tf.data.Dataset.from_tensor_slices(paths)
    if training:
        files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    return files.interleave(
        lambda path: tf.data.TFRecordDataset(path, buffer_size=1 << 20),
        cycle_length=min(len(paths), _MAX_PARALLEL_SHARDS), block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)

"""The TFRecord schema of imcl_tf (single source of truth), writing, reading and verifying datasets.

A dataset is a folder with `dataset.json` and sharded TFRecord files, one `tf.train.Example` per
image (architecture.md section 4). Every class index not listed as positive or negative is unknown;
in the pipeline a label row is a dense float vector in {+1, -1, 0} of length `num_classes`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from typing import Any, Iterable, Sequence

import numpy as np
import tensorflow as tf

# ---- TFRecord keys: the only place they are spelled out. ---------------------------------------
IMAGE_ENCODED_KEY = "image/encoded"  # bytes, JPEG or PNG (absent in features-only datasets)
IMAGE_ID_KEY = "image/id"  # bytes, unique per dataset
POSITIVE_KEY = "labels/positive"  # int64 list, class indices known PRESENT
NEGATIVE_KEY = "labels/negative"  # int64 list, class indices known ABSENT
EMBEDDING_KEY = "feature/embedding"  # float list, precomputed feature (features mode)
IMAGE_CLASS_KEY = "image/class"  # int64, optional single class (CUB species, for class-label augmentation)

DATASET_JSON = "dataset.json"
SCHEMA_VERSION = 1


class DataError(ValueError):
    """Bad input data: the message says what, where (file, record) and what to do."""


# ---- Examples ----------------------------------------------------------------------------------


def make_example(image_id: str | bytes,
                 positives: Sequence[int],
                 negatives: Sequence[int],
                 num_classes: int,
                 encoded_image: bytes | None = None,
                 embedding: Sequence[float] | np.ndarray | None = None,
                 image_class: int | None = None) -> tf.train.Example:
    """Builds one schema Example after checking its labels.

    Raises DataError when a class index is out of [0, num_classes), repeated, or both positive and
    negative, or when neither an image nor an embedding is given.
    """
    if isinstance(image_id, str):
        image_id = image_id.encode("utf-8")
    if not image_id:
        raise DataError("make_example: empty image id; every record needs a unique non-empty id.")
    positives = [int(i) for i in positives]
    negatives = [int(i) for i in negatives]
    where = f"image id {image_id.decode('utf-8', 'replace')!r}"
    for name, indices in (("positive", positives), ("negative", negatives)):
        bad = [i for i in indices if not 0 <= i < num_classes]
        if bad:
            raise DataError(f"{where}: {name} class indices {bad} are outside [0, {num_classes}); "
                            "check the class list given to the converter.")
        if len(set(indices)) != len(indices):
            raise DataError(f"{where}: repeated {name} class indices {sorted(indices)}.")
    both = sorted(set(positives) & set(negatives))
    if both:
        raise DataError(f"{where}: classes {both} are marked both positive and negative; "
                        "fix the annotation (a class is present, absent, or unknown).")
    if encoded_image is None and embedding is None:
        raise DataError(f"{where}: a record needs image bytes or an embedding.")
    feature = {
        IMAGE_ID_KEY: _bytes_feature([image_id]),
        POSITIVE_KEY: _int64_feature(sorted(positives)),
        NEGATIVE_KEY: _int64_feature(sorted(negatives)),
    }
    if encoded_image is not None:
        feature[IMAGE_ENCODED_KEY] = _bytes_feature([encoded_image])
    if embedding is not None:
        values = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if not np.all(np.isfinite(values)):
            raise DataError(f"{where}: the embedding has non-finite values (NaN or inf).")
        feature[EMBEDDING_KEY] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
    if image_class is not None:
        feature[IMAGE_CLASS_KEY] = _int64_feature([int(image_class)])
    return tf.train.Example(features=tf.train.Features(feature=feature))


def label_row(positives: Sequence[int], negatives: Sequence[int], num_classes: int) -> np.ndarray:
    """Dense label row in {+1, -1, 0} (present, absent, unknown), float32 [num_classes]."""
    row = np.zeros([num_classes], np.float32)
    row[np.asarray(positives, np.int64)] = 1.0
    row[np.asarray(negatives, np.int64)] = -1.0
    return row


def _bytes_feature(values: Iterable[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _int64_feature(values: Iterable[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=list(values)))


# ---- dataset.json ------------------------------------------------------------------------------


@dataclasses.dataclass
class SplitInfo:
    """One split: its shard file names (relative to the dataset folder) and exact example count."""
    shards: list[str]
    num_examples: int
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # --skip_corrupt report
    # Records per shard, in `shards` order; lets a worker that reads only some shards know its exact
    # count. Empty in hand-written descriptions: readers then assume SplitWriter's round-robin
    # layout.
    shard_sizes: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DatasetInfo:
    """The contents of dataset.json."""
    class_names: list[str]
    splits: dict[str, SplitInfo]
    mode: str = "image"  # "image" (image/encoded) or "features" (feature/embedding)
    embedding_dim: int | None = None
    image_size: int | None = None  # a hint for training (pixels of the square input)
    label_graph: str | None = None  # optional .npy file (relative to the folder)
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)  # source, protocol, known ratio, seed
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)  # converter, flags, date
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(f"split {name!r} is not in this dataset; it has {sorted(self.splits)}.")
        return self.splits[name]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["num_classes"] = self.num_classes
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = DATASET_JSON) -> "DatasetInfo":
        try:
            splits = {name: SplitInfo(**split) for name, split in obj["splits"].items()}
            fields = {f.name for f in dataclasses.fields(cls)}
            kwargs = {k: v for k, v in obj.items() if k in fields and k != "splits"}
            info = cls(splits=splits, **kwargs)
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: malformed dataset description ({e}); rebuild it with "
                            "tfrecords_tools.") from e
        if obj.get("num_classes", info.num_classes) != info.num_classes:
            raise DataError(f"{where}: num_classes={obj['num_classes']} but {info.num_classes} "
                            "class names are listed.")
        if info.mode not in ("image", "features"):
            raise DataError(f"{where}: mode must be 'image' or 'features', got {info.mode!r}.")
        return info


def load_dataset_info(data_dir: str) -> DatasetInfo:
    """Reads `<data_dir>/dataset.json`; DataError when missing or malformed."""
    path = os.path.join(data_dir, DATASET_JSON)
    if not tf.io.gfile.exists(path):
        raise DataError(f"{path} not found: --data_dir must be a dataset folder written by "
                        "tfrecords_tools (python -m tfrecords_tools.<converter> --output_dir ...).")
    with tf.io.gfile.GFile(path, "r") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e}).") from e
    return DatasetInfo.from_json(obj, where=path)


def save_dataset_info(data_dir: str, info: DatasetInfo) -> None:
    """Writes dataset.json atomically (temporary file, then rename)."""
    tf.io.gfile.makedirs(data_dir)
    path = os.path.join(data_dir, DATASET_JSON)
    _atomic_write_text(path, json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n")


def replace_dataset_info(data_dir: str, info: DatasetInfo) -> None:
    """Saves `info` over an existing description and deletes the shards only the old one listed.

    For tools that rebuild a dataset in place (e.g. with another --num_shards): no stale shard of
    an earlier build stays behind to be mistaken for data.
    """
    previous = None
    if tf.io.gfile.exists(os.path.join(data_dir, DATASET_JSON)):
        try:
            previous = load_dataset_info(data_dir)
        except DataError:
            previous = None  # an unreadable old description lists nothing we could trust
    save_dataset_info(data_dir, info)
    if previous is None:
        return
    listed = {name for split in info.splits.values() for name in split.shards}
    for split in previous.splits.values():
        for name in split.shards:
            path = os.path.join(data_dir, name)
            if name not in listed and tf.io.gfile.exists(path):
                tf.io.gfile.remove(path)


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- Writing shards ----------------------------------------------------------------------------


def shard_names(split: str, num_shards: int) -> list[str]:
    """File names of a split's shards, e.g. train-00000-of-00004.tfrecord."""
    if num_shards < 1:
        raise DataError(f"num_shards must be >= 1, got {num_shards}.")
    return [f"{split}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]


class SplitWriter:
    """Writes one split's Examples round-robin into `num_shards` shards, atomically.

    Shards are written under temporary names and renamed into place by `close()`, so a reader
    never sees a half-written shard; ids are checked for duplicates.

        with SplitWriter(out_dir, "train", num_shards=4) as writer:
            writer.write(example)
        split_info = writer.split_info
    """

    def __init__(self, output_dir: str, split: str, num_shards: int):
        tf.io.gfile.makedirs(output_dir)
        self.output_dir = output_dir
        self.split = split
        self.names = shard_names(split, num_shards)
        self._tmp = [os.path.join(output_dir, f".{n}.tmp-{os.getpid()}") for n in self.names]
        self._writers = [tf.io.TFRecordWriter(p) for p in self._tmp]
        self._shard_sizes = [0] * num_shards
        self._ids: set[bytes] = set()
        self.num_examples = 0
        self.skipped: list[dict[str, Any]] = []
        self.split_info: SplitInfo | None = None

    def write(self, example: tf.train.Example) -> None:
        image_id = example.features.feature[IMAGE_ID_KEY].bytes_list.value[0]
        if image_id in self._ids:
            raise DataError(f"split {self.split!r}: duplicate image id "
                            f"{image_id.decode('utf-8', 'replace')!r}; ids must be unique.")
        self._ids.add(image_id)
        shard = self.num_examples % len(self._writers)
        self._writers[shard].write(example.SerializeToString())
        self._shard_sizes[shard] += 1
        self.num_examples += 1

    def skip(self, source: str, reason: str) -> None:
        """Records an input that was skipped (--skip_corrupt), for the report and dataset.json."""
        self.skipped.append({"source": source, "reason": reason})

    def close(self) -> SplitInfo:
        for writer in self._writers:
            writer.close()
        for tmp, name in zip(self._tmp, self.names):
            tf.io.gfile.rename(tmp, os.path.join(self.output_dir, name), overwrite=True)
        self.split_info = SplitInfo(shards=list(self.names), num_examples=self.num_examples,
                                    skipped=list(self.skipped), shard_sizes=list(self._shard_sizes))
        return self.split_info

    def abort(self) -> None:
        for writer in self._writers:
            writer.close()
        for tmp in self._tmp:
            if tf.io.gfile.exists(tmp):
                tf.io.gfile.remove(tmp)

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# ---- Reading: parsing and decoding one record --------------------------------------------------


def parse_example(serialized: tf.Tensor,
                  num_classes: int,
                  mode: str = "image",
                  embedding_dim: int | None = None) -> dict[str, tf.Tensor]:
    """Parses one serialized schema Example (graph-safe; use inside tf.data).

    Args:
      serialized: tf.string scalar, one record.
      num_classes: L, the length of the dense label row.
      mode: "image" (reads image/encoded) or "features" (reads feature/embedding).
      embedding_dim: D, required in features mode.

    Returns:
      {"id": tf.string [], "labels": float32 [L] in {+1, -1, 0}, "image_class": int64 [] (-1 when
      absent), and "image": tf.string [] (image mode) or "embedding": float32 [D] (features mode)}.
      A record whose class indices are outside [0, L), repeated, or both positive and negative,
      whose image bytes are missing, or whose embedding has the wrong length fails with
      InvalidArgumentError naming the record's id.
    """
    _check_mode(mode, embedding_dim)
    spec = {
        IMAGE_ID_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
        POSITIVE_KEY: tf.io.VarLenFeature(tf.int64),
        NEGATIVE_KEY: tf.io.VarLenFeature(tf.int64),
        IMAGE_CLASS_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    }
    if mode == "image":
        spec[IMAGE_ENCODED_KEY] = tf.io.FixedLenFeature([], tf.string, default_value="")
    else:
        spec[EMBEDDING_KEY] = tf.io.VarLenFeature(tf.float32)
    parsed = tf.io.parse_single_example(serialized, spec)
    image_id = parsed[IMAGE_ID_KEY]
    positives = parsed[POSITIVE_KEY].values  # [P]
    negatives = parsed[NEGATIVE_KEY].values  # [N]

    checks = [
        tf.debugging.Assert(tf.strings.length(image_id) > 0,
                            ["a record has an empty image/id; every record needs a unique id."]),
    ]
    for name, indices in (("positive", positives), ("negative", negatives)):
        in_range = tf.reduce_all((indices >= 0) & (indices < num_classes))
        checks.append(tf.debugging.Assert(in_range, [
            "record", image_id, f": {name} class indices", indices,
            f"are outside [0, {num_classes}); the dataset does not match its class list."],
            summarize=_SUMMARIZE))
    with tf.control_dependencies(checks):
        # [L] counts per class; > 1 only for a repeated index.
        positive_counts = _index_counts(positives, num_classes)
        negative_counts = _index_counts(negatives, num_classes)
    both = (positive_counts > 0) & (negative_counts > 0)
    checks = [
        tf.debugging.Assert(~tf.reduce_any(both), [
            "record", image_id, ": classes", tf.where(both)[:, 0],
            "are both positive and negative; fix the annotation."], summarize=_SUMMARIZE),
        tf.debugging.Assert(tf.reduce_all((positive_counts <= 1) & (negative_counts <= 1)), [
            "record", image_id, ": repeated class indices, positives", positives,
            "negatives", negatives], summarize=_SUMMARIZE),
    ]
    out = {"id": image_id, "image_class": parsed[IMAGE_CLASS_KEY]}
    if mode == "image":
        encoded = parsed[IMAGE_ENCODED_KEY]
        checks.append(tf.debugging.Assert(tf.strings.length(encoded) > 0, [
            "record", image_id, f": no {IMAGE_ENCODED_KEY} bytes in an image-mode dataset."]))
    else:
        embedding = parsed[EMBEDDING_KEY].values  # [D] when well formed
        checks.append(tf.debugging.Assert(tf.size(embedding) == embedding_dim, [
            "record", image_id, f": {EMBEDDING_KEY} has", tf.size(embedding),
            f"values, dataset.json says embedding_dim={embedding_dim}."]))
    with tf.control_dependencies(checks):
        out["labels"] = tf.cast(positive_counts, tf.float32) - tf.cast(negative_counts, tf.float32)
        if mode == "image":
            out["image"] = tf.identity(encoded)
        else:
            out["embedding"] = tf.reshape(embedding, [embedding_dim])
    return out


_SUMMARIZE = 50  # list entries quoted in a parse error (tf.debugging.Assert shows 3 by default)


def decode_image(encoded: tf.Tensor, image_size: int, image_id: tf.Tensor | str | None = None
                 ) -> tf.Tensor:
    """Decodes JPEG or PNG bytes into a float32 [S, S, 3] image in 0..255 (the evaluation view).

    Grayscale and RGBA become RGB; the short side is resized to S keeping the aspect ratio and the
    central S x S square is kept. Training, evaluation and the exported serving function all use
    this function, so a served image is preprocessed exactly as an evaluated one.

    Args:
      encoded: tf.string scalar with the image file bytes.
      image_size: S, the side of the output square.
      image_id: the record's id, quoted in the error when the bytes cannot be decoded.

    Raises:
      InvalidArgumentError (at run time) naming `image_id` when the bytes are empty, not an image,
      or a truncated JPEG/PNG.
    """
    image = _decode_rgb(encoded, image_id)  # uint8 [H, W, 3]
    return _central_square(image, image_size)


def id_hash(ids: tf.Tensor) -> tf.Tensor:
    """Stable int64 hash of string ids (FarmHash fingerprint; the same in every run and process)."""
    return tf.strings.to_hash_bucket_fast(ids, _ID_HASH_BUCKETS)


_ID_HASH_BUCKETS = 2**63 - 1  # the full nonnegative int64 range: collisions are negligible


def _check_mode(mode: str, embedding_dim: int | None) -> None:
    if mode not in ("image", "features"):
        raise ValueError(f"mode must be 'image' or 'features'. Received: mode={mode!r}.")
    if mode == "features" and (embedding_dim is None or embedding_dim < 1):
        raise ValueError("features mode needs the embedding size. "
                         f"Received: embedding_dim={embedding_dim!r}.")


def _index_counts(indices: tf.Tensor, num_classes: int) -> tf.Tensor:
    """How often each class appears in `indices` (assumed in range), int32 [L]."""
    return tf.tensor_scatter_nd_add(tf.zeros([num_classes], tf.int32),
                                    tf.reshape(indices, [-1, 1]),
                                    tf.ones_like(indices, tf.int32))


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk type and its fixed CRC close every complete PNG
_JPEG_MAGIC = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"  # the end-of-image marker


def _decode_rgb(encoded: tf.Tensor, image_id: tf.Tensor | str | None) -> tf.Tensor:
    """Checked decode to uint8 [H, W, 3]; a bad image fails with an error that quotes its id.

    The decoder's own error does not say which record failed, so the common failures (empty
    bytes, not an image, a JPEG or PNG cut short) are detected first by looking at the bytes.
    The end marker is searched anywhere, not only at the end, because valid files may carry
    trailing data after it (camera trailers, padding) and the decoder accepts them.
    """
    image_id = "(no id)" if image_id is None else image_id
    length = tf.strings.length(encoded)
    is_png = tf.equal(tf.strings.substr(encoded, 0, 8), _PNG_MAGIC)
    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, 2), _JPEG_MAGIC)
    # GIF and BMP are accepted by the decoder too; they get no truncation check.
    is_other = (tf.equal(tf.strings.substr(encoded, 0, 3), b"GIF")
                | tf.equal(tf.strings.substr(encoded, 0, 2), b"BM"))
    raw = tf.io.decode_raw(encoded, tf.uint8)  # [n]; decode_raw of a scalar string is 1-D
    checks = [
        tf.debugging.Assert(is_png | is_jpeg | is_other, [
            "image", image_id, ": the bytes are not a JPEG or PNG file (length", length,
            "); re-encode the image or rebuild the dataset with --skip_corrupt."]),
        tf.debugging.Assert(~is_jpeg | _contains_bytes(raw[2:], _JPEG_END), [
            "image", image_id, ": truncated JPEG (no end-of-image marker,", length,
            "bytes); the file was cut short."]),
        tf.debugging.Assert(~is_png | _contains_bytes(raw, _PNG_END), [
            "image", image_id, ": truncated PNG (no IEND chunk,", length,
            "bytes); the file was cut short."]),
    ]
    with tf.control_dependencies(checks):
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def _contains_bytes(raw: tf.Tensor, pattern: bytes) -> tf.Tensor:
    """Whether the uint8 vector `raw` [n] contains `pattern` as consecutive bytes (bool scalar)."""
    starts = tf.maximum(tf.size(raw) - len(pattern) + 1, 0)  # candidate start positions
    found = tf.ones([starts], tf.bool)
    for offset, byte in enumerate(pattern):
        found &= tf.equal(raw[offset:offset + starts], byte)
    return tf.reduce_any(found)


def _central_square(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint8 [H, W, 3] -> float32 [S, S, 3]: the central square, resized to S.

    Cropping the central min(H, W) square and then resizing it equals resizing the short side to S
    and cropping the centre, and it resizes fewer pixels.
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    side = tf.minimum(height, width)
    square = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2,
                                           side, side)
    return _resize_square(square, image_size)


def _resize_square(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """uint8 [h, w, 3] -> float32 [S, S, 3] (antialiased bilinear; a no-op when already S x S)."""
    shape = tf.shape(image)
    resized = tf.cond(
        (shape[0] == image_size) & (shape[1] == image_size),
        lambda: tf.cast(image, tf.float32),
        lambda: tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True))
    resized = tf.clip_by_value(resized, 0.0, 255.0)  # antialiasing can overshoot slightly
    resized.set_shape([image_size, image_size, 3])
    return resized


def _augmented_image(encoded: tf.Tensor, image_size: int, image_id: tf.Tensor,
                     seed: tf.Tensor) -> tf.Tensor:
    """Light training augmentation: random resized crop (>= half the area) and horizontal flip.

    The crop keeps at least half of the image because a multi-label image loses its positives
    when the crop misses them; the label row is not changed.
    """
    image = _decode_rgb(encoded, image_id)  # uint8 [H, W, 3]
    crop_seed = tf.stack([seed, tf.constant(0, tf.int64)])
    flip_seed = tf.stack([seed, tf.constant(1, tf.int64)])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=crop_seed,
        min_object_covered=0.5, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.5, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, size)
    image = _resize_square(image, image_size)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)


# ---- Reading: tf.data pipelines ----------------------------------------------------------------


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
                 input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
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
      input_context: from `strategy.distribute_datasets_from_function`; with several input
        pipelines each reads a disjoint subset of the shard FILES (so there must be at least as
        many shards as pipelines).

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
            image = _augmented_image(parsed["image"], image_size, parsed["id"], element_seed)
            return image, parsed["labels"], id_hash(parsed["id"])
    else:
        elements = records

        def to_element(serialized):
            inputs, labels, image_id = _evaluation_element(serialized, num_classes, mode,
                                                           embedding_dim, image_size)
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
                      string_ids: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
                                               image_size),
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
                        embedding_dim: int | None, image_size: int | None
                        ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """One record without augmentation: (inputs, labels [L], id string)."""
    parsed = parse_example(serialized, num_classes, mode, embedding_dim)
    if mode == "image":
        inputs = decode_image(parsed["image"], image_size, parsed["id"])  # [S, S, 3]
    else:
        inputs = parsed["embedding"]  # [D]
    return inputs, parsed["labels"], parsed["id"]


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


# ---- Verification ------------------------------------------------------------------------------


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
                   check_images: bool = False) -> DatasetReport:
    """Checks dataset.json against its shards, record by record; returns per-split statistics.

    Checks: every listed shard exists and reads to its end (a truncated or corrupt shard is named);
    record counts equal dataset.json's (per shard when recorded, per split always); every record
    parses with the schema (id present, image bytes present or embedding of the stated length,
    class indices in [0, L), not repeated, not both positive and negative); ids are unique within a
    split. With `check_images` every image is also decoded (slower).

    Raises:
      DataError naming the file and the record index of the first problem found.
    """
    info = load_dataset_info(data_dir)
    names = list(info.splits) if splits is None else list(splits)
    report = DatasetReport(info=info, splits={})
    for split in names:
        report.splits[split] = _verify_split(data_dir, info, split, check_images)
    return report


def _verify_split(data_dir: str, info: DatasetInfo, split: str, check_images: bool) -> SplitStats:
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
    for shard_index, start, batch in _split_batches(paths, info, check_images):
        size = len(batch["hash"])
        stats = _check_batch(paths[shard_index], start, batch, info)
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


def _split_batches(paths: list[str], info: DatasetInfo, check_images: bool):
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
                _raise_first_bad_record(path, info, check_images)
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


def _check_batch(path: str, start: int, batch: dict[str, np.ndarray], info: DatasetInfo
                 ) -> tuple[np.ndarray, np.ndarray, int]:
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


def _raise_first_bad_record(path: str, info: DatasetInfo, check_images: bool) -> None:
    """Re-reads a shard one record at a time; DataError at its first bad record, if any."""
    for index, record in enumerate(tf.data.TFRecordDataset(path)):
        try:
            parsed = parse_example(record, info.num_classes, info.mode, info.embedding_dim)
            if check_images and info.mode == "image":
                _decode_rgb(parsed["image"], parsed["id"])
        except tf.errors.InvalidArgumentError as e:
            raise DataError(f"{path}: record {index} ({_record_id_or_unknown(record)}) does not "
                            f"parse: {_tf_message(e)}") from e


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

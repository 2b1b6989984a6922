"""The TFRecord schema of imcl_tf (single source of truth) and the writing side of a dataset.

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
        self._writers[self.num_examples % len(self._writers)].write(example.SerializeToString())
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
                                    skipped=list(self.skipped))
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

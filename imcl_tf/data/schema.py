"""The TFRecord schema of imcl_tf (single source of truth): feature keys and building one Example.

A dataset is a folder with `dataset.json` and sharded TFRecord files, one `tf.train.Example` per
image (docs/dataset-schema.md). Every class index not listed as positive or negative is unknown;
in the pipeline a label row is a dense float vector in {+1, -1, 0} of length `num_classes`.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import tensorflow as tf

from imcl_tf.data.errors import DataError

# ---- TFRecord keys: the only place they are spelled out. ---------------------------------------
IMAGE_ENCODED_KEY = "image/encoded"  # bytes, JPEG or PNG (absent in features-only datasets)
IMAGE_ID_KEY = "image/id"  # bytes, unique per dataset
POSITIVE_KEY = "labels/positive"  # int64 list, class indices known PRESENT
NEGATIVE_KEY = "labels/negative"  # int64 list, class indices known ABSENT
EMBEDDING_KEY = "feature/embedding"  # float list, precomputed feature (features mode)
IMAGE_CLASS_KEY = "image/class"  # int64, optional single class (CUB species, for class-label augmentation)

DATASET_JSON = "dataset.json"
SCHEMA_VERSION = 1


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

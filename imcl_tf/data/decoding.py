"""Reading one record: parsing a schema Example, decoding and augmenting its image, hashing its id."""

from __future__ import annotations

import tensorflow as tf

from imcl_tf import image_header
from imcl_tf.data.schema import (EMBEDDING_KEY, IMAGE_CLASS_KEY, IMAGE_ENCODED_KEY, IMAGE_ID_KEY,
                                 NEGATIVE_KEY, POSITIVE_KEY)


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


def decode_image(encoded: tf.Tensor, image_size: int, image_id: tf.Tensor | str | None = None,
                 max_image_pixels: int | None = None) -> tf.Tensor:
    """Decodes JPEG or PNG bytes into a float32 [S, S, 3] image in 0..255 (the evaluation view).

    Grayscale and RGBA become RGB; the short side is resized to S keeping the aspect ratio and the
    central S x S square is kept. Training, evaluation and the exported serving function all use
    this function, so a served image is preprocessed exactly as an evaluated one.

    Args:
      encoded: tf.string scalar with the image file bytes.
      image_size: S, the side of the output square.
      image_id: the record's id, quoted in the error when the bytes cannot be decoded.
      max_image_pixels: when set, an image with more pixels (read from its header) is refused
        before it is decoded (imcl_tf.image_header).

    Raises:
      InvalidArgumentError (at run time) naming `image_id` when the bytes are empty, not an image,
      a truncated JPEG/PNG, or over `max_image_pixels`.
    """
    image = _decode_rgb(encoded, image_id, max_image_pixels)  # uint8 [H, W, 3]
    return _central_square(image, image_size)


def with_image_class(labels: tf.Tensor, image_class: tf.Tensor, num_image_classes: int,
                     image_id: tf.Tensor) -> tf.Tensor:
    """A label row [L] extended by an always-known one-hot of the record's image/class, [L + C].

    The C appended entries are +1 at the record's class and -1 at the others (the CUB species
    one-hot of the class-label augmentation, docs/method.md §5). A record without image/class, or
    with a class outside [0, C), fails with InvalidArgumentError naming its id.
    """
    ok = tf.logical_and(image_class >= 0, image_class < num_image_classes)
    check = tf.debugging.Assert(ok, [
        "record", image_id, f": image/class is missing or outside [0, {num_image_classes}) "
        "(received", image_class, "); the class-label augmentation (--class_label_weight) needs "
        "every training record's image/class, e.g. the CUB species written by tfrecords_tools.cub."])
    with tf.control_dependencies([check]):
        one_hot = tf.one_hot(image_class, num_image_classes, on_value=1.0, off_value=-1.0)
    return tf.concat([labels, one_hot], axis=0)


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


def _decode_rgb(encoded: tf.Tensor, image_id: tf.Tensor | str | None,
                max_image_pixels: int | None = None) -> tf.Tensor:
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
    if max_image_pixels is not None:
        with tf.control_dependencies(checks):
            where = tf.strings.join(["image ", tf.strings.as_string(image_id)]) \
                if isinstance(image_id, tf.Tensor) else f"image {image_id}"
            checks = [image_header.check_image_pixels_op(encoded, max_image_pixels, where)]
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
                     seed: tf.Tensor, max_image_pixels: int | None = None) -> tf.Tensor:
    """Light training augmentation: random resized crop (>= half the area) and horizontal flip.

    The crop keeps at least half of the image because a multi-label image loses its positives
    when the crop misses them; the label row is not changed.
    """
    image = _decode_rgb(encoded, image_id, max_image_pixels)  # uint8 [H, W, 3]
    crop_seed = tf.stack([seed, tf.constant(0, tf.int64)])
    flip_seed = tf.stack([seed, tf.constant(1, tf.int64)])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image), bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=crop_seed,
        min_object_covered=0.5, aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.5, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    image = tf.slice(image, begin, size)
    image = _resize_square(image, image_size)
    return tf.image.stateless_random_flip_left_right(image, flip_seed)

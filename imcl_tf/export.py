"""Export a trained classifier as a TensorFlow Serving SavedModel (docs/serving.md).

`export_model` writes `<export_base>/<model_name>/<version>/` with named signatures, the class names
as an asset and warm-up requests, building it in a hidden temporary folder beside the final one and
renaming it into place, so a server polling the base path never sees half a model.

    imcl-export --model_dir=runs/demo --export_base=exports --model_name=demo

Signatures (every input and output has an explicit name):
  serving_default   image models: `image_bytes` tf.string [B] (JPEG/PNG), decoded and resized in
                    the graph with `imcl_tf.data.decode_image`, the same function evaluation uses,
                    after a header check against `max_image_pixels` (decompression bombs);
                    features models: the same function as predict_features.
  predict_images    `images` float32 [B, S, S, 3] in 0..255; NaN or infinite values are refused.
  predict_features  `features` float32 [B, D] (features models only); non-finite values refused.
  classify          `inputs`: serialized tf.Example [B] (the dataset schema's `image/encoded` or
                    `feature/embedding`) -> `classes` tf.string [B, L], `scores` float32 [B, L]; the
                    signature TF Serving's Classify API needs.
All but `classify` return `probabilities` (sigmoid, multi-label) [B, L] float32, `logits` [B, L],
`top_k_indices` int32 [B, K], `top_k_scores` float32 [B, K], `top_k_classes` tf.string [B, K].
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow as tf

from imcl_tf import data, image_header

# ---- Names shared with serving/ (the server and client import them from here). ----------------
SERVING_DEFAULT = "serving_default"
PREDICT_IMAGES = "predict_images"
PREDICT_FEATURES = "predict_features"
CLASSIFY = "classify"

IMAGE_BYTES_INPUT = "image_bytes"
IMAGES_INPUT = "images"
FEATURES_INPUT = "features"
CLASSIFY_INPUT = "inputs"  # TF Serving's fixed name for a classify signature's input

PROBABILITIES = "probabilities"
LOGITS = "logits"
TOP_K_INDICES = "top_k_indices"
TOP_K_SCORES = "top_k_scores"
TOP_K_CLASSES = "top_k_classes"
PREDICT_OUTPUTS = (PROBABILITIES, LOGITS, TOP_K_INDICES, TOP_K_SCORES, TOP_K_CLASSES)
CLASSIFY_CLASSES = "classes"  # TF Serving's fixed output names for Classify
CLASSIFY_SCORES = "scores"

CLASS_NAMES_ASSET = "class_names.txt"  # one name per line, line i = class i
WARMUP_DIR = "assets.extra"
WARMUP_FILE = "tf_serving_warmup_requests"
INPUT_MODES = ("image", "features")
_TEMP_PREFIX = ".tmp-export-"  # not an integer, so TF Serving and serving/server.py ignore it
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class ExportError(ValueError):
    """The model, its description or the export folder does not allow a correct export."""


def export_model(model: Callable[..., Any],
                 export_base: str,
                 model_name: str,
                 *,
                 class_names: Sequence[str],
                 input_mode: str,
                 image_size: int | None = None,
                 feature_dim: int | None = None,
                 version: int | None = None,
                 top_k: int = 5,
                 warmup_images: Sequence[bytes] | None = None,
                 max_image_pixels: int = image_header.DEFAULT_MAX_IMAGE_PIXELS) -> str:
    """Writes `model` as SavedModel `<export_base>/<model_name>/<version>`; returns that path.

    Args:
      model: a Keras model (or any callable tracking its variables) with
        `model(inputs, training=False) -> logits [B, L]`; image models take float32 [B, S, S, 3]
        in 0..255 and preprocess inside, features models take float32 [B, D].
      export_base: folder holding one sub-folder per served model (TF Serving's layout).
      model_name: the name clients put in `model_spec.name`.
      class_names: the L class names, in logit order; stored as the asset `class_names.txt`.
      input_mode: "image" or "features".
      image_size: side S of the square model input (image mode).
      feature_dim: D (features mode).
      version: positive integer; default 1 + the highest existing version (1 for a new model).
        An existing version is never overwritten.
      top_k: K of the top_k_* outputs (capped at L).
      warmup_images: a few JPEG/PNG encodings for the warm-up requests (image mode); default:
        two generated images.
      max_image_pixels: image signatures refuse (InvalidArgumentError, before decoding) an
        image whose header declares more pixels: the decompression-bomb guard, which TF Serving
        users get from the SavedModel itself.

    Returns:
      The path of the new version folder.

    Raises:
      ExportError: bad arguments, a model whose output does not match the class names, or a
        version that already exists.

    Example:
      >>> version_dir = export_model(model, "exports", "demo", class_names=names,
      ...                            input_mode="image", image_size=64)  # doctest: +SKIP
    """
    class_names = _check_class_names(class_names)
    _check_arguments(model_name, input_mode, image_size, feature_dim, top_k, version)
    try:
        image_header.check_max_image_pixels(max_image_pixels)
    except ValueError as err:
        raise ExportError(str(err)) from err
    warmup = _warmup_inputs(input_mode, image_size, feature_dim, warmup_images)
    model_base = os.path.join(export_base, model_name)
    os.makedirs(model_base, exist_ok=True)
    if version is None:
        version = next_version(model_base)
    final_dir = os.path.join(model_base, str(version))
    if os.path.exists(final_dir):
        raise ExportError(f"version {version} of model {model_name!r} already exists at "
                          f"{final_dir}; pass another --version or leave it unset to use "
                          f"{next_version(model_base)}.")

    temp_dir = os.path.join(model_base, f"{_TEMP_PREFIX}{version}-{uuid.uuid4().hex[:8]}")
    with tempfile.TemporaryDirectory() as asset_source:
        # The lookup table's initializer records this file as a SavedModel asset, so it is copied
        # into <version>/assets/ and the loaded model reads its own copy.
        class_file = os.path.join(asset_source, CLASS_NAMES_ASSET)
        with open(class_file, "w", encoding="utf-8") as f:
            f.write("".join(name + "\n" for name in class_names))
        try:
            archive = _build_archive(model, class_file, len(class_names), input_mode, image_size,
                                     feature_dim, min(top_k, len(class_names)), warmup,
                                     max_image_pixels)
            archive.write_out(temp_dir, verbose=False)
            _write_warmup_requests(temp_dir, model_name, input_mode, warmup)
            try:
                os.rename(temp_dir, final_dir)
            except OSError as err:
                raise ExportError(f"could not move the export into place at {final_dir} ({err}); "
                                  "another export probably wrote this version at the same time: "
                                  "export again.") from err
        finally:
            if os.path.isdir(temp_dir):
                shutil.rmtree(temp_dir, ignore_errors=True)
    return final_dir


def next_version(model_base: str) -> int:
    """1 + the highest integer-named version folder under `model_base` (1 when there is none)."""
    return max(list_versions(model_base), default=0) + 1


def list_versions(model_base: str) -> list[int]:
    """Sorted integer version numbers of the version folders under `model_base`.

    Only folders named by a positive integer count, as in TF Serving; temporary export folders and
    anything else are ignored.
    """
    if not os.path.isdir(model_base):
        return []
    return sorted(int(name) for name in os.listdir(model_base)
                  if name.isdigit() and int(name) > 0
                  and os.path.isdir(os.path.join(model_base, name)))


def read_class_names(version_dir: str) -> list[str]:
    """The class names stored in an exported version's assets, in logit order."""
    path = os.path.join(version_dir, "assets", CLASS_NAMES_ASSET)
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def export_from_model_dir(model_dir: str, export_base: str, model_name: str, *,
                          checkpoint: str = "best", version: int | None = None,
                          top_k: int = 5,
                          max_image_pixels: int = image_header.DEFAULT_MAX_IMAGE_PIXELS,
                          output: str | None = None) -> str:
    """Loads a training run with `imcl_tf.models.load_model_dir` and exports it (the CLI's body).

    `output` picks which of the run's method outputs the signatures serve (Latent Noise:
    "relevant" or "visual"); None: the one the run saved.
    """
    if not os.path.isdir(model_dir):
        raise ExportError(f"--model_dir={model_dir!r} is not a folder; give the model_dir of a "
                          "training run (imcl-train --model_dir=...).")
    if checkpoint not in ("best", "latest"):
        raise ExportError(f"--checkpoint must be 'best' or 'latest'. Received: {checkpoint!r}.")
    # Imported here so that this module (and the server, which reads its names) does not need the
    # model code.
    from imcl_tf import models
    try:
        model, info = models.load_model_dir(model_dir, checkpoint)
    except (OSError, ValueError) as err:  # FileNotFoundError is an OSError
        raise ExportError(f"cannot load the {checkpoint!r} checkpoint from --model_dir="
                          f"{model_dir!r}: {err}. Train first, or pick --checkpoint=latest when "
                          "no best checkpoint was kept.") from err
    if output is not None:
        if output not in model.method.OUTPUTS:
            raise ExportError(f"--output={output!r}: the {model.method_name!r} run in "
                              f"--model_dir={model_dir!r} has the outputs "
                              f"{list(model.method.OUTPUTS)}; choose one of those, or leave "
                              "--output out.")
        model.with_output(output)
    return export_model(model, export_base, model_name,
                        class_names=info["class_names"], input_mode=info["input_mode"],
                        image_size=info.get("image_size"), feature_dim=info.get("feature_dim"),
                        version=version, top_k=top_k, max_image_pixels=max_image_pixels)


# ---- Building the signatures -------------------------------------------------------------------


def _build_archive(model, class_file: str, num_classes: int, input_mode: str,
                   image_size: int | None, feature_dim: int | None, top_k: int,
                   warmup: dict[str, np.ndarray], max_image_pixels: int):
    """An ExportArchive with every signature, each run once on the warm-up inputs as a check.

    ExportArchive saves only the variables the signatures use, so training-only state (optimizer
    slots, the IMCL dictionary bank) stays out of the served model. The signatures guard their
    inputs themselves, so TF Serving gets the same protection as serving/server.py: image bytes
    are refused from their header above `max_image_pixels` before decoding, and arrays with NaN
    or infinite values are refused instead of yielding finite-looking probabilities.
    """
    import keras  # after TensorFlow, as everywhere in the package

    init = tf.lookup.TextFileInitializer(class_file, tf.int64, tf.lookup.TextFileIndex.LINE_NUMBER,
                                         tf.string, tf.lookup.TextFileIndex.WHOLE_LINE)
    class_table = tf.lookup.StaticHashTable(init, default_value="")
    all_indices = tf.range(num_classes, dtype=tf.int64)  # [L]

    def outputs_from(inputs):
        logits = tf.cast(model(inputs, training=False), tf.float32)  # [B, L]
        probabilities = tf.sigmoid(logits)  # multi-label: one independent sigmoid per class
        top_scores, top_indices = tf.math.top_k(probabilities, k=top_k)  # [B, K]
        return {
            PROBABILITIES: probabilities,
            LOGITS: logits,
            TOP_K_INDICES: top_indices,
            TOP_K_SCORES: top_scores,
            TOP_K_CLASSES: class_table.lookup(tf.cast(top_indices, tf.int64)),
        }

    def classify_from(inputs):
        probabilities = outputs_from(inputs)[PROBABILITIES]  # [B, L]
        names = class_table.lookup(all_indices)  # [L]
        classes = tf.tile(names[tf.newaxis], [tf.shape(probabilities)[0], 1])  # [B, L]
        return {CLASSIFY_CLASSES: classes, CLASSIFY_SCORES: probabilities}

    def finite(values, name):
        return tf.debugging.assert_all_finite(
            values, f"input {name!r} has NaN or infinite values; send finite numbers (images: "
                    "pixel values in 0..255)")

    if not getattr(model, "built", True):
        # Variables must exist before tracing: build the model with one eager call.
        model(tf.constant(warmup[IMAGES_INPUT if input_mode == "image" else FEATURES_INPUT]),
              training=False)
    archive = keras.export.ExportArchive()
    archive.track(class_table)
    endpoints = {}
    if input_mode == "image":
        def checked_decode(encoded, position):  # [] -> [S, S, 3]
            header = image_header.check_image_pixels_op(encoded, max_image_pixels, position)
            with tf.control_dependencies([header]):
                return data.decode_image(encoded, image_size, position)

        def decode_batch(encoded):  # [B] -> [B, S, S, 3]
            # A bad image's error names its position in the request, e.g. "image_bytes[3]".
            positions = tf.strings.join([f"{IMAGE_BYTES_INPUT}[",
                                         tf.strings.as_string(tf.range(tf.size(encoded))), "]"])
            return tf.map_fn(lambda item: checked_decode(item[0], item[1]),
                             (encoded, positions),
                             fn_output_signature=tf.TensorSpec([image_size, image_size, 3],
                                                               tf.float32))

        def serving_default(image_bytes):
            return outputs_from(decode_batch(image_bytes))

        def predict_images(images):
            return outputs_from(finite(images, IMAGES_INPUT))

        def classify(inputs):
            parsed = tf.io.parse_example(
                inputs, {data.IMAGE_ENCODED_KEY: tf.io.FixedLenFeature([], tf.string)})
            return classify_from(decode_batch(parsed[data.IMAGE_ENCODED_KEY]))

        image_spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name=IMAGES_INPUT)
        endpoints[SERVING_DEFAULT] = (serving_default, tf.TensorSpec([None], tf.string,
                                                                     name=IMAGE_BYTES_INPUT))
        endpoints[PREDICT_IMAGES] = (predict_images, image_spec)
    else:
        def predict_features(features):
            return outputs_from(finite(features, FEATURES_INPUT))

        def classify(inputs):
            parsed = tf.io.parse_example(
                inputs, {data.EMBEDDING_KEY: tf.io.FixedLenFeature([feature_dim], tf.float32)})
            return classify_from(parsed[data.EMBEDDING_KEY])

        features_spec = tf.TensorSpec([None, feature_dim], tf.float32, name=FEATURES_INPUT)
        endpoints[SERVING_DEFAULT] = (predict_features, features_spec)
        endpoints[PREDICT_FEATURES] = (predict_features, features_spec)
    endpoints[CLASSIFY] = (classify, tf.TensorSpec([None], tf.string, name=CLASSIFY_INPUT))

    for name, (fn, spec) in endpoints.items():
        endpoint = archive.add_endpoint(name, fn, input_signature=[spec])
        _check_endpoint(name, endpoint, warmup[spec.name], num_classes, top_k)
    return archive


def _check_endpoint(name: str, endpoint, example_input: np.ndarray, num_classes: int,
                    top_k: int) -> None:
    """Runs a signature once so a model that does not fit its description fails before writing."""
    try:
        result = endpoint(tf.constant(example_input))
    except (tf.errors.OpError, ValueError, TypeError) as err:
        raise ExportError(f"signature {name!r} failed on a warm-up input of shape "
                          f"{list(example_input.shape)}: {err}") from err
    batch = example_input.shape[0]
    if CLASSIFY_SCORES in result:
        expected = {CLASSIFY_SCORES: (batch, num_classes), CLASSIFY_CLASSES: (batch, num_classes)}
    else:
        expected = {PROBABILITIES: (batch, num_classes), LOGITS: (batch, num_classes),
                    TOP_K_INDICES: (batch, top_k), TOP_K_SCORES: (batch, top_k),
                    TOP_K_CLASSES: (batch, top_k)}
    for key, shape in expected.items():
        if tuple(result[key].shape) != shape:
            raise ExportError(f"signature {name!r}: output {key!r} has shape "
                              f"{list(result[key].shape)}, expected {list(shape)}; the model "
                              f"returns {result[key].shape[-1]} logits per image but "
                              f"{num_classes} class names were given.")
    scores = result.get(PROBABILITIES, result.get(CLASSIFY_SCORES)).numpy()
    if not np.all(np.isfinite(scores)):
        raise ExportError(f"signature {name!r} returns non-finite scores on the warm-up input; "
                          "the checkpoint is probably diverged.")


# ---- Warm-up requests --------------------------------------------------------------------------


def _warmup_inputs(input_mode: str, image_size: int | None, feature_dim: int | None,
                   warmup_images: Sequence[bytes] | None) -> dict[str, np.ndarray]:
    """Warm-up inputs keyed by signature input name (also used to check each signature)."""
    rng = np.random.default_rng(0)
    if input_mode == "features":
        features = rng.normal(size=[2, feature_dim]).astype(np.float32)  # [2, D]
        examples = [data.make_example(f"warmup-{i}", [], [], 1, embedding=row)
                    for i, row in enumerate(features)]
        return {FEATURES_INPUT: features,
                CLASSIFY_INPUT: np.array([e.SerializeToString() for e in examples], dtype=object)}
    if warmup_images is None:
        # One JPEG and one PNG, not square, so decoding, resizing and cropping all run once.
        pixels = rng.integers(0, 256, size=[2, image_size + 8, image_size + 16, 3], dtype=np.uint8)
        warmup_images = [tf.io.encode_jpeg(pixels[0]).numpy(), tf.io.encode_png(pixels[1]).numpy()]
    encoded = [bytes(image) for image in warmup_images]
    if not encoded:
        raise ExportError("warmup_images is empty; give a few JPEG/PNG encodings or leave it "
                          "unset.")
    decoded = []
    for i, image in enumerate(encoded):
        try:
            decoded.append(data.decode_image(tf.constant(image), image_size).numpy())
        except tf.errors.OpError as err:
            raise ExportError(f"warmup_images[{i}] is not a decodable JPEG/PNG image: "
                              f"{err.message}") from err
    examples = [data.make_example(f"warmup-{i}", [], [], 1, encoded_image=image)
                for i, image in enumerate(encoded)]
    return {IMAGE_BYTES_INPUT: np.array(encoded, dtype=object),
            IMAGES_INPUT: np.stack(decoded).astype(np.float32),  # [N, S, S, 3]
            CLASSIFY_INPUT: np.array([e.SerializeToString() for e in examples], dtype=object)}


def _write_warmup_requests(version_dir: str, model_name: str, input_mode: str,
                           warmup: dict[str, np.ndarray]) -> None:
    """Writes assets.extra/tf_serving_warmup_requests: PredictionLogs, as TF Serving reads them."""
    from tensorflow_serving.apis import (classification_pb2, model_pb2, predict_pb2,
                                         prediction_log_pb2)

    if input_mode == "image":
        predict_inputs = [(SERVING_DEFAULT, IMAGE_BYTES_INPUT), (PREDICT_IMAGES, IMAGES_INPUT)]
    else:
        predict_inputs = [(SERVING_DEFAULT, FEATURES_INPUT), (PREDICT_FEATURES, FEATURES_INPUT)]
    records = []
    for signature, input_name in predict_inputs:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature))
        request.inputs[input_name].CopyFrom(tf.make_tensor_proto(warmup[input_name]))
        records.append(prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)))
    classify_request = classification_pb2.ClassificationRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=CLASSIFY))
    for serialized in warmup[CLASSIFY_INPUT]:
        classify_request.input.example_list.examples.add().ParseFromString(serialized)
    records.append(prediction_log_pb2.PredictionLog(
        classify_log=prediction_log_pb2.ClassifyLog(request=classify_request)))

    os.makedirs(os.path.join(version_dir, WARMUP_DIR), exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(version_dir, WARMUP_DIR, WARMUP_FILE)) as writer:
        for record in records:
            writer.write(record.SerializeToString())


# ---- Argument checks ---------------------------------------------------------------------------


def _check_class_names(class_names: Sequence[str]) -> list[str]:
    if isinstance(class_names, str) or not class_names:
        raise ExportError(f"class_names must be a non-empty list of strings. Received: "
                          f"{class_names!r}.")
    names = [str(name) for name in class_names]
    bad = [name for name in names if not name.strip() or "\n" in name or "\r" in name]
    if bad:
        raise ExportError(f"class names must be non-empty single-line strings (they are stored one "
                          f"per line in {CLASS_NAMES_ASSET}). Received: {bad[:5]!r}.")
    if len(set(names)) != len(names):
        repeated = sorted({name for name in names if names.count(name) > 1})
        raise ExportError(f"class names must be unique. Repeated: {repeated[:5]!r}.")
    return names


def _check_arguments(model_name: str, input_mode: str, image_size: int | None,
                     feature_dim: int | None, top_k: int, version: int | None) -> None:
    if not isinstance(model_name, str) or not _MODEL_NAME.match(model_name):
        raise ExportError(f"model_name must be a folder name of letters, digits, '_', '.', '-' "
                          f"(not starting with '.' or '-'). Received: {model_name!r}.")
    if input_mode not in INPUT_MODES:
        raise ExportError(f"input_mode must be one of {INPUT_MODES}. Received: {input_mode!r}.")
    if input_mode == "image" and not (isinstance(image_size, int) and image_size > 0):
        raise ExportError(f"image models need a positive integer image_size. Received: "
                          f"{image_size!r}.")
    if input_mode == "features" and not (isinstance(feature_dim, int) and feature_dim > 0):
        raise ExportError(f"features models need a positive integer feature_dim. Received: "
                          f"{feature_dim!r}.")
    if not (isinstance(top_k, int) and top_k > 0):
        raise ExportError(f"top_k must be a positive integer. Received: {top_k!r}.")
    if version is not None and not (isinstance(version, int) and version > 0):
        raise ExportError(f"version must be a positive integer (TF Serving's version folders). "
                          f"Received: {version!r}.")


if __name__ == "__main__":  # the command's flags and main are in imcl_tf.export_cli
    from imcl_tf.export_cli import run_cli

    run_cli()

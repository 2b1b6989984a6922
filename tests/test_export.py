"""Tests for imcl_tf.export: TF Serving layout, named signatures, assets, warm-up, numerics."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from imcl_tf import data, export

IMAGE_SIZE = 16
CLASS_NAMES = ["cat", "dog", "bird", "car"]
FEATURE_DIM = 6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_image_model(seed=0):
    """Rescaling + Conv2D + pooling + Dense: the exporter's interface on 16x16 images."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(5, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(len(CLASS_NAMES))(x))


def tiny_features_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((FEATURE_DIM,))
    return keras.Model(inputs, keras.layers.Dense(len(CLASS_NAMES))(inputs))


def encoded_images(rng, count):
    """Alternating PNG and JPEG encodings of random images of several shapes."""
    images = []
    for i in range(count):
        pixels = rng.integers(0, 256, size=[12 + 4 * i, 20 + 2 * i, 3], dtype=np.uint8)
        encode = tf.io.encode_png if i % 2 == 0 else tf.io.encode_jpeg
        images.append(encode(pixels).numpy())
    return images


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_top_k(scores, k):
    """Indices of the k largest scores per row, largest first (ties: lower index first)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def image_export(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("exports"))
    model = tiny_image_model()
    version_dir = export.export_model(model, base, "tiny", class_names=CLASS_NAMES,
                                      input_mode="image", image_size=IMAGE_SIZE, top_k=3)
    return model, base, version_dir


def test_layout_assets_and_no_temp_folder(image_export):
    _, base, version_dir = image_export
    assert version_dir == os.path.join(base, "tiny", "1")
    assert os.listdir(os.path.join(base, "tiny")) == ["1"]  # the temporary folder was renamed
    for name in ("saved_model.pb", "variables", "assets", "assets.extra"):
        assert os.path.exists(os.path.join(version_dir, name)), name
    with open(os.path.join(version_dir, "assets", export.CLASS_NAMES_ASSET)) as f:
        assert f.read() == "cat\ndog\nbird\ncar\n"
    assert export.read_class_names(version_dir) == CLASS_NAMES


def test_signatures_have_explicit_names_and_dtypes(image_export):
    _, _, version_dir = image_export
    loaded = tf.saved_model.load(version_dir)
    assert set(loaded.signatures) == {"serving_default", "predict_images", "classify"}
    expected_inputs = {"serving_default": ("image_bytes", tf.string, [None]),
                       "predict_images": ("images", tf.float32, [None, IMAGE_SIZE, IMAGE_SIZE, 3]),
                       "classify": ("inputs", tf.string, [None])}
    for name, (input_name, dtype, shape) in expected_inputs.items():
        _, kwargs = loaded.signatures[name].structured_input_signature
        assert list(kwargs) == [input_name]
        assert kwargs[input_name].dtype == dtype
        assert kwargs[input_name].shape.as_list() == shape
    predict_outputs = {"probabilities": tf.float32, "logits": tf.float32,
                       "top_k_indices": tf.int32, "top_k_scores": tf.float32,
                       "top_k_classes": tf.string}
    for name in ("serving_default", "predict_images"):
        outputs = loaded.signatures[name].structured_outputs
        assert {key: spec.dtype for key, spec in outputs.items()} == predict_outputs
        assert outputs["top_k_indices"].shape.as_list() == [None, 3]
    outputs = loaded.signatures["classify"].structured_outputs
    assert {key: spec.dtype for key, spec in outputs.items()} == {"classes": tf.string,
                                                                  "scores": tf.float32}


def test_warmup_file_is_prediction_logs(image_export):
    _, _, version_dir = image_export
    path = os.path.join(version_dir, "assets.extra", "tf_serving_warmup_requests")
    logs = [prediction_log_pb2.PredictionLog.FromString(record.numpy())
            for record in tf.data.TFRecordDataset(path)]
    kinds = [(log.WhichOneof("log_type"), log.predict_log.request.model_spec.signature_name
              or log.classify_log.request.model_spec.signature_name) for log in logs]
    assert kinds == [("predict_log", "serving_default"), ("predict_log", "predict_images"),
                     ("classify_log", "classify")]
    request = logs[0].predict_log.request
    assert request.model_spec.name == "tiny"
    encoded = tf.make_ndarray(request.inputs["image_bytes"])
    assert len(encoded) == 2
    assert all(data.decode_image(tf.constant(e), IMAGE_SIZE).shape == (16, 16, 3) for e in encoded)
    images = tf.make_ndarray(logs[1].predict_log.request.inputs["images"])
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.float32


def test_signatures_match_the_keras_model(image_export, rng):
    model, _, version_dir = image_export
    loaded = tf.saved_model.load(version_dir)
    encoded = encoded_images(rng, 5)
    decoded = np.stack([data.decode_image(tf.constant(e), IMAGE_SIZE).numpy() for e in encoded])
    logits = model(decoded, training=False).numpy()  # [5, L]
    probabilities = np_sigmoid(logits)

    served = loaded.signatures["serving_default"](image_bytes=tf.constant(encoded))
    from_images = loaded.signatures["predict_images"](images=tf.constant(decoded))
    for outputs in (served, from_images):
        np.testing.assert_allclose(outputs["logits"].numpy(), logits, atol=1e-5)
        np.testing.assert_allclose(outputs["probabilities"].numpy(), probabilities, atol=1e-5)
        top = np_top_k(probabilities, 3)
        np.testing.assert_array_equal(outputs["top_k_indices"].numpy(), top)
        np.testing.assert_allclose(outputs["top_k_scores"].numpy(),
                                   np.take_along_axis(probabilities, top, 1), atol=1e-5)
        names = np.array(CLASS_NAMES, dtype=object)[top]
        assert outputs["top_k_classes"].numpy().astype(str).tolist() == names.tolist()

    examples = [data.make_example(f"img{i}", [], [], len(CLASS_NAMES), encoded_image=e)
                .SerializeToString() for i, e in enumerate(encoded)]
    classified = loaded.signatures["classify"](inputs=tf.constant(examples))
    np.testing.assert_allclose(classified["scores"].numpy(), probabilities, atol=1e-5)
    assert classified["classes"].numpy().astype(str).tolist() == [CLASS_NAMES] * 5


def test_features_model_signatures(tmp_path, rng):
    model = tiny_features_model()
    version_dir = export.export_model(model, str(tmp_path), "feat", class_names=CLASS_NAMES,
                                      input_mode="features", feature_dim=FEATURE_DIM)
    loaded = tf.saved_model.load(version_dir)
    assert set(loaded.signatures) == {"serving_default", "predict_features", "classify"}
    features = rng.normal(size=[3, FEATURE_DIM]).astype(np.float32)
    probabilities = np_sigmoid(model(features, training=False).numpy())
    for name in ("serving_default", "predict_features"):
        _, kwargs = loaded.signatures[name].structured_input_signature
        assert list(kwargs) == ["features"]
        outputs = loaded.signatures[name](features=tf.constant(features))
        np.testing.assert_allclose(outputs["probabilities"].numpy(), probabilities, atol=1e-5)
        # top_k is capped at the number of classes.
        np.testing.assert_array_equal(outputs["top_k_indices"].numpy(), np_top_k(probabilities, 4))
    examples = [data.make_example(f"f{i}", [], [], 4, embedding=row).SerializeToString()
                for i, row in enumerate(features)]
    classified = loaded.signatures["classify"](inputs=tf.constant(examples))
    np.testing.assert_allclose(classified["scores"].numpy(), probabilities, atol=1e-5)


def test_versions_increase_and_are_never_overwritten(tmp_path):
    model = tiny_features_model()
    kwargs = dict(class_names=CLASS_NAMES, input_mode="features", feature_dim=FEATURE_DIM)
    base = str(tmp_path)
    assert export.export_model(model, base, "m", **kwargs).endswith(os.path.join("m", "1"))
    assert export.export_model(model, base, "m", version=7, **kwargs).endswith("7")
    assert export.export_model(model, base, "m", **kwargs).endswith("8")
    with pytest.raises(export.ExportError, match="version 7 .* already exists"):
        export.export_model(model, base, "m", version=7, **kwargs)
    os.makedirs(os.path.join(base, "m", "notes"))  # non-version folders are ignored
    assert export.list_versions(os.path.join(base, "m")) == [1, 7, 8]
    assert sorted(os.listdir(os.path.join(base, "m"))) == ["1", "7", "8", "notes"]


@pytest.mark.parametrize("overrides, message", [
    (dict(class_names=["a", "b"]), "2 class names were given"),
    (dict(class_names=["a", "a", "b", "c"]), "unique"),
    (dict(class_names=["a", "b\nc", "d", "e"]), "single-line"),
    (dict(input_mode="video"), "input_mode must be one of"),
    (dict(image_size=None), "positive integer image_size"),
    (dict(top_k=0), "top_k must be a positive integer"),
    (dict(version=0), "version must be a positive integer"),
    (dict(model_name="../escape"), "model_name must be a folder name"),
    (dict(warmup_images=[b"not an image"]), r"warmup_images\[0\]"),
])
def test_bad_arguments_fail_clearly_and_leave_nothing(tmp_path, overrides, message):
    kwargs = dict(model_name="m", class_names=CLASS_NAMES, input_mode="image",
                  image_size=IMAGE_SIZE)
    kwargs.update(overrides)
    with pytest.raises(export.ExportError, match=message):
        export.export_model(tiny_image_model(), str(tmp_path), kwargs.pop("model_name"), **kwargs)
    leftovers = [os.path.join(root, name) for root, dirs, _ in os.walk(tmp_path) for name in dirs]
    assert not [path for path in leftovers if os.path.basename(path) != "m"], leftovers


def test_export_from_model_dir_errors(tmp_path):
    with pytest.raises(export.ExportError, match="is not a folder"):
        export.export_from_model_dir(str(tmp_path / "missing"), str(tmp_path), "m")
    with pytest.raises(export.ExportError, match="cannot load the 'best' checkpoint"):
        export.export_from_model_dir(str(tmp_path), str(tmp_path / "exports"), "m")


@pytest.mark.slow
def test_cli_exports_a_training_run(tmp_path):
    """python -m imcl_tf.export on a model_dir written with imcl_tf.models' own helpers."""
    from imcl_tf import models

    model_dir = tmp_path / "run"
    models.write_model_info(str(model_dir), {"class_names": CLASS_NAMES, "input_mode": "features",
                                             "image_size": None, "feature_dim": FEATURE_DIM})
    models.save_model_file(tiny_features_model(), str(model_dir / models.LATEST_MODEL))
    command = [sys.executable, "-m", "imcl_tf.export", f"--model_dir={model_dir}",
               f"--export_base={tmp_path / 'exports'}", "--model_name=demo",
               "--checkpoint=latest"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    version_dir = str(tmp_path / "exports" / "demo" / "1")
    assert result.stdout.strip().splitlines()[-1] == version_dir
    assert export.read_class_names(version_dir) == CLASS_NAMES



def test_an_unbuilt_model_is_built_before_tracing(tmp_path, rng):
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.layers.Dense(len(CLASS_NAMES))])  # no variables yet
    version_dir = export.export_model(model, str(tmp_path), "seq", class_names=CLASS_NAMES,
                                      input_mode="features", feature_dim=FEATURE_DIM)
    features = rng.normal(size=[2, FEATURE_DIM]).astype(np.float32)
    served = tf.saved_model.load(version_dir).signatures["predict_features"](
        features=tf.constant(features))
    np.testing.assert_allclose(served["logits"].numpy(), model(features).numpy(), atol=1e-5)


def test_signatures_refuse_image_bombs_and_non_finite_arrays(tmp_path, rng):
    """The SavedModel guards itself, so TF Serving (which runs no code of ours) gets the same
    protection as serving/server.py: header check before decoding, finite arrays only."""
    import struct
    import zlib

    def png_bomb(width, height):  # 1-bit black PNG built from bytes (tests/image_bombs.py)
        row = b"\x00" * (1 + (width + 7) // 8)
        chunk = lambda kind, body: (struct.pack(">I", len(body)) + kind + body  # noqa: E731
                                    + struct.pack(">I", zlib.crc32(kind + body)))
        return (b"\x89PNG\r\n\x1a\n"
                + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(row * height, 9)) + chunk(b"IEND", b""))

    model = tiny_image_model()
    version_dir = export.export_model(model, str(tmp_path), "guarded", class_names=CLASS_NAMES,
                                      input_mode="image", image_size=IMAGE_SIZE,
                                      max_image_pixels=40 * 30)
    loaded = tf.saved_model.load(version_dir)
    small, large = png_bomb(40, 30), png_bomb(41, 30)
    assert loaded.signatures["serving_default"](
        image_bytes=tf.constant([small]))["probabilities"].shape == (1, len(CLASS_NAMES))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"image_bytes\[1\]: image of 41 x 30 pixels \(1230 pixels\) is over "
                             r"the limit of 1,200 pixels \(--max_image_pixels=1200\)"):
        loaded.signatures["serving_default"](image_bytes=tf.constant([small, large]))
    example = data.make_example("big", [], [], len(CLASS_NAMES), encoded_image=large)
    with pytest.raises(tf.errors.InvalidArgumentError, match="41 x 30 pixels"):
        loaded.signatures["classify"](inputs=tf.constant([example.SerializeToString()]))

    images = rng.uniform(0, 255, size=[2, IMAGE_SIZE, IMAGE_SIZE, 3]).astype(np.float32)
    expected = np_sigmoid(model(images, training=False).numpy())
    np.testing.assert_allclose(loaded.signatures["predict_images"](
        images=tf.constant(images))["probabilities"].numpy(), expected, atol=1e-5)
    images[0, 1, 2, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="input 'images' has NaN or infinite values"):
        loaded.signatures["predict_images"](images=tf.constant(images))

    features_dir = export.export_model(tiny_features_model(), str(tmp_path), "feat",
                                       class_names=CLASS_NAMES, input_mode="features",
                                       feature_dim=FEATURE_DIM)
    features = np.array([[0.0] * (FEATURE_DIM - 1) + [np.inf]], np.float32)
    for name in ("serving_default", "predict_features"):
        with pytest.raises(tf.errors.InvalidArgumentError, match="input 'features' has NaN"):
            tf.saved_model.load(features_dir).signatures[name](features=tf.constant(features))
    with pytest.raises(export.ExportError, match="--max_image_pixels must be a positive"):
        export.export_model(model, str(tmp_path), "bad", class_names=CLASS_NAMES,
                            input_mode="image", image_size=IMAGE_SIZE, max_image_pixels=0)

"""imcl-predict: labelling image files with a training run or a SavedModel export."""

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from imcl_tf import data, export, models, predict

IMAGE_SIZE = 16
CLASS_NAMES = ["cat", "dog", "bird", "car", "tree"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A training run folder (untrained small_cnn IMCLModel), its export and a folder of images."""
    root = tmp_path_factory.mktemp("predict")
    keras.utils.set_random_seed(5)
    model = models.IMCLModel(len(CLASS_NAMES), input_shape_=(IMAGE_SIZE, IMAGE_SIZE, 3),
                             backbone="small_cnn", method="logistic")
    model_dir = str(root / "run")
    models.write_model_info(model_dir, {"class_names": CLASS_NAMES, "input_mode": "image",
                                        "image_size": IMAGE_SIZE, "feature_dim": None})
    models.save_model_file(model, os.path.join(model_dir, models.BEST_MODEL))
    version_dir = export.export_from_model_dir(model_dir, str(root / "exports"), "m")
    images_dir = root / "images"
    (images_dir / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        pixels = rng.integers(0, 256, size=[12 + 3 * i, 20, 3], dtype=np.uint8)
        encode, suffix = (tf.io.encode_png, "png") if i % 2 else (tf.io.encode_jpeg, "jpg")
        folder = images_dir / "sub" if i == 4 else images_dir
        (folder / f"img{i}.{suffix}").write_bytes(encode(pixels).numpy())
    (images_dir / "notes.txt").write_text("not an image")
    return {"root": root, "model_dir": model_dir, "version_dir": version_dir,
            "images_dir": str(images_dir), "model": model}


def reference_probabilities(run, files):
    """The model's sigmoid outputs on the evaluation view of each file, computed directly."""
    images = [data.decode_image(tf.constant(open(f, "rb").read()), IMAGE_SIZE).numpy()
              for f in files]
    logits = keras.ops.convert_to_numpy(run["model"](np.stack(images), training=False))
    return np_sigmoid(logits.astype(np.float64))


def test_list_images_finds_jpeg_and_png_only_and_recurses_on_request(run):
    found = predict.list_images([run["images_dir"]])
    assert [os.path.basename(f) for f in found] == ["img0.jpg", "img1.png", "img2.jpg",
                                                    "img3.png"]
    assert len(predict.list_images([run["images_dir"]], recursive=True)) == 5
    with pytest.raises(ValueError, match="no such file or folder"):
        predict.list_images([os.path.join(run["images_dir"], "missing")])
    with pytest.raises(ValueError, match="--recursive"):
        predict.list_images([str(run["root"] / "run")])


def test_top_classes_against_a_sort_with_ties_and_threshold(rng):
    for _ in range(20):
        row = rng.choice([0.1, 0.3, 0.5, 0.9], size=len(CLASS_NAMES))  # many ties
        k = int(rng.integers(0, len(CLASS_NAMES) + 1))
        threshold = float(rng.choice([0.0, 0.3, 0.6]))
        expected = sorted(range(len(row)), key=lambda i: (-row[i], i))
        expected = [i for i in (expected[:k] if k else expected) if row[i] >= threshold]
        names, scores = predict.top_classes(row, CLASS_NAMES, k, threshold)
        assert names == [CLASS_NAMES[i] for i in expected]
        assert scores == [row[i] for i in expected]


@pytest.mark.parametrize("source", ["model_dir", "version_dir", "exports", "keras_file"])
def test_run_and_export_give_the_models_own_top_k(run, source):
    path = {"model_dir": run["model_dir"], "version_dir": run["version_dir"],
            "exports": os.path.dirname(run["version_dir"]),
            "keras_file": os.path.join(run["model_dir"], models.BEST_MODEL)}[source]
    predictor = predict.load_predictor(path)
    assert predictor.class_names == CLASS_NAMES and predictor.image_size == IMAGE_SIZE
    files = predict.list_images([run["images_dir"]], recursive=True)
    predictions = predict.predict_files(predictor, files, top_k=3, batch_size=2)
    expected = reference_probabilities(run, files)
    assert [p.image for p in predictions] == files
    for p, row in zip(predictions, expected):
        order = np.argsort(-row, kind="stable")[:3]
        np.testing.assert_allclose(p.scores, row[order], atol=1e-5)
        # names by rank (a near tie may swap two classes between the two computations)
        assert set(p.classes) == {CLASS_NAMES[i] for i in order} or np.isclose(
            row[order[-1]], np.sort(row)[-4], atol=1e-5)


def test_not_a_model_and_feature_models_are_refused(run, tmp_path):
    with pytest.raises(ValueError, match="neither a training run"):
        predict.load_predictor(str(tmp_path))
    with pytest.raises(ValueError, match="does not exist"):
        predict.load_predictor(str(tmp_path / "nope"))
    features_dir = str(tmp_path / "features_run")
    models.write_model_info(features_dir, {"class_names": CLASS_NAMES, "input_mode": "features",
                                           "image_size": None, "feature_dim": 4})
    models.save_model_file(models.IMCLModel(len(CLASS_NAMES), input_shape_=(4,),
                                            backbone="features", method="logistic"),
                           os.path.join(features_dir, models.BEST_MODEL))
    with pytest.raises(ValueError, match="takes precomputed features"):
        predict.load_predictor(features_dir)


def test_unreadable_files_are_skipped_with_a_message(run, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(open(os.path.join(run["images_dir"], "img1.png"), "rb").read()[:40])
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    good = os.path.join(run["images_dir"], "img0.jpg")
    skipped = []
    predictions = predict.predict_files(predict.load_predictor(run["model_dir"]),
                                        [str(broken), good, str(text)], on_skip=skipped.append)
    assert [p.image for p in predictions] == [good]
    assert len(skipped) == 2 and str(broken) in skipped[0] and str(text) in skipped[1]


def test_csv_and_json_outputs(tmp_path):
    predictions = [predict.Prediction("a.jpg", ["dog", "cat"], [0.9, 0.25]),
                   predict.Prediction("b.png", [], [])]
    predict.write_predictions(predictions, str(tmp_path / "out.csv"))
    with open(tmp_path / "out.csv") as f:
        rows = list(csv.reader(f))
    assert rows == [["image", "rank", "class", "score"], ["a.jpg", "1", "dog", "0.900000"],
                    ["a.jpg", "2", "cat", "0.250000"]]
    predict.write_predictions(predictions, str(tmp_path / "out.json"))
    with open(tmp_path / "out.json") as f:
        assert json.load(f)[0] == {"image": "a.jpg", "predictions": [
            {"class": "dog", "score": 0.9}, {"class": "cat", "score": 0.25}]}
    assert predict.format_predictions(predictions) == "a.jpg: dog 0.900, cat 0.250\nb.png: (none)"
    with pytest.raises(ValueError, match=".csv or .json"):
        predict.write_predictions(predictions, str(tmp_path / "out.txt"))


@pytest.mark.slow
def test_cli_labels_a_folder(run, tmp_path):
    output = str(tmp_path / "labels.csv")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "imcl_tf.predict", run["images_dir"],
                           f"--model={run['version_dir']}", "--top_k=2", f"--output={output}"],
                          capture_output=True, text=True, cwd=str(tmp_path), env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith(os.path.join(run["images_dir"], "img0.jpg"))
    assert all(line.count(",") == 1 for line in lines)  # two classes each
    with open(output) as f:
        assert len(list(csv.reader(f))) == 1 + 4 * 2
    assert done.stderr.strip().splitlines() == [f"wrote 4 images' labels to {output}"]


def test_load_model_of_a_run_and_of_a_keras_file(run):
    import imcl_tf

    images = np.random.default_rng(1).uniform(0, 255, [2, IMAGE_SIZE, IMAGE_SIZE, 3]).astype(
        np.float32)
    expected = keras.ops.convert_to_numpy(run["model"](images, training=False))
    for path in (run["model_dir"], os.path.join(run["model_dir"], models.BEST_MODEL)):
        loaded = imcl_tf.load_model(path)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(images, training=False)),
                                   expected, atol=1e-5)

"""Tests of imcl_tf.evaluate on a tiny on-disk dataset and two tiny saved runs.

Every number written by the evaluation is recomputed here with plain NumPy loops from the
models' own predictions; unknown labels must never count as negatives.
"""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from imcl_tf import data, evaluate, metrics, models

CLASS_NAMES = ["cat", "dog", "car", "tree", "sky", "boat"]
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 16
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- Fixtures: a tiny dataset and two tiny runs --------------------------------------------------


def _train_labels(rng, num_images):
    """Training rows: class c positive with a probability growing with c, 30% unknown."""
    rows = np.where(rng.random([num_images, NUM_CLASSES]) < np.linspace(0.1, 0.7, NUM_CLASSES),
                    1.0, -1.0)
    rows[rng.random(rows.shape) < 0.3] = 0.0
    return rows.astype(np.float32)


def _test_labels(rng, num_images):
    """Test rows with unknowns; class 5 has no known positive, class 4 no known negative."""
    rows = np.where(rng.random([num_images, NUM_CLASSES]) < 0.4, 1.0, -1.0)
    rows[:, 4] = 1.0
    rows[:, 5] = -1.0
    rows[rng.random(rows.shape) < 0.3] = 0.0
    rows[0, :4] = [1.0, -1.0, 1.0, -1.0]  # classes 0-3 keep both kinds whatever the draw
    rows[1, :4] = [-1.0, 1.0, -1.0, 1.0]
    return rows.astype(np.float32)


def _write_split(data_dir, split, labels, rng):
    with data.SplitWriter(data_dir, split, num_shards=2) as writer:
        for index, row in enumerate(labels):
            pixels = rng.integers(0, 256, [IMAGE_SIZE, IMAGE_SIZE, 3], dtype=np.uint8)
            png = tf.io.encode_png(pixels).numpy()
            writer.write(data.make_example(f"{split}-{index:03d}", np.flatnonzero(row > 0),
                                           np.flatnonzero(row < 0), NUM_CLASSES, png))
    return writer.split_info


def _write_run(model_dir, seed, class_names=CLASS_NAMES):
    import keras

    keras.utils.set_random_seed(seed)
    model = models.IMCLModel(len(class_names), input_shape_=(IMAGE_SIZE, IMAGE_SIZE, 3),
                             backbone="small_cnn", method="logistic")
    models.write_model_info(model_dir, {"class_names": list(class_names), "input_mode": "image",
                                        "image_size": IMAGE_SIZE, "feature_dim": None})
    models.save_model_file(model, os.path.join(model_dir, models.BEST_MODEL))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A dataset (train 40, test 30 images in 2 shards each) and two runs with different weights."""
    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(7)
    data_dir = str(root / "data")
    train_labels = _train_labels(rng, 40)
    test_labels = _test_labels(rng, 30)
    splits = {"train": _write_split(data_dir, "train", train_labels, rng),
              "test": _write_split(data_dir, "test", test_labels, rng)}
    data.save_dataset_info(data_dir, data.DatasetInfo(class_names=CLASS_NAMES, splits=splits,
                                                      image_size=IMAGE_SIZE))
    model_dir, baseline_dir = str(root / "imcl"), str(root / "logistic")
    _write_run(model_dir, seed=1)
    _write_run(baseline_dir, seed=2)
    return {"root": root, "data_dir": data_dir, "model_dir": model_dir,
            "baseline_dir": baseline_dir, "train_labels": train_labels}


def _reference_predictions(model_dir, data_dir):
    """The run's probabilities on the test split, computed here, keyed by image-id hash."""
    model, _ = models.load_model_dir(model_dir)
    images, labels, ids = data.load_split_arrays(data_dir, "test", image_size=IMAGE_SIZE)
    scores = tf.sigmoid(model(images, training=False)).numpy().astype(np.float64)
    return scores, labels, ids


@pytest.fixture(scope="module")
def evaluated(setup):
    """evaluate_model_dir with a baseline (default 10 groups > 6 classes) and the references."""
    output_dir = str(setup["root"] / "eval_lib")
    result = evaluate.evaluate_model_dir(setup["model_dir"], setup["data_dir"], split="test",
                                         output_dir=output_dir,
                                         baseline_model_dir=setup["baseline_dir"])
    model_ref = _reference_predictions(setup["model_dir"], setup["data_dir"])
    baseline_ref = _reference_predictions(setup["baseline_dir"], setup["data_dir"])
    return {"result": result, "output_dir": output_dir, "model": model_ref,
            "baseline": baseline_ref}


# ---- NumPy references ----------------------------------------------------------------------------


def reference_ap(scores, labels):
    """Mean precision at the rank of every known positive (no ties in these tests); NaN when the
    known entries lack a positive or a negative."""
    known = labels != 0
    kept_scores, kept_labels = scores[known], labels[known]
    if not (kept_labels > 0).any() or not (kept_labels < 0).any():
        return float("nan")
    order = np.argsort(-kept_scores)
    hits, precisions = 0, []
    for rank, index in enumerate(order, start=1):
        if kept_labels[index] > 0:
            hits += 1
            precisions.append(hits / rank)
    return float(np.mean(precisions))


def reference_prf(scores, labels, threshold=None, top_k=None):
    num_images, num_classes = scores.shape
    predicted = np.zeros(scores.shape, bool)
    for i in range(num_images):
        for c in range(num_classes):
            if top_k is None:
                predicted[i, c] = scores[i, c] >= threshold
            else:
                predicted[i, c] = np.sum(scores[i] > scores[i, c]) < top_k
    tp = fp = fn = 0
    precisions, recalls = [], []
    for c in range(num_classes):
        class_tp = class_fp = class_fn = 0
        for i in range(num_images):
            if labels[i, c] > 0 and predicted[i, c]:
                class_tp += 1
            elif labels[i, c] < 0 and predicted[i, c]:
                class_fp += 1
            elif labels[i, c] > 0:
                class_fn += 1
        tp, fp, fn = tp + class_tp, fp + class_fp, fn + class_fn
        if class_tp + class_fn > 0:
            precisions.append(class_tp / (class_tp + class_fp) if class_tp + class_fp else 0.0)
            recalls.append(class_tp / (class_tp + class_fn))
    cp, cr = np.mean(precisions), np.mean(recalls)
    op, overall_recall = tp / (tp + fp) if tp + fp else 0.0, tp / (tp + fn)
    return {"CP": cp, "CR": cr, "CF1": 2 * cp * cr / (cp + cr) if cp + cr else 0.0,
            "OP": op, "OR": overall_recall,
            "OF1": 2 * op * overall_recall / (op + overall_recall) if op + overall_recall else 0.0}


def reference_metrics(scores, labels):
    ap = np.array([reference_ap(scores[:, c], labels[:, c]) for c in range(labels.shape[1])])
    positives, negatives = (labels > 0).sum(0), (labels < 0).sum(0)
    official = np.array([ap[c] if not np.isnan(ap[c]) else (1.0 if positives[c] else 0.0)
                         for c in range(labels.shape[1])])
    weights = positives + negatives
    out = {"mAP": np.nanmean(ap), "mAP_all_classes": official.mean(),
           "mAP_label_weighted": (official * weights).sum() / weights.sum(),
           "num_valid_classes": int((~np.isnan(ap)).sum()), "num_images": labels.shape[0],
           "num_classes": labels.shape[1], "known_ratio": np.mean(labels != 0)}
    for suffix, rule in (("@0.5", {"threshold": 0.5}), ("@top3", {"top_k": 3})):
        for name, value in reference_prf(scores, labels, **rule).items():
            out[name + suffix] = value
    return out, ap


def reference_groups(counts, delta, num_groups):
    """Classes sorted by ascending count (stable), cut into nearly equal groups (the first ones
    larger); mean of the finite deltas of each group."""
    order = sorted(range(len(counts)), key=lambda c: (counts[c], c))
    sizes = [len(order) // num_groups + (1 if g < len(order) % num_groups else 0)
             for g in range(num_groups)]
    groups, start = [], 0
    for size in sizes:
        members = order[start:start + size]
        finite = [delta[c] for c in members if not np.isnan(delta[c])]
        groups.append((members, np.mean(finite) if finite else float("nan")))
        start += size
    return groups


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _number(text):
    return float("nan") if text == "" else float(text)


# ---- Tests ---------------------------------------------------------------------------------------


def test_compute_metrics_matches_numpy_reference_on_random_inputs(rng):
    scores = rng.random([25, 7])
    labels = rng.choice([-1.0, 0.0, 1.0], size=[25, 7], p=[0.45, 0.3, 0.25])
    labels[:, 6] = np.where(labels[:, 6] > 0, -1.0, labels[:, 6])  # a class without positives
    got = evaluate.compute_metrics(scores, labels)
    want, _ = reference_metrics(scores, labels)
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


def test_compute_metrics_ignores_unknown_labels(rng):
    scores = rng.random([20, 4])
    labels = rng.choice([-1.0, 1.0], size=[20, 4])
    labels[:2] = [[1, -1, 1, -1], [-1, 1, -1, 1]]
    unknown = rng.random([20, 4]) < 0.3
    # Changing the scores of unknown entries must change nothing.
    moved = np.where(unknown, 1.0 - scores, scores)
    masked = np.where(unknown, 0.0, labels)
    first = evaluate.compute_metrics(scores, masked)
    second = evaluate.compute_metrics(moved, masked)
    for key in ("mAP", "mAP_all_classes", "mAP_label_weighted", "CP@0.5", "OF1@0.5"):
        assert first[key] == pytest.approx(second[key]), key
    assert first["known_ratio"] == pytest.approx(1.0 - unknown.mean())


def test_training_positive_counts(setup):
    counts = evaluate.training_positive_counts(setup["data_dir"], "train")
    np.testing.assert_array_equal(counts, (setup["train_labels"] > 0).sum(axis=0))
    assert counts.dtype == np.int64


def test_predict_split_in_dataset_order(setup, evaluated):
    model, _ = models.load_model_dir(setup["model_dir"])
    scores, labels, ids = evaluate.predict_split(model, setup["data_dir"], "test", batch_size=7)
    ref_scores, ref_labels, ref_ids = evaluated["model"]
    assert scores.dtype == np.float32 and scores.shape == (30, NUM_CLASSES)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(labels, ref_labels)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)


def test_metrics_json_matches_reference(evaluated, setup):
    with open(os.path.join(evaluated["output_dir"], evaluate.METRICS_JSON)) as f:
        written = json.load(f)
    scores, labels, _ = evaluated["model"]
    want, _ = reference_metrics(scores, labels)
    base_scores, base_labels, _ = evaluated["baseline"]
    want_base, _ = reference_metrics(base_scores, base_labels)
    for key, value in want.items():
        assert written[key] == pytest.approx(value, abs=1e-6), key
        assert written["baseline"][key] == pytest.approx(want_base[key], abs=1e-6), key
    for key in ("mAP", "mAP_all_classes", "mAP_label_weighted"):
        assert written["delta"][key] == pytest.approx(want[key] - want_base[key], abs=1e-6)
    assert written["num_valid_classes"] == 4  # class 4 has no known negative, class 5 no positive
    assert written["model_dir"] == setup["model_dir"]
    assert written["baseline"]["model_dir"] == setup["baseline_dir"]
    assert (written["split"], written["checkpoint"]) == ("test", "best")
    assert written["date"].endswith("Z")
    assert written["files"]["metrics_json"].endswith(evaluate.METRICS_JSON)
    assert evaluated["result"]["mAP"] == pytest.approx(written["mAP"])
    assert not [n for n in os.listdir(evaluated["output_dir"]) if ".tmp" in n]


def test_per_class_csv(evaluated, setup):
    rows = _read_csv(os.path.join(evaluated["output_dir"], evaluate.PER_CLASS_AP_CSV))
    scores, labels, _ = evaluated["model"]
    _, ap = reference_metrics(scores, labels)
    _, base_ap = reference_metrics(*evaluated["baseline"][:2])
    train_positives = (setup["train_labels"] > 0).sum(axis=0)
    assert [row["class_name"] for row in rows] == CLASS_NAMES
    for c, row in enumerate(rows):
        assert int(row["class_index"]) == c
        np.testing.assert_allclose(_number(row["ap"]), ap[c], atol=1e-6)
        np.testing.assert_allclose(_number(row["baseline_ap"]), base_ap[c], atol=1e-6)
        np.testing.assert_allclose(_number(row["ap_delta"]), ap[c] - base_ap[c], atol=1e-6)
        assert int(row["known_positives"]) == (labels[:, c] > 0).sum()
        assert int(row["known_negatives"]) == (labels[:, c] < 0).sum()
        assert int(row["training_positives"]) == train_positives[c]
    assert rows[5]["ap"] == "" and rows[4]["ap"] == ""  # undefined AP is left empty


def _check_groups(output_dir, evaluated, setup, num_groups):
    rows = _read_csv(os.path.join(output_dir, evaluate.FREQUENCY_GROUPS_CSV))
    _, ap = reference_metrics(*evaluated["model"][:2])
    _, base_ap = reference_metrics(*evaluated["baseline"][:2])
    train_labels = setup["train_labels"]
    counts = (train_labels > 0).sum(axis=0)
    groups = reference_groups(counts, ap - base_ap, num_groups)
    assert len(rows) == num_groups
    for row, (members, mean_delta) in zip(rows, groups):
        assert int(row["num_classes"]) == len(members)
        assert int(row["training_positives"]) == counts[members].sum()
        assert int(row["training_images"]) == (train_labels[:, members] > 0).any(axis=1).sum()
        np.testing.assert_allclose(_number(row["mean_ap_delta"]), mean_delta, atol=1e-6)
    with open(os.path.join(output_dir, evaluate.FREQUENCY_GROUPS_PNG), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_frequency_groups_fewer_classes_than_groups(evaluated, setup):
    groups = evaluated["result"]["frequency_groups"]
    assert (groups["num_groups_requested"], groups["num_groups"]) == (10, NUM_CLASSES)
    assert "only 6 classes" in groups["note"]
    _check_groups(evaluated["output_dir"], evaluated, setup, NUM_CLASSES)


@pytest.mark.parametrize("methods, names, baseline_name", [
    (("imcl", "logistic"), ("IMCL", "Logistic"), None),
    (("logistic", "logistic"), ("Logistic", "Logistic (control)"), None),
    ((None, None), ("model", "baseline"), None),  # runs written before the method was recorded
    # A logistic baseline trained on for the run's extra steps is the control, when told so.
    (("imcl", "logistic"), ("IMCL", "Logistic (control)"), "Logistic (control)"),
])
def test_frequency_chart_names_the_real_methods(setup, tmp_path, monkeypatch, methods, names,
                                                baseline_name):
    runs = []
    for index, method in enumerate(methods):
        run_dir = str(tmp_path / f"run{index}")
        _write_run(run_dir, seed=index + 1)
        if method is not None:
            info = models.read_model_info(run_dir)
            models.write_model_info(run_dir, {**info, "method": method})
        runs.append(run_dir)
    drawn = []
    real_plot = metrics.plot_frequency_groups

    def watched_plot(groups, path, method_name, baseline_name):
        drawn.append((method_name, baseline_name))
        return real_plot(groups, path, method_name, baseline_name)

    monkeypatch.setattr(metrics, "plot_frequency_groups", watched_plot)
    evaluate.evaluate_model_dir(runs[0], setup["data_dir"], baseline_model_dir=runs[1],
                                output_dir=str(tmp_path / "eval"), batch_size=16,
                                baseline_name=baseline_name)
    assert drawn == [names]


@pytest.mark.slow
def test_cli_prints_summary_and_writes_files(evaluated, setup):
    output_dir = str(setup["root"] / "eval_cli")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(
        [sys.executable, "-m", "imcl_tf.evaluate", f"--model_dir={setup['model_dir']}",
         f"--data_dir={setup['data_dir']}", "--split=test", f"--output_dir={output_dir}",
         f"--baseline_model_dir={setup['baseline_dir']}", "--num_groups=3", "--batch_size=8"],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = completed.stdout
    for text in ("mAP (all classes, official)", "mAP (known-label weighted)", "CF1@0.5",
                 "OF1@0.5", "baseline", "delta", os.path.join(output_dir, "metrics.json"),
                 os.path.join(output_dir, "frequency_groups.png")):
        assert text in out, text
    with open(os.path.join(output_dir, evaluate.METRICS_JSON)) as f:
        written = json.load(f)
    assert written["mAP"] == pytest.approx(evaluated["result"]["mAP"], abs=1e-6)
    assert f"{100 * written['mAP']:.2f}" in out
    _check_groups(output_dir, evaluated, setup, 3)


def test_class_name_mismatch_is_reported(setup, tmp_path):
    renamed = str(tmp_path / "renamed")
    shutil.copytree(setup["model_dir"], renamed)
    names = list(CLASS_NAMES)
    names[2] = "truck"
    models.write_model_info(renamed, {"class_names": names, "input_mode": "image",
                                      "image_size": IMAGE_SIZE, "feature_dim": None})
    with pytest.raises(evaluate.EvaluationError,
                       match=r"class 2 is 'truck' in the model but 'car'"):
        evaluate.evaluate_model_dir(renamed, setup["data_dir"], output_dir=str(tmp_path / "out"))

    fewer = str(tmp_path / "fewer")
    _write_run(fewer, seed=3, class_names=CLASS_NAMES[:4])
    with pytest.raises(evaluate.EvaluationError, match=r"model has 4 classes, the dataset 6"):
        evaluate.evaluate_model_dir(fewer, setup["data_dir"], output_dir=str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_missing_split_and_folders_are_reported(setup, tmp_path):
    with pytest.raises(evaluate.EvaluationError,
                       match=r"split 'validation' is not in .*'test', 'train'"):
        evaluate.evaluate_model_dir(setup["model_dir"], setup["data_dir"], split="validation")
    with pytest.raises(evaluate.EvaluationError, match=r"model_dir .*nowhere.* does not exist"):
        evaluate.evaluate_model_dir(str(tmp_path / "nowhere"), setup["data_dir"])
    with pytest.raises(evaluate.EvaluationError, match=r"--data_dir .*nodata.* does not exist"):
        evaluate.evaluate_model_dir(setup["model_dir"], str(tmp_path / "nodata"))


def test_features_dataset_without_train_split(tmp_path, rng):
    """Features mode end to end; without a train split the counts are blank and no groups made."""
    import keras

    dim, names = 8, ["a", "b", "c"]
    labels = rng.choice([-1.0, 0.0, 1.0], size=[12, 3], p=[0.4, 0.2, 0.4]).astype(np.float32)
    labels[:2] = [[1, -1, 1], [-1, 1, -1]]
    embeddings = rng.normal(size=[12, dim]).astype(np.float32)
    data_dir = str(tmp_path / "features")
    with data.SplitWriter(data_dir, "test", num_shards=1) as writer:
        for index, (row, embedding) in enumerate(zip(labels, embeddings)):
            writer.write(data.make_example(f"f{index}", np.flatnonzero(row > 0),
                                           np.flatnonzero(row < 0), 3, embedding=embedding))
    data.save_dataset_info(data_dir, data.DatasetInfo(
        class_names=names, splits={"test": writer.split_info}, mode="features", embedding_dim=dim))
    run_dirs = []
    for seed in (4, 5):
        keras.utils.set_random_seed(seed)
        model = models.IMCLModel(3, input_shape_=(dim,), backbone="features", method="logistic")
        run_dirs.append(str(tmp_path / f"run{seed}"))
        models.write_model_info(run_dirs[-1], {"class_names": names, "input_mode": "features",
                                               "image_size": None, "feature_dim": dim})
        models.save_model_file(model, os.path.join(run_dirs[-1], models.BEST_MODEL))

    result = evaluate.evaluate_model_dir(run_dirs[0], data_dir, baseline_model_dir=run_dirs[1],
                                         num_groups=2)
    assert result["files"]["metrics_json"] == os.path.join(run_dirs[0], "eval", "test",
                                                           evaluate.METRICS_JSON)
    scores = tf.sigmoid(models.load_model_dir(run_dirs[0])[0](embeddings)).numpy()
    want, ap = reference_metrics(scores.astype(np.float64), labels)
    for key, value in want.items():
        assert result[key] == pytest.approx(value, abs=1e-6), key
    assert result["train_split"] is None
    assert result["frequency_groups"]["num_groups"] == 0
    assert "no 'train' split" in result["frequency_groups"]["note"]
    assert not os.path.exists(os.path.join(run_dirs[0], "eval", "test",
                                           evaluate.FREQUENCY_GROUPS_CSV))
    rows = _read_csv(result["files"]["per_class_ap_csv"])
    assert [row["training_positives"] for row in rows] == ["", "", ""]
    np.testing.assert_allclose([_number(row["ap"]) for row in rows], ap, atol=1e-6)

    # A features model cannot be evaluated on an image dataset.
    wrong = str(tmp_path / "wrong_mode")
    shutil.copytree(run_dirs[0], wrong)
    models.write_model_info(wrong, {"class_names": CLASS_NAMES, "input_mode": "features",
                                    "image_size": None, "feature_dim": dim})
    image_data = str(tmp_path / "images")
    with data.SplitWriter(image_data, "test", num_shards=1) as writer:
        png = tf.io.encode_png(np.zeros([IMAGE_SIZE, IMAGE_SIZE, 3], np.uint8)).numpy()
        writer.write(data.make_example("i0", [0], [1], NUM_CLASSES, png))
    data.save_dataset_info(image_data, data.DatasetInfo(
        class_names=CLASS_NAMES, splits={"test": writer.split_info}, image_size=IMAGE_SIZE))
    with pytest.raises(evaluate.EvaluationError, match=r"takes 'features' inputs but .* 'image'"):
        evaluate.evaluate_model_dir(wrong, image_data)

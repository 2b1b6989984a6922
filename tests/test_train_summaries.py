"""Tests of what a training run shows in TensorBoard beyond scalars, piece by piece.

The class choices, the per-class AP table, the pictures, the curated hparams and the validation
pass (scores and validation losses) are each checked against a plain implementation written
here; the event files they write are read back. The whole run's TensorBoard is checked in
test_train_run.py.
"""

import re

import numpy as np
import pytest
import tensorflow as tf

from imcl_tf import losses, methods, metrics, models
from imcl_tf.label_graph import LabelGraph, normalize_graph
from imcl_tf.training import class_choice, figures, hparams, summaries
from imcl_tf.training.config import TrainConfig
from imcl_tf.training.split_reading import count_split_labels, read_split_labels
from imcl_tf.training.validation import ValidationPass
from test_train_common import read_events, write_dataset

# ---- class choice --------------------------------------------------------------------------------


def test_parse_class_list_takes_names_and_indices_in_order():
    names = ["cat", "dog", "7", "bird"]
    assert class_choice.parse_class_list("dog, 3,cat", names) == [1, 3, 0]
    assert class_choice.parse_class_list("7", names) == [2]  # a name wins over an index
    assert class_choice.parse_class_list("1,dog,,1", names) == [1]  # repeats count once
    for bad in ("horse", "4", "-1", "1.5"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            class_choice.parse_class_list(f"cat,{bad}", names)


def test_frequency_extremes_and_most_frequent_match_a_plain_sort(rng):
    counts = rng.integers(0, 6, size=23)  # many ties
    ranked = sorted(range(23), key=lambda c: (-counts[c], c))  # most frequent, lower index first
    assert class_choice.frequency_extremes(counts, 4) == ranked[:4] + ranked[-4:]
    assert class_choice.frequency_extremes(counts[:7], 4) == sorted(
        range(7), key=lambda c: (-counts[c], c))
    np.testing.assert_array_equal(class_choice.most_frequent(counts, 5), sorted(ranked[:5]))
    np.testing.assert_array_equal(class_choice.most_frequent(counts, 23), np.arange(23))


def test_count_split_labels_matches_the_label_rows(tmp_path):
    data_dir = write_dataset(str(tmp_path / "d"), num_train=13, num_val=4, num_shards=3)
    rows, _ = read_split_labels(data_dir, "train")
    positives, known, count = count_split_labels(data_dir, "train")
    np.testing.assert_array_equal(positives, (rows > 0).sum(0))
    np.testing.assert_array_equal(known, (rows != 0).sum(0))
    assert count == 13 and (known < 13).any()  # partial labels: some entries unknown


# ---- per-class AP table --------------------------------------------------------------------------


def table_rows(markdown):
    """The body rows of a markdown table as lists of cells (header and rule skipped)."""
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows[2:]]


def test_ap_table_lists_every_class_best_first_with_its_counts(rng):
    num_classes = 9
    scores = rng.random([40, num_classes])
    labels = rng.choice([-1.0, 0.0, 1.0], size=[40, num_classes])
    labels[:, 4] = -1.0  # no positive: no AP
    ap = metrics.per_class_ap(scores, labels)
    control = ap + rng.normal(scale=0.05, size=num_classes)
    train = rng.integers(0, 50, size=num_classes)
    names = [f"c{c}" for c in range(num_classes)]
    names[2] = "a|b"  # a pipe must not split the cell
    rows = table_rows(summaries.ap_table_markdown(ap, labels, names, train, control))
    assert len(rows) == num_classes and all(len(row) == 8 for row in rows)
    finite = [c for c in range(num_classes) if np.isfinite(ap[c])]
    expected = sorted(finite, key=lambda c: (-ap[c], c)) + [4]
    assert [int(row[2]) for row in rows] == expected
    assert [int(row[0]) for row in rows] == list(range(1, num_classes + 1))
    for row in rows:
        c = int(row[2])
        assert row[1] == names[c].replace("|", "\\|")
        assert int(row[4]) == int((labels[:, c] > 0).sum()) and int(row[5]) == train[c]
        if c == 4:
            assert row[3] == "-" and row[7] == "-"
        else:
            assert float(row[3]) == pytest.approx(ap[c], abs=5e-5)
            assert float(row[7]) == pytest.approx(ap[c] - control[c], abs=5e-5)


def test_ap_table_of_many_classes_shows_the_best_and_the_worst(rng):
    ap = rng.random(30)
    labels = np.ones([2, 30])
    rows = table_rows(summaries.ap_table_markdown(ap, labels, [str(c) for c in range(30)],
                                                  np.zeros(30, int), max_rows=8))
    order = np.argsort(-ap)
    assert [int(row[2]) for row in rows[:4]] == order[:4].tolist()
    assert rows[4][:2] == ["...", "22 classes not shown"]
    assert [int(row[2]) for row in rows[5:]] == order[-4:].tolist()
    assert [int(row[0]) for row in rows[5:]] == [27, 28, 29, 30]


# ---- writers -------------------------------------------------------------------------------------


def test_pr_curves_of_chosen_classes_only(tmp_path, rng):
    scores = rng.random([20, 1200])
    labels = rng.choice([-1.0, 1.0], size=[20, 1200])
    names = [f"n{c}" for c in range(1200)]
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        summaries.write_pr_curves(scores, labels, names, step=3, classes=[1100, 7])
    writer.close()
    events = read_events(str(tmp_path))
    assert sorted(events) == ["pr_curve/0007_n7/pr_curves", "pr_curve/1100_n1100/pr_curves"]
    [(step, tensor)] = events["pr_curve/1100_n1100/pr_curves"]
    positive = labels[:, 1100] > 0
    assert step == 3 and tensor[0, 0] == positive.sum()  # threshold 0: every positive is found


def test_label_graph_heat_map_shows_the_most_frequent_labels(tmp_path, rng, monkeypatch):
    size = 12
    matrix = normalize_graph(rng.random([size, size]) * (rng.random([size, size]) < 0.3))
    layer = LabelGraph(matrix)
    counts = rng.permutation(size) * 3
    drawn = {}

    def heatmap(current, initial, names, note):
        drawn.update(current=current, initial=initial, names=names, note=note)
        return np.zeros([10, 20, 4], np.uint8)

    monkeypatch.setattr(figures, "label_graph_heatmap", heatmap)
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        summaries.write_label_graph(layer, [f"l{c}" for c in range(size)], counts, step=5,
                                    limit=4)
    writer.close()
    shown = np.sort(np.argsort(-counts)[:4])
    np.testing.assert_array_equal(drawn["current"], matrix[np.ix_(shown, shown)])
    np.testing.assert_array_equal(drawn["initial"], matrix[np.ix_(shown, shown)])
    assert drawn["names"] == [f"l{c}" for c in shown] and "4 most frequent of 12" in drawn["note"]
    [(step, image)] = read_events(str(tmp_path))["label_graph/heat_map"]
    assert step == 5 and image[:2].tolist() == [b"20", b"10"]  # width, height, PNG


def test_pictures_are_rgba_images(rng):
    current = rng.random([6, 6]).astype(np.float32)
    picture = figures.label_graph_heatmap(current, current * 0.5, list("abcdef"), "all 6 labels")
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 4
    single = figures.label_graph_heatmap(current, None, list("abcdef"), "all 6 labels")
    assert single.shape[1] < picture.shape[1]  # one panel instead of two
    images = rng.integers(0, 255, [5, 16, 16, 3]).astype(np.float32)
    labels = rng.choice([-1.0, 0.0, 1.0], size=[5, 4])
    grid = figures.prediction_grid(images, labels, rng.random([5, 4]), ["a", "b", "c", "d"])
    assert grid.dtype == np.uint8 and grid.shape[2] == 4 and grid.shape[0] > 200


# ---- hparams -------------------------------------------------------------------------------------


def test_curated_hparams_keep_what_matters_and_only_what_the_method_uses():
    config = TrainConfig(data_dir="somewhere/coco_partial", model_dir="runs/x", method="imcl",
                         label_graph="graphs/coco.npy", warm_start="runs/logistic")
    values = hparams.curated_hparams(
        config, train_steps=500, image_size=224, known_ratio=0.123456,
        resolved={"dictionary_size": 80, "lambda_y": 0.7, "lambda_f": 0.01})
    assert not {"model_dir", "verbose", "data_dir", "log_every", "export_dir"} & set(values)
    assert set(values) <= set(hparams.COMMON_OPTIONS + hparams.method_hparams() + hparams.RESOLVED)
    assert values["dataset"] == "coco_partial" and values["label_graph"] == "coco.npy"
    assert values["known_ratio"] == 0.1235 and values["train_steps"] == 500
    assert values["warm_started"] is True and values["dictionary_size"] == 80
    assert values["resolved_lambda_y"] == 0.7 and values["k"] == config.k
    assert all(isinstance(value, (bool, int, float, str)) for value in values.values())
    logistic = hparams.curated_hparams(
        TrainConfig(data_dir="d", model_dir="m", method="logistic"), train_steps=5,
        image_size=None, known_ratio=1.0, resolved={})
    assert not set(methods.get("imcl").HPARAMS) & set(logistic) and "image_size" not in logistic


def test_comparison_names_are_the_real_methods():
    assert metrics.comparison_names("imcl", "logistic") == ("IMCL", "Logistic")
    assert metrics.comparison_names("logistic", "logistic") == ("Logistic",
                                                                "Logistic (control)")
    assert metrics.comparison_names("logistic", "imcl") == ("Logistic", "IMCL")


# ---- the validation pass -------------------------------------------------------------------------


def numpy_masked_bce(labels, logits):
    """Sum of the BCE over known entries of the whole split / their number (plain NumPy)."""
    total, known = 0.0, 0
    for row, logit_row in zip(labels, logits):
        for label, logit in zip(row, logit_row):
            if label == 0:
                continue
            probability = 1.0 / (1.0 + np.exp(-float(logit)))
            total -= np.log(probability) if label > 0 else np.log(1.0 - probability)
            known += 1
    return total / known


def features_dataset(rng, num, dim, num_classes, batch_size):
    inputs = rng.normal(size=[num, dim]).astype(np.float32)
    labels = rng.choice([-1.0, 0.0, 1.0], size=[num, num_classes], p=[0.4, 0.3, 0.3])
    labels = labels.astype(np.float32)
    ids = rng.integers(1, 2 ** 40, size=num)
    dataset = tf.data.Dataset.from_tensor_slices((inputs, labels, ids)).batch(batch_size)
    return inputs, labels, ids, dataset


def test_validation_pass_scores_and_bce_of_a_logistic_model(rng):
    model = models.IMCLModel(num_classes=4, input_shape_=(5,), backbone="features",
                             method="logistic")
    model.head.kernel.assign(rng.normal(scale=2.0, size=[5, 4]).astype(np.float32))
    inputs, labels, _, dataset = features_dataset(rng, 23, 5, 4, batch_size=6)  # 6+6+6+5
    result = ValidationPass(model)(dataset)
    logits = model(inputs).numpy()
    np.testing.assert_allclose(result["scores"], 1.0 / (1.0 + np.exp(-logits)), rtol=1e-6)
    np.testing.assert_array_equal(result["labels"], labels)
    assert set(result["losses"]) == {"bce"} and result["images"] is None
    np.testing.assert_allclose(result["losses"]["bce"], numpy_masked_bce(labels, logits),
                               rtol=1e-5)


def test_validation_pass_smoothness_losses_are_image_means_over_the_split(rng):
    dim, num_classes = 4, 3
    model = models.IMCLModel(num_classes=num_classes, input_shape_=(dim,), backbone="features",
                             method="imcl", dictionary_size=6, k=2, omp_jit_compile=False)
    bank_inputs, bank_labels, bank_ids, _ = features_dataset(rng, 6, dim, num_classes, 6)
    model.method.fill_bank(bank_inputs, bank_labels, bank_ids)
    inputs, labels, ids, dataset = features_dataset(rng, 11, dim, num_classes, batch_size=4)
    result = ValidationPass(model, num_images=3)(dataset)
    sums = {"loss_y": 0.0, "loss_f": 0.0}
    for start in range(0, 11, 4):  # the same batches, each batch mean weighted by its size
        batch = slice(start, start + 4)
        terms = model._loss_terms(inputs[batch], labels[batch], ids[batch], training=False)
        for name in sums:
            sums[name] += float(terms[name]) * len(inputs[batch])
    for name in sums:
        np.testing.assert_allclose(result["losses"][name], sums[name] / 11, rtol=1e-5)
    assert result["losses"]["loss_y"] > 0 and result["losses"]["loss_f"] > 0
    np.testing.assert_allclose(result["losses"]["bce"],
                               numpy_masked_bce(labels, model(inputs).numpy()), rtol=1e-5)
    np.testing.assert_array_equal(result["images"], inputs[:3])  # the first inputs, kept
    bce_only = losses.masked_bce(labels, model(inputs))  # the same reduction as training's
    np.testing.assert_allclose(result["losses"]["bce"], float(bce_only), rtol=1e-5)

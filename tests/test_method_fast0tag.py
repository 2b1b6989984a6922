"""Fast0Tag (imcl_tf/methods/fast0tag.py): the ranking loss against a NumPy loop, the embedding
file's checks, the scores, and the method in the model, saved, trained and exported."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from imcl_tf.methods import fast0tag
from imcl_tf.methods.base import Batch
from method_checks import (bare_model, fit_save_reload, fit_under_mixed_precision,
                           run_warm_started_resumed_and_exported)
from test_cli_mistakes import assert_one_line_error, cli
from test_train_common import write_features_dataset


def reference_loss(labels, scores):
    """The loss of the module docstring, written as plain loops over images and pairs."""
    per_image = []
    for row, s in zip(labels, scores):
        positives = [p for p in range(len(row)) if row[p] > 0]
        negatives = [n for n in range(len(row)) if row[n] < 0]
        if not positives or not negatives:
            continue  # no pair: not counted
        total = 0.0
        for p in positives:
            for n in negatives:
                total += np.log1p(np.exp(s[n] - s[p]))
        per_image.append(total / (len(positives) * len(negatives)))
    return float(np.mean(per_image)) if per_image else 0.0


def random_rows(rng, batch=7, num_classes=6):
    labels = rng.choice([-1.0, 0.0, 1.0], size=(batch, num_classes))
    labels[0] = 0
    labels[0, :2] = 1  # no known negative
    labels[1] = np.where(np.arange(num_classes) % 2 == 0, -1, 0)  # no known positive
    labels[2] = 0  # all unknown
    labels[3] = -1
    labels[3, 0] = 1  # one positive
    return labels


def test_ranking_loss_matches_numpy(rng):
    for _ in range(5):
        labels = random_rows(rng)
        scores = rng.normal(scale=3.0, size=labels.shape)
        got = float(fast0tag.fast0tag_ranking_loss(labels, scores))
        np.testing.assert_allclose(got, reference_loss(labels, scores), rtol=1e-5)


def test_rows_without_pairs_are_not_counted(rng):
    labels = random_rows(rng)
    scores = rng.normal(size=labels.shape)
    full = float(fast0tag.fast0tag_ranking_loss(labels, scores))
    paired = float(fast0tag.fast0tag_ranking_loss(labels[3:], scores[3:]))
    assert full == pytest.approx(paired, rel=1e-6)  # rows 0-2 have no pair: same mean


def test_batch_without_pairs_gives_zero_and_finite_gradients():
    labels = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 0.0, -1.0]])
    scores = tf.Variable(tf.zeros([3, 3]))
    with tf.GradientTape() as tape:
        loss = fast0tag.fast0tag_ranking_loss(labels, scores)
    gradient = tape.gradient(loss, scores)
    assert float(loss) == 0.0
    assert np.all(np.isfinite(gradient.numpy())) and not np.any(gradient.numpy())
    empty = fast0tag.fast0tag_ranking_loss(np.zeros([0, 3]), np.zeros([0, 3]))
    assert float(empty) == 0.0


def test_gradient_raises_positives_lowers_negatives_and_leaves_unknowns():
    labels = np.array([[1.0, -1.0, 0.0, -1.0]])
    scores = tf.Variable([[0.5, 0.2, 3.0, -1.0]])
    with tf.GradientTape() as tape:
        loss = fast0tag.fast0tag_ranking_loss(labels, scores)
    gradient = tape.gradient(loss, scores).numpy()[0]
    assert gradient[0] < 0 and gradient[1] > 0 and gradient[3] > 0  # descent: up, down, down
    assert gradient[2] == 0.0  # unknown: in no pair


def test_large_margins_stay_finite():
    labels = np.array([[1.0, -1.0]])
    for scores, expected in (([[-500.0, 500.0]], 1000.0), ([[500.0, -500.0]], 0.0)):
        assert float(fast0tag.fast0tag_ranking_loss(labels, scores)) == pytest.approx(expected)


# ---- the embedding file ------------------------------------------------------------------------


def save(tmp_path, array, name="e.npy"):
    path = str(tmp_path / name)
    np.save(path, array)
    return path


def test_embeddings_are_read_and_normalised(tmp_path, rng):
    vectors = rng.normal(size=(5, 3)) * np.arange(1, 6)[:, None]
    path = save(tmp_path, vectors)
    unit = fast0tag.load_label_embeddings(path, 5)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(unit * np.linalg.norm(vectors, axis=1, keepdims=True), vectors,
                               rtol=1e-5)
    raw = fast0tag.load_label_embeddings(path, 5, normalize=False)
    assert raw.dtype == np.float32
    np.testing.assert_allclose(raw, vectors, rtol=1e-6)


@pytest.mark.parametrize("make,fragments", [
    (lambda tmp: "", ["--fast0tag_embeddings is required", "[L, d]",
                      "dataset.json's class order"]),
    (lambda tmp: str(tmp / "missing.npy"), ["no such file", "[5, d]"]),
    (lambda tmp: save(tmp, np.zeros((4, 3)) + 1), ["shape [4, 3]", "[5, d]"]),
    (lambda tmp: save(tmp, np.ones(5)), ["shape [5]", "[5, d]"]),
    (lambda tmp: save(tmp, np.array([[1.0, np.nan]] * 5)), ["5 non-finite", "row 0"]),
    (lambda tmp: save(tmp, np.array([[1.0, 1.0]] * 4 + [[0.0, np.inf]])),
     ["1 non-finite", "row 4"]),
    (lambda tmp: save(tmp, np.array([[1.0, 1.0]] * 2 + [[0.0, 0.0]] * 3)),
     ["row 2 is all zeros", "--nofast0tag_normalize"]),
    (lambda tmp: save(tmp, np.array([["a", "b"]] * 5)), ["values of type", "real numbers"]),
])
def test_bad_embeddings_are_refused_naming_the_flag(tmp_path, make, fragments):
    with pytest.raises(ValueError) as error:
        fast0tag.Fast0Tag(5, fast0tag_embeddings=make(tmp_path))
    message = str(error.value)
    assert message.startswith("--fast0tag_embeddings")
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_a_file_that_is_not_npy_is_refused(tmp_path):
    path = tmp_path / "vectors.txt"
    path.write_text("0.1 0.2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not a NumPy .npy array"):
        fast0tag.load_label_embeddings(str(path), 5)


def test_bad_hidden_units_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--fast0tag_hidden_units: must be an integer >= 1"):
        fast0tag.Fast0Tag(5, fast0tag_embeddings=save(tmp_path, np.ones((5, 2))),
                          fast0tag_hidden_units=0)


# ---- the method on its own ---------------------------------------------------------------------


def attached(tmp_path, rng, num_classes=5, dim=3, feature_dim=6, normalize=True):
    vectors = rng.normal(size=(num_classes, dim))
    method = fast0tag.Fast0Tag(num_classes, fast0tag_embeddings=save(tmp_path, vectors),
                               fast0tag_hidden_units=4, fast0tag_normalize=normalize)
    method.attach(bare_model(feature_dim))
    return method, vectors


def test_scores_are_the_direction_times_the_fixed_vectors(tmp_path, rng):
    method, vectors = attached(tmp_path, rng, normalize=False)
    features = rng.normal(size=(4, 6)).astype(np.float32)
    direction = method.principal_direction(features).numpy()
    assert direction.shape == (4, 3)
    np.testing.assert_allclose(method.logits(None, features).numpy(), direction @ vectors.T,
                               rtol=1e-5, atol=1e-6)
    assert not method.label_embeddings.trainable
    trainable = {v.path for v in method.trainable_variables}
    assert len(trainable) == 4 and not any("label_embeddings" in p for p in trainable)


def test_loss_terms_train_the_mlp_only(tmp_path, rng):
    method, _ = attached(tmp_path, rng)
    labels = random_rows(rng, batch=7, num_classes=5)
    batch = Batch(inputs=None, labels=tf.constant(labels, tf.float32), ids=None,
                  features=tf.constant(rng.normal(size=(7, 6)), tf.float32))
    before = method.label_embeddings.numpy().copy()
    with tf.GradientTape() as tape:
        terms = method.loss_terms(None, batch, training=True)
    assert set(terms) == {"loss", "rank"} == {"loss", *fast0tag.Fast0Tag.TERMS}
    expected = reference_loss(labels, method.logits(None, batch.features).numpy())
    assert float(terms["loss"]) == pytest.approx(expected, rel=1e-5)
    gradients = tape.gradient(terms["loss"], method.trainable_variables)
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in gradients)
    assert any(np.any(g.numpy()) for g in gradients)
    np.testing.assert_array_equal(method.label_embeddings.numpy(), before)


def test_config_rebuilds_without_the_file(tmp_path, rng):
    method, _ = attached(tmp_path, rng)
    config = method.get_config()
    assert "fast0tag_embeddings" not in config and config["embedding_dim"] == 3
    (tmp_path / "e.npy").unlink()  # a saved model must not need it
    rebuilt = fast0tag.Fast0Tag(**config)
    rebuilt.attach(bare_model(6))
    assert rebuilt.label_embeddings.shape == (5, 3)


# ---- in the model and the training application -------------------------------------------------


def test_model_fits_saves_and_reloads_without_the_file(tmp_path, rng):
    path = save(tmp_path, rng.normal(size=(5, 4)))
    _, model, reloaded, _ = fit_save_reload(tmp_path, "fast0tag",
                                            {"fast0tag_embeddings": path,
                                             "fast0tag_hidden_units": 8}, "rank")
    (tmp_path / "e.npy").unlink()  # the vectors travel in the model, not by the file
    again = keras.saving.load_model(str(tmp_path / "model.keras"), compile=False)
    np.testing.assert_array_equal(again.method.label_embeddings.numpy(),
                                  model.method.label_embeddings.numpy())
    np.testing.assert_allclose(np.linalg.norm(again.method.label_embeddings.numpy(), axis=1), 1.0,
                               rtol=1e-6)
    assert "fast0tag_embeddings" not in reloaded.get_config()["method_options"]


def test_mixed_precision_keeps_the_scores_float32(tmp_path, rng):
    fit_under_mixed_precision("fast0tag", {"fast0tag_embeddings": save(
        tmp_path, rng.normal(size=(5, 4))), "fast0tag_hidden_units": 8}, "rank")


@pytest.mark.slow
def test_run_warm_starts_logs_its_term_resumes_and_exports(tmp_path, rng):
    path = save(tmp_path, rng.normal(size=(5, 4)))
    _, _, model = run_warm_started_resumed_and_exported(
        tmp_path, "fast0tag", {"fast0tag_embeddings": path, "fast0tag_hidden_units": 8}, "rank")
    assert model.method.hidden_units == 8


@pytest.mark.slow
def test_cli_without_the_embeddings_is_one_line(tmp_path):
    data_dir = write_features_dataset(str(tmp_path / "data"), num_train=8)
    done = cli("imcl-train", "--method=fast0tag", "--backbone=features", f"--data_dir={data_dir}",
               f"--model_dir={tmp_path / 'run'}", "--val_split=", "--train_steps=1",
               cwd=str(tmp_path))
    assert_one_line_error(done, "imcl-train", "--fast0tag_embeddings: is required",
                          "[L, d]", "dataset.json's class order")
    done = cli("imcl-train", "--method=fast0tag", "--backbone=features", f"--data_dir={data_dir}",
               f"--model_dir={tmp_path / 'run'}", "--val_split=", "--train_steps=1",
               f"--fast0tag_embeddings={tmp_path / 'none.npy'}", cwd=str(tmp_path))
    assert_one_line_error(done, "imcl-train", "--fast0tag_embeddings=", "no such file", "[5, d]")

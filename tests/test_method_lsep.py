"""Tests of the LSEP method (imcl_tf.methods.lsep) against a plain NumPy reference written here."""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from imcl_tf import methods
from imcl_tf.methods.base import Batch
from imcl_tf.methods.lsep import LSEP, lsep_loss, sample_lsep_pairs
import method_checks


def known_pairs(row):
    positives = np.flatnonzero(row > 0)
    negatives = np.flatnonzero(row < 0)
    return [(v, u) for v in positives for u in negatives]


def reference_lsep(logits, labels, pairs=None):
    """Mean over images with a pair of log(1 + sum_(v, u) exp(f_u - f_v)), in float64 loops.

    With `pairs` (positive, negative) [B, t], an image with more than t known pairs uses those
    t pairs instead of all of them.
    """
    logits = logits.astype(np.float64)
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        row_pairs = known_pairs(labels[b])
        if not row_pairs:
            continue
        if pairs is not None and len(row_pairs) > pairs[0].shape[1]:
            row_pairs = list(zip(pairs[0][b], pairs[1][b]))
        # log(1 + sum exp(d)) = logaddexp(0, logsumexp(d)), exact for large logits too.
        differences = np.array([logits[b, u] - logits[b, v] for v, u in row_pairs])
        top = differences.max()
        total += np.logaddexp(0.0, top + np.log(np.exp(differences - top).sum()))
        count += 1
    return total / count if count else 0.0


def gradient(logits, labels, **kwargs):
    logits = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = lsep_loss(logits, labels, **kwargs)
    return loss, tape.gradient(loss, logits).numpy()


# ---- every pair ---------------------------------------------------------------------------------


def test_every_pair_matches_the_reference(rng):
    labels = method_checks.ranking_rows(rng, 9, 7)
    logits = rng.normal(scale=2.0, size=labels.shape).astype(np.float32)
    expected = reference_lsep(logits, labels)
    assert expected > 0
    assert float(lsep_loss(logits, labels)) == pytest.approx(expected, abs=1e-5)


def test_every_pair_is_stable_for_large_logits(rng):
    """Differences of several hundred: exp would overflow float32, the log-sum-exp does not."""
    labels = method_checks.ranking_rows(rng, 6, 8)
    logits = rng.normal(scale=150.0, size=labels.shape).astype(np.float32)
    loss = float(lsep_loss(logits, labels))
    assert np.isfinite(loss)
    assert loss == pytest.approx(reference_lsep(logits, labels), rel=1e-5)


def test_rows_without_a_pair_give_zero_and_do_not_count(rng):
    labels = method_checks.ranking_rows(rng, 6, 5)
    logits = rng.normal(size=labels.shape).astype(np.float32)
    # Only row 3 (and any other row with a pair) counts; rows 0-2 change nothing.
    with_pairs = [b for b in range(6) if known_pairs(labels[b])]
    assert 0 not in with_pairs and 1 not in with_pairs and 2 not in with_pairs
    assert float(lsep_loss(logits, labels)) == pytest.approx(
        float(lsep_loss(logits[with_pairs], labels[with_pairs])), abs=1e-6)


@pytest.mark.parametrize("max_pairs", [0, 3])
def test_a_batch_without_any_pair_gives_zero_not_nan(max_pairs):
    labels = np.array([[1, 1, 0, 0], [-1, 0, -1, 0], [0, 0, 0, 0]], np.float32)
    logits = np.array([[3, -2, 1, 0], [4, 0, -5, 1], [0, 1, 2, 3]], np.float32)
    loss, grad = gradient(logits, labels, max_pairs=max_pairs)
    assert float(loss) == 0.0
    assert np.all(grad == 0.0)


@pytest.mark.parametrize("max_pairs", [0, 2])
def test_gradients_are_finite_and_only_reach_known_labels_of_rows_with_a_pair(rng, max_pairs):
    labels = method_checks.ranking_rows(rng, 8, 6)
    logits = rng.normal(scale=3.0, size=labels.shape).astype(np.float32)
    _, grad = gradient(logits, labels, max_pairs=max_pairs, seed=1)
    assert np.all(np.isfinite(grad))
    has_pair = np.array([bool(known_pairs(row)) for row in labels])
    # Unknown entries, and every entry of a row without a pair, get exactly zero.
    assert np.all(grad[labels == 0] == 0.0)
    assert np.all(grad[~has_pair] == 0.0)
    # With every pair each known entry of a row with a pair is in some pair: pushed down
    # (negatives, positive gradient) or up (positives, negative gradient).
    if max_pairs == 0:
        rows = has_pair[:, None]
        assert np.all(grad[rows & (labels < 0)] > 0)
        assert np.all(grad[rows & (labels > 0)] < 0)
    else:
        assert np.any(grad != 0.0)


def test_gradient_matches_the_analytic_one(rng):
    """d l / d f_u = softmax weight of the pairs through u, over the images that count."""
    labels = method_checks.ranking_rows(rng, 5, 4)
    logits = rng.normal(size=labels.shape).astype(np.float32)
    _, grad = gradient(logits, labels)
    expected = np.zeros(labels.shape)
    counted = [b for b in range(5) if known_pairs(labels[b])]
    for b in counted:
        pairs = known_pairs(labels[b])
        terms = np.array([np.exp(float(logits[b, u]) - float(logits[b, v])) for v, u in pairs])
        for (v, u), term in zip(pairs, terms):
            share = term / (1.0 + terms.sum()) / len(counted)
            expected[b, u] += share
            expected[b, v] -= share
    np.testing.assert_allclose(grad, expected, atol=1e-6)


def test_works_in_a_graph_with_an_unknown_batch_size(rng):
    labels = method_checks.ranking_rows(rng, 7, 5)
    logits = rng.normal(size=labels.shape).astype(np.float32)
    spec = tf.TensorSpec([None, 5], tf.float32)

    @tf.function(input_signature=[spec, spec])
    def sampled(f, y):
        return lsep_loss(f, y, max_pairs=2)

    @tf.function(input_signature=[spec, spec])
    def exact(f, y):
        return lsep_loss(f, y)

    assert float(exact(logits, labels)) == pytest.approx(reference_lsep(logits, labels), abs=1e-5)
    assert np.isfinite(float(sampled(logits, labels)))


# ---- negative sampling --------------------------------------------------------------------------


def test_max_pairs_at_least_every_row_count_gives_the_exact_value(rng):
    labels = method_checks.ranking_rows(rng, 8, 7)
    logits = rng.normal(scale=2.0, size=labels.shape).astype(np.float32)
    most = max(len(known_pairs(row)) for row in labels)
    assert most > 2
    exact = float(lsep_loss(logits, labels))
    for max_pairs in (most, most + 5):
        assert float(lsep_loss(logits, labels, max_pairs=max_pairs)) == pytest.approx(
            exact, abs=1e-6)
    # Fewer pairs than some row has: a different value.
    assert float(lsep_loss(logits, labels, max_pairs=1)) != pytest.approx(exact, abs=1e-3)


def test_a_row_with_more_pairs_uses_exactly_max_pairs_of_them():
    """Every pair has the same difference d: a row with n pairs gives log(1 + min(n, t) e^d)."""
    labels = np.array([[1, 1, -1, -1, -1, 0],    # 6 pairs
                       [1, -1, -1, 0, 0, 0],     # 2 pairs
                       [0, -1, 1, 1, 1, -1]], np.float32)  # 6 pairs
    d = 0.7
    logits = np.where(labels < 0, d, 0.0).astype(np.float32)
    for max_pairs in (1, 2, 4, 5):
        expected = np.mean([np.log1p(min(n, max_pairs) * np.exp(d)) for n in (6, 2, 6)])
        assert float(lsep_loss(logits, labels, max_pairs=max_pairs)) == pytest.approx(
            expected, abs=1e-5), max_pairs


def test_sampled_pairs_are_known_pairs_and_the_loss_is_theirs(rng):
    labels = method_checks.ranking_rows(rng, 10, 8)
    logits = rng.normal(scale=2.0, size=labels.shape).astype(np.float32)
    max_pairs = 3
    positive, negative = (p.numpy() for p in sample_lsep_pairs(labels, max_pairs, seed=5))
    assert positive.shape == negative.shape == (10, max_pairs)
    sampled_rows = 0
    for b in range(10):
        if known_pairs(labels[b]):
            assert np.all(labels[b, positive[b]] == 1.0)
            assert np.all(labels[b, negative[b]] == -1.0)
            sampled_rows += len(known_pairs(labels[b])) > max_pairs
    assert sampled_rows >= 3
    loss = lsep_loss(logits, labels, max_pairs=max_pairs, pairs=(positive, negative))
    assert float(loss) == pytest.approx(reference_lsep(logits, labels, (positive, negative)),
                                        abs=1e-5)


def test_sampled_pairs_are_uniform_over_positives_times_negatives():
    """2 positives x 3 negatives: each of the 6 pairs about 1/6 of the draws (and none other)."""
    row = np.array([0, 1, -1, 0, -1, 1, -1, 0], np.float32)
    positive, negative = sample_lsep_pairs(np.tile(row, (4000, 1)), 5, seed=11)
    pairs = np.stack([positive.numpy().ravel(), negative.numpy().ravel()], axis=1)
    found, counts = np.unique(pairs, axis=0, return_counts=True)
    assert sorted(map(tuple, found)) == sorted(known_pairs(row))
    # 20000 draws: 1/6 is 3333 +- 53; a skewed or dependent draw is off by far more than 5 %.
    np.testing.assert_allclose(counts / pairs.shape[0], 1 / 6, rtol=0.05)


def test_the_draw_follows_the_global_seed(rng):
    method_checks.assert_the_draw_follows_the_global_seed(
        rng, lambda logits, labels: lsep_loss(logits, labels, max_pairs=2))


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_input_is_refused_with_a_clear_error():
    logits = np.zeros([2, 3], np.float32)
    with pytest.raises(ValueError, match="same shape"):
        lsep_loss(logits, np.zeros([2, 4], np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\+1 \(present\)"):
        lsep_loss(logits, np.array([[2, 0, -1], [0, 0, 0]], np.float32))
    with pytest.raises(ValueError, match="--lsep_max_pairs"):
        lsep_loss(logits, np.zeros([2, 3], np.float32), max_pairs=-1)
    with pytest.raises(ValueError, match="max_pairs=2"):
        lsep_loss(logits, np.zeros([2, 3], np.float32), max_pairs=2,
                  pairs=(np.zeros([2, 3], np.int32), np.zeros([2, 3], np.int32)))
    with pytest.raises(ValueError, match="--lsep_max_pairs"):
        LSEP(3, lsep_max_pairs=-2)
    with pytest.raises(ValueError, match="--lsep_max_pairs"):
        LSEP(3, lsep_max_pairs=1.5)


# ---- the method ---------------------------------------------------------------------------------


def test_the_registry_names_the_method_and_its_option():
    assert methods.get("lsep") is LSEP
    assert [option.name for option in methods.options("lsep")] == ["lsep_max_pairs"]
    assert methods.options("lsep")[0].default == 0


def test_the_method_config_round_trips():
    method = LSEP(4, lsep_max_pairs=7)
    rebuilt = LSEP.from_config(method.get_config())
    assert (rebuilt.num_classes, rebuilt.lsep_max_pairs) == (4, 7)


def test_loss_terms_are_the_loss_on_the_head_logits(rng):
    labels = method_checks.ranking_rows(rng, 6, 5)
    features = rng.normal(size=(6, 3)).astype(np.float32)
    head = keras.layers.Dense(5)
    model = types.SimpleNamespace(head=head)
    method = LSEP(5)
    terms = method.loss_terms(model, Batch(inputs=features, labels=tf.constant(labels),
                                           ids=tf.zeros([6], tf.int64),
                                           features=tf.constant(features)), training=True)
    assert set(terms) == {"loss", *LSEP.TERMS}
    logits = head(features).numpy()
    assert float(terms["loss"]) == pytest.approx(reference_lsep(logits, labels), abs=1e-5)
    assert float(terms["lsep"]) == float(terms["loss"])


# ---- in the model and in a run ------------------------------------------------------------------


@pytest.mark.parametrize("max_pairs", [0, 3])
def test_the_model_trains_saves_and_reloads_with_lsep(tmp_path, max_pairs):
    history, _, reloaded, _ = method_checks.fit_save_reload(
        tmp_path, "lsep", {"lsep_max_pairs": max_pairs}, "lsep", epochs=8)
    assert reloaded.method.lsep_max_pairs == max_pairs
    assert history["lsep"][-1] < history["lsep"][0]


def test_a_run_warm_starts_logs_its_terms_resumes_and_exports(tmp_path):
    first, second, model = method_checks.run_warm_started_resumed_and_exported(
        tmp_path, "lsep", {"lsep_max_pairs": 4}, "lsep")
    assert first["final_train_logs"]["lsep"] == pytest.approx(first["final_train_logs"]["loss"])
    assert (model.method.NAME, model.method.lsep_max_pairs) == ("lsep", 4)
    saved = keras.models.load_model(second["files"]["latest_model"], compile=False)
    assert (saved.method.NAME, saved.method.lsep_max_pairs) == ("lsep", 4)

"""Tests of the WSABIE method (imcl_tf.methods.wsabie): the WARP loss against a NumPy reference."""

import itertools
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from imcl_tf import methods
from imcl_tf.methods.base import Batch
from imcl_tf.methods.wsabie import WSABIE, warp_loss
import method_checks


def harmonic(k):
    return sum(1.0 / j for j in range(1, k + 1))


def reference_warp(logits, labels, order):
    """WARP by the paper's loop, the negatives tried in `order`; also the loss's gradient.

    Returns (loss, gradient [B, L], tries of each (image, positive) pair: None for no violator).
    """
    logits = logits.astype(np.float64)
    total, count = 0.0, 0
    grad = np.zeros(labels.shape)
    tries_seen = []
    for b in range(labels.shape[0]):
        negatives = [c for c in order[b] if labels[b, c] < 0]
        if not negatives:
            continue
        for y in np.flatnonzero(labels[b] > 0):
            count += 1
            tries = None
            for i, u in enumerate(negatives):
                if logits[b, u] > logits[b, y] - 1.0:
                    tries = i + 1
                    break
            tries_seen.append(tries)
            if tries is None:
                continue
            weight = harmonic(len(negatives) // tries)
            total += weight * (1.0 - logits[b, y] + logits[b, u])
            grad[b, y] -= weight
            grad[b, u] += weight
    if not count:
        return 0.0, grad, tries_seen
    return total / count, grad / count, tries_seen


def random_orders(rng, batch, num_classes):
    return np.stack([rng.permutation(num_classes) for _ in range(batch)]).astype(np.int32)


def loss_and_gradient(logits, labels, **kwargs):
    logits = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(logits)
        loss = warp_loss(logits, labels, **kwargs)
    return float(loss), tape.gradient(loss, logits).numpy()


# ---- a given order ------------------------------------------------------------------------------


def test_matches_the_reference_loop_for_the_same_order(rng):
    labels = method_checks.ranking_rows(rng, 12, 9, known_negative=0.45)
    logits = rng.normal(scale=1.5, size=labels.shape).astype(np.float32)
    order = random_orders(rng, 12, 9)
    expected, expected_grad, tries = reference_warp(logits, labels, order)
    # The case covers violators found at once, found later, and none at all.
    assert 1 in tries and any(t is not None and t > 1 for t in tries) and None in tries
    loss, grad = loss_and_gradient(logits, labels, order=order)
    assert loss == pytest.approx(expected, abs=1e-5)
    # No gradient through the rank weight: exactly -L(rank) at f_y, +L(rank) at f_u.
    np.testing.assert_allclose(grad, expected_grad, atol=1e-6)


def test_gradients_are_finite_and_zero_on_unknown_labels_and_skipped_rows(rng):
    labels = method_checks.ranking_rows(rng, 8, 7, known_negative=0.45)
    logits = rng.normal(scale=2.0, size=labels.shape).astype(np.float32)
    _, grad = loss_and_gradient(logits, labels)
    assert np.all(np.isfinite(grad))
    assert np.all(grad[labels == 0] == 0.0)
    assert np.all(grad[:3] == 0.0)  # no known positive, no known negative, nothing known
    assert np.any(grad != 0.0)


def test_a_batch_without_any_pair_gives_zero_not_nan():
    labels = np.array([[1, 1, 0], [-1, 0, -1], [0, 0, 0]], np.float32)
    logits = np.array([[3, -2, 1], [4, 0, -5], [0, 1, 2]], np.float32)
    loss, grad = loss_and_gradient(logits, labels)
    assert loss == 0.0
    assert np.all(grad == 0.0)


def test_a_negative_exactly_at_the_margin_does_not_violate():
    """f_u = f_y - 1 is no violation: the next negative is, at the second try (rank 1)."""
    labels = np.array([[1, -1, -1]], np.float32)
    logits = np.array([[1.0, 0.0, 0.5]], np.float32)
    loss = float(warp_loss(logits, labels, order=[[0, 1, 2]]))
    assert loss == pytest.approx(reference_warp(logits, labels, [[0, 1, 2]])[0], abs=1e-6)
    assert loss == pytest.approx(harmonic(1) * (1 - 1.0 + 0.5), abs=1e-6)


# ---- the random order ---------------------------------------------------------------------------


def test_when_every_negative_violates_the_rank_is_their_number():
    """Equal negatives above every positive's margin: the first try violates, rank = N."""
    labels = np.array([[1, -1, -1, -1, 0, 1],
                       [-1, 1, -1, 0, 0, 0],
                       [-1, -1, -1, -1, -1, 1]], np.float32)
    logits = np.where(labels < 0, 2.0, np.where(labels > 0, [[0.5], [-1.0], [1.5]], 7.0))
    logits = logits.astype(np.float32)
    per_pair = [harmonic(3) * (1 - 0.5 + 2)] * 2 + [harmonic(2) * (1 + 1 + 2)] \
        + [harmonic(5) * (1 - 1.5 + 2)]
    assert warp_loss(logits, labels).numpy() == pytest.approx(np.mean(per_pair), abs=1e-5)


def test_when_no_negative_violates_the_loss_is_zero(rng):
    labels = method_checks.ranking_rows(rng, 6, 8, known_negative=0.45)
    # Known negatives at least a margin below every known positive; unknown ones far above.
    logits = np.where(labels > 0, 1.0, np.where(labels < 0, -0.5, 9.0)).astype(np.float32)
    loss, grad = loss_and_gradient(logits, labels)
    assert loss == 0.0
    assert np.all(grad == 0.0)


def test_the_default_order_is_uniformly_random():
    """One positive, four negatives: the mean over many images is the mean over all 24 orders.

    The fixed orders give values far from that mean, so an order that is not random (or not
    uniform) fails.
    """
    row = np.array([[1, -1, -1, 0, -1, -1]], np.float32)
    logits = np.array([[0.0, 0.5, -3.0, 5.0, -0.5, -2.0]], np.float32)
    values = [reference_warp(logits, row, [list(p)])[0]
              for p in itertools.permutations(range(6))]
    expectation, spread = np.mean(values), np.std(values)
    assert spread > 0.5
    copies = 4000
    tf.random.set_seed(0)
    loss = float(warp_loss(np.tile(logits, (copies, 1)), np.tile(row, (copies, 1))))
    assert loss == pytest.approx(expectation, abs=5 * spread / np.sqrt(copies))
    assert reference_warp(logits, row, [list(range(6))])[0] != pytest.approx(
        expectation, abs=10 * spread / np.sqrt(copies))


def test_the_draw_follows_the_global_seed(rng):
    method_checks.assert_the_draw_follows_the_global_seed(
        rng, lambda logits, labels: warp_loss(logits, labels))


def test_works_in_a_graph_with_an_unknown_batch_size(rng):
    labels = method_checks.ranking_rows(rng, 7, 5, known_negative=0.45)
    logits = rng.normal(scale=1.5, size=labels.shape).astype(np.float32)
    order = random_orders(rng, 7, 5)
    spec = tf.TensorSpec([None, 5], tf.float32)

    @tf.function(input_signature=[spec, spec, tf.TensorSpec([None, 5], tf.int32)])
    def given(f, y, o):
        return warp_loss(f, y, order=o)

    @tf.function(input_signature=[spec, spec])
    def drawn(f, y):
        return warp_loss(f, y)

    assert float(given(logits, labels, order)) == pytest.approx(
        reference_warp(logits, labels, order)[0], abs=1e-5)
    assert np.isfinite(float(drawn(logits, labels)))


# ---- bad input ----------------------------------------------------------------------------------


def test_bad_input_is_refused_with_a_clear_error():
    logits = np.zeros([2, 3], np.float32)
    labels = np.array([[1, -1, 0], [0, 0, -1]], np.float32)
    with pytest.raises(ValueError, match="same shape"):
        warp_loss(logits, np.zeros([2, 4], np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\+1 \(present\)"):
        warp_loss(logits, np.array([[0.5, 0, -1], [0, 0, 0]], np.float32))
    with pytest.raises(ValueError, match="order must be"):
        warp_loss(logits, labels, order=np.zeros([2, 4], np.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="permutation"):
        warp_loss(logits, labels, order=np.array([[0, 1, 1], [2, 1, 0]], np.int32))


# ---- the method ---------------------------------------------------------------------------------


def test_the_registry_names_the_method():
    assert methods.get("wsabie") is WSABIE
    assert methods.options("wsabie") == ()
    rebuilt = WSABIE.from_config(WSABIE(4).get_config())
    assert rebuilt.num_classes == 4


def test_loss_terms_are_the_loss_on_the_head_logits(rng):
    labels = method_checks.ranking_rows(rng, 6, 5, known_negative=0.45)
    features = rng.normal(size=(6, 3)).astype(np.float32)
    head = keras.layers.Dense(5, kernel_initializer=keras.initializers.RandomNormal(
        stddev=1.0, seed=2))
    model = types.SimpleNamespace(head=head)
    batch = Batch(inputs=features, labels=tf.constant(labels), ids=tf.zeros([6], tf.int64),
                  features=tf.constant(features))
    # The same global seed, the same order: loss_terms is warp_loss on the head's logits.
    tf.random.set_seed(1)
    terms = WSABIE(5).loss_terms(model, batch, training=True)
    assert set(terms) == {"loss", *WSABIE.TERMS}
    assert float(terms["warp"]) == float(terms["loss"])
    tf.random.set_seed(1)
    assert float(terms["loss"]) == pytest.approx(float(warp_loss(head(features), labels)),
                                                 abs=1e-6)


# ---- in the model and in a run ------------------------------------------------------------------


def test_the_model_trains_saves_and_reloads_with_wsabie(tmp_path):
    history, _, _, _ = method_checks.fit_save_reload(tmp_path, "wsabie", {}, "warp", epochs=8)
    assert history["warp"][-1] < history["warp"][0]


def test_a_run_warm_starts_logs_its_terms_resumes_and_exports(tmp_path):
    first, _, _ = method_checks.run_warm_started_resumed_and_exported(tmp_path, "wsabie", {},
                                                                      "warp")
    assert first["final_train_logs"]["warp"] == pytest.approx(first["final_train_logs"]["loss"])

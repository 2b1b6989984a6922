"""Tests of imcl_tf.losses against plain NumPy references written here."""

import logging

import numpy as np
import pytest
import tensorflow as tf

from imcl_tf import losses
from imcl_tf.label_graph import LabelGraph, normalize_graph


def random_labels(rng, shape, known_ratio=0.5):
    """Label rows in {+1, -1, 0} with about known_ratio known entries."""
    known = rng.random(shape) < known_ratio
    signs = np.where(rng.random(shape) < 0.4, 1.0, -1.0)
    return (known * signs).astype(np.float32)


# ---- masked BCE --------------------------------------------------------------------------------


def reference_masked_bce(labels, logits):
    labels = labels.astype(np.float64)
    logits = logits.astype(np.float64)
    probability = 1.0 / (1.0 + np.exp(-logits))
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for j in range(labels.shape[1]):
            if labels[b, j] == 0:
                continue
            target = 1.0 if labels[b, j] > 0 else 0.0
            total -= target * np.log(probability[b, j]) + (1 - target) * np.log(1 - probability[b, j])
            count += 1
    return total / count if count else 0.0


def test_masked_bce_matches_reference(rng):
    labels = random_labels(rng, (6, 9))
    logits = rng.normal(scale=3.0, size=(6, 9)).astype(np.float32)
    got = losses.masked_bce(labels, logits)
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), reference_masked_bce(labels, logits), rtol=1e-5)


def test_masked_bce_divides_by_known_count_of_the_whole_batch(rng):
    # One image with 1 known label, one with 3: per-image normalisation would weight them equally.
    labels = np.array([[1, 0, 0, 0], [-1, 1, -1, 0]], np.float32)
    logits = rng.normal(size=(2, 4)).astype(np.float32)
    per_entry, known = losses.masked_bce_per_entry(labels, logits)
    np.testing.assert_array_equal(known.numpy(), (labels != 0).astype(np.float32))
    np.testing.assert_array_equal(per_entry.numpy()[labels == 0], 0.0)
    np.testing.assert_allclose(losses.masked_bce(labels, logits).numpy(),
                               per_entry.numpy().sum() / 4.0, rtol=1e-6)


def test_masked_bce_without_known_entries_is_zero_with_zero_gradient():
    logits = tf.Variable(tf.fill([3, 5], 2.0))
    with tf.GradientTape() as tape:
        loss = losses.masked_bce(tf.zeros([3, 5]), logits)
    gradient = tape.gradient(loss, logits)
    assert loss.numpy() == 0.0
    np.testing.assert_array_equal(gradient.numpy(), 0.0)


def test_masked_bce_is_stable_for_extreme_logits():
    labels = np.array([[1, -1, 1, -1]], np.float32)
    logits = tf.Variable([[1e4, -1e4, -1e4, 1e4]], dtype=tf.float32)
    with tf.GradientTape() as tape:
        loss = losses.masked_bce(labels, logits)
    gradient = tape.gradient(loss, logits).numpy()
    # Two perfect entries (loss 0) and two entries wrong by 1e4 (loss 1e4 each): mean 5e3.
    np.testing.assert_allclose(loss.numpy(), 5e3, rtol=1e-6)
    assert np.all(np.isfinite(gradient))
    np.testing.assert_allclose(gradient, [[0.0, 0.0, -0.25, 0.25]], atol=1e-6)


def test_masked_bce_casts_half_precision_logits(rng):
    labels = random_labels(rng, (4, 6))
    logits = rng.normal(size=(4, 6)).astype(np.float16)
    got = losses.masked_bce(labels, tf.constant(logits))
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), reference_masked_bce(labels, logits.astype(np.float32)),
                               rtol=1e-5)


def test_masked_bce_rejects_bad_labels_and_shapes():
    with pytest.raises(tf.errors.InvalidArgumentError, match="masked_bce: labels must contain"):
        losses.masked_bce([[0.5, 1.0]], [[0.0, 0.0]])
    with pytest.raises(ValueError, match="labels and logits must have the same shape"):
        losses.masked_bce(tf.zeros([2, 3]), tf.zeros([2, 4]))


# ---- asymmetric tanh ---------------------------------------------------------------------------


def reference_asym_tanh(x, c):
    x = np.asarray(x, np.float64)
    return (np.exp(x) - np.exp(-x)) / (np.exp(x) + c * np.exp(-x))


@pytest.mark.parametrize("c", [1.0, 2.0, 3.7])
def test_asym_tanh_matches_reference(rng, c):
    x = rng.uniform(-15, 15, size=200).astype(np.float32)
    np.testing.assert_allclose(losses.asym_tanh(x, c).numpy(), reference_asym_tanh(x, c),
                               atol=2e-7, rtol=1e-5)


@pytest.mark.parametrize("c", [1.0, 2.0, 5.0])
def test_asym_tanh_zero_limits_and_slope(c):
    x = tf.Variable([0.0, 1e4, -1e4, 90.0, -90.0])
    with tf.GradientTape() as tape:
        y = losses.asym_tanh(x, c)
    gradient = tape.gradient(y, x).numpy()
    np.testing.assert_allclose(y.numpy(), [0.0, 1.0, -1.0 / c, 1.0, -1.0 / c], atol=1e-6)
    np.testing.assert_allclose(gradient[0], 2.0 / (1.0 + c), rtol=1e-5)
    assert np.all(np.isfinite(gradient))


def test_asym_tanh_with_c_one_is_tanh(rng):
    x = rng.normal(scale=4.0, size=100).astype(np.float32)
    np.testing.assert_allclose(losses.asym_tanh(x, 1.0).numpy(), np.tanh(x), atol=2e-7)


def test_asym_tanh_range_stays_inside_bounds(rng):
    c = 2.0
    y = losses.asym_tanh(rng.normal(scale=50.0, size=1000).astype(np.float32), c).numpy()
    assert y.min() >= -1.0 / c - 1e-7 and y.max() <= 1.0 + 1e-7


def test_asym_tanh_rejects_c_below_one():
    with pytest.raises(ValueError, match="c must be a finite number >= 1"):
        losses.asym_tanh(1.0, 0.5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="c must be >= 1"):
        losses.asym_tanh(1.0, tf.constant(0.5))


# ---- label states ------------------------------------------------------------------------------


def reference_query_states(logits, labels, c, a_max=10.0):
    unknown = 1.0 - np.abs(np.clip(labels, -1.0, 1.0))
    return unknown * reference_asym_tanh(logits, c) + np.clip(labels, -1.0 / c, a_max)


def test_query_label_states_matches_reference(rng):
    labels = random_labels(rng, (5, 8))
    labels[0, 3] = 10.0  # the CUB class-label weight a
    logits = rng.normal(scale=2.0, size=(5, 8)).astype(np.float32)
    got = losses.query_label_states(logits, labels, 2.0).numpy()
    np.testing.assert_allclose(got, reference_query_states(logits, labels, 2.0), atol=1e-6)
    # Observed positives -> 1 (or a), observed negatives -> -1/c, whatever the logits.
    np.testing.assert_array_equal(got[labels == 1], 1.0)
    np.testing.assert_array_equal(got[labels == -1], -0.5)
    assert got[0, 3] == 10.0


def test_atom_label_states_propagates_predictions_only(rng):
    num_labels, c = 7, 2.0
    labels = random_labels(rng, (4, num_labels))
    logits = rng.normal(size=(4, num_labels)).astype(np.float32)
    raw = rng.random((num_labels, num_labels)) * (rng.random((num_labels, num_labels)) < 0.5)
    graph = normalize_graph(raw)
    unknown = 1.0 - np.abs(labels)
    expected = unknown * (reference_asym_tanh(logits, c) @ graph) + np.clip(labels, -1.0 / c, 10)
    got = losses.atom_label_states(logits, labels, graph, c).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_array_equal(got[labels == 1], 1.0)
    np.testing.assert_array_equal(got[labels == -1], -1.0 / c)
    # A [B, k, L] batch of neighbours gives the same rows.
    stacked = losses.atom_label_states(logits.reshape(2, 2, num_labels),
                                       labels.reshape(2, 2, num_labels), graph, c).numpy()
    np.testing.assert_allclose(stacked.reshape(4, num_labels), expected, atol=1e-6)
    # Without a graph the atom states equal the query states.
    np.testing.assert_allclose(losses.atom_label_states(logits, labels, None, c).numpy(),
                               losses.query_label_states(logits, labels, c).numpy())


def test_atom_label_states_with_a_label_graph_layer_sends_gradient_to_its_support(rng):
    num_labels = 6
    raw = rng.random((num_labels, num_labels)) * (rng.random((num_labels, num_labels)) < 0.4)
    layer = LabelGraph(normalize_graph(raw))
    labels = random_labels(rng, (3, num_labels), known_ratio=0.3)
    logits = rng.normal(size=(3, num_labels)).astype(np.float32)
    with tf.GradientTape() as tape:
        states = losses.atom_label_states(logits, labels, layer, 2.0)
        total = tf.reduce_sum(states * rng.normal(size=(3, num_labels)).astype(np.float32))
    gradient = tape.gradient(total, layer.values).numpy()  # one entry per support position
    np.testing.assert_allclose(states.numpy(),
                               losses.atom_label_states(logits, labels, layer.matrix.numpy(),
                                                        2.0).numpy(), atol=1e-6)
    assert gradient.shape == (int(np.count_nonzero(layer.initial_matrix.numpy())),)
    assert np.any(gradient != 0)


@pytest.mark.parametrize("jit_compile", [True, False])
def test_bank_atom_label_states_match_reference_without_gradient(rng, jit_compile):
    num_labels, c = 9, 2.0
    labels = random_labels(rng, (6, num_labels)).astype(np.int8)  # a bank's int8 rows
    logits = rng.normal(scale=3.0, size=(6, num_labels)).astype(np.float32)
    raw = rng.random((num_labels, num_labels)) * (rng.random((num_labels, num_labels)) < 0.4)
    graph = normalize_graph(raw + np.eye(num_labels))
    unknown = 1.0 - np.abs(labels)
    observed = np.clip(labels, -1.0 / c, 10)
    for given, matrix in ((None, np.eye(num_labels)), (graph, graph),
                          (LabelGraph(graph).constant_product, graph)):
        expected = unknown * (reference_asym_tanh(logits, c) @ matrix) + observed
        logits_tensor = tf.constant(logits)
        with tf.GradientTape() as tape:
            tape.watch(logits_tensor)
            got = losses.bank_atom_label_states(logits_tensor, labels, given, c,
                                                jit_compile=jit_compile)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
        assert tape.gradient(got, logits_tensor) is None
    # Inside a tf.function, as the step calls it.
    fused = tf.function(lambda z, l: losses.bank_atom_label_states(z, l, graph, c,
                                                                   jit_compile=jit_compile))
    np.testing.assert_allclose(fused(logits, labels).numpy(),
                               unknown * (reference_asym_tanh(logits, c) @ graph) + observed,
                               atol=1e-6)
    with pytest.raises(ValueError, match="bank_atom_label_states: labels and logits must have "
                                         "the same shape"):
        losses.bank_atom_label_states(logits, labels[:, :-1], None, c, jit_compile=jit_compile)
    with pytest.raises(ValueError, match="asymmetry c must be a finite number >= 1"):
        losses.bank_atom_label_states(logits, labels, None, 0.5, jit_compile=jit_compile)


def test_label_states_reject_bad_values_and_shapes():
    with pytest.raises(tf.errors.InvalidArgumentError, match="query_label_states: labels must be"):
        losses.query_label_states([[0.0, 0.0]], [[0.5, 0.0]], 2.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="atom_label_states: labels must be"):
        losses.atom_label_states([[0.0, 0.0]], [[11.0, 0.0]], None, 2.0)
    with pytest.raises(ValueError, match="graph must be"):
        losses.atom_label_states(tf.zeros([2, 3]), tf.zeros([2, 3]), np.eye(4), 2.0)
    with pytest.raises(ValueError, match="same shape"):
        losses.query_label_states(tf.zeros([2, 3]), tf.zeros([3, 3]), 2.0)


# ---- smoothness losses -------------------------------------------------------------------------


def reference_smoothness(query_y, query_f, neighbor_y, neighbor_f, coef_y, coef_f, valid):
    batch = query_y.shape[0]
    total_y = total_f = 0.0
    for b in range(batch):
        residual_y = query_y[b].astype(np.float64).copy()
        residual_f = query_f[b].astype(np.float64).copy()
        for s in range(neighbor_y.shape[1]):
            if valid[b, s]:
                residual_y -= coef_y[b, s] * neighbor_y[b, s]
                residual_f -= coef_f[b, s] * neighbor_f[b, s]
        total_y += np.sum(residual_y ** 2)
        total_f += np.sum(residual_f ** 2)
    return total_y / batch, total_f / batch


def smoothness_inputs(rng, batch=4, slots=3, num_labels=6, dim=5):
    return dict(
        query_y=rng.normal(size=(batch, num_labels)).astype(np.float32),
        query_f=rng.normal(size=(batch, dim)).astype(np.float32),
        neighbor_y=rng.normal(size=(batch, slots, num_labels)).astype(np.float32),
        neighbor_f=rng.normal(size=(batch, slots, dim)).astype(np.float32),
        coef_y=rng.random((batch, slots)).astype(np.float32),
        coef_f=rng.random((batch, slots)).astype(np.float32),
        valid=rng.random((batch, slots)) < 0.6)


def test_smoothness_losses_match_reference(rng):
    inputs = smoothness_inputs(rng)
    loss_y, loss_f = losses.smoothness_losses(**inputs)
    expected_y, expected_f = reference_smoothness(**inputs)
    np.testing.assert_allclose([loss_y.numpy(), loss_f.numpy()], [expected_y, expected_f],
                               rtol=1e-5)
    per_y, per_f = losses.smoothness_losses(**inputs, per_example=True)
    assert per_y.shape == (4,) and per_f.shape == (4,)
    np.testing.assert_allclose([per_y.numpy().mean(), per_f.numpy().mean()],
                               [expected_y, expected_f], rtol=1e-5)


def test_smoothness_invalid_slots_are_ignored_even_with_nan(rng):
    inputs = smoothness_inputs(rng)
    expected = reference_smoothness(**inputs)
    invalid = ~inputs["valid"]
    for key in ("neighbor_y", "neighbor_f"):
        inputs[key][invalid] = np.nan
    for key in ("coef_y", "coef_f"):
        inputs[key][invalid] = np.inf
    got = losses.smoothness_losses(**inputs)
    np.testing.assert_allclose([got[0].numpy(), got[1].numpy()], expected, rtol=1e-5)


def test_smoothness_gradient_semantics(rng):
    inputs = smoothness_inputs(rng)
    variables = {key: tf.Variable(value) for key, value in inputs.items() if key != "valid"}
    with tf.GradientTape(persistent=True) as tape:
        loss_y, loss_f = losses.smoothness_losses(valid=inputs["valid"], **variables)
    # The OMP outputs are constants: no gradient reaches the coefficients.
    assert tape.gradient(loss_y, variables["coef_y"]) is None
    assert tape.gradient(loss_f, variables["coef_f"]) is None
    batch = inputs["query_y"].shape[0]
    valid = inputs["valid"]
    for side, loss in (("y", loss_y), ("f", loss_f)):
        query, neighbors = inputs[f"query_{side}"], inputs[f"neighbor_{side}"]
        coef = inputs[f"coef_{side}"]
        residual = query - np.einsum("bk,bkx->bx", coef * valid, neighbors)
        # d/dq ||r||^2 / B = 2 r / B and d/dn_s = -2 c_s r / B on valid slots, 0 on invalid ones.
        np.testing.assert_allclose(tape.gradient(loss, variables[f"query_{side}"]).numpy(),
                                   2.0 * residual / batch, rtol=1e-4, atol=1e-6)
        expected = -2.0 * (coef * valid)[..., None] * residual[:, None, :] / batch
        np.testing.assert_allclose(tape.gradient(loss, variables[f"neighbor_{side}"]).numpy(),
                                   expected, rtol=1e-4, atol=1e-6)


def test_smoothness_rejects_mismatched_shapes(rng):
    inputs = smoothness_inputs(rng)
    inputs["coef_y"] = inputs["coef_y"][:, :2]
    with pytest.raises(ValueError, match="coef_y must be"):
        losses.smoothness_losses(**inputs)
    inputs = smoothness_inputs(rng)
    inputs["neighbor_f"] = inputs["neighbor_f"][..., :3]
    with pytest.raises(ValueError, match="neighbor_f"):
        losses.smoothness_losses(**inputs)


# ---- lambda balancing --------------------------------------------------------------------------


def test_resolve_lambdas_loss_ratio_uses_means_over_batches(rng):
    loss_c = rng.random(5) + 0.1
    loss_y = rng.random(5) + 0.1
    loss_f = rng.random(5) + 0.1
    lambda_y, lambda_f = losses.resolve_lambdas("loss_ratio", list(loss_c), loss_y,
                                                tf.constant(loss_f), 0.5, 0.25)
    assert isinstance(lambda_y, float) and isinstance(lambda_f, float)
    np.testing.assert_allclose(lambda_y, 0.5 * loss_c.mean() / loss_y.mean(), rtol=1e-6)
    np.testing.assert_allclose(lambda_f, 0.25 * loss_c.mean() / loss_f.mean(), rtol=1e-6)


def test_resolve_lambdas_none_returns_multipliers():
    assert losses.resolve_lambdas("none", None, None, None, 2.0, 0.5) == (2.0, 0.5)


def test_resolve_lambdas_zero_denominator_gives_zero_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="imcl_tf.losses"):
        result = losses.resolve_lambdas("loss_ratio", 0.7, 0.0, 2.0, 1.0, 0.5)
    assert result == (0.0, 0.5 * 0.7 / 2.0)
    assert "mean L_y over the calibration batches is 0" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="imcl_tf.losses"):
        # A zero multiplier switches the term off without needing its loss.
        assert losses.resolve_lambdas("loss_ratio", 0.7, 1.4, 0.0, 1.0, 0.0) == (0.5, 0.0)
    assert caplog.text == ""


def test_resolve_lambdas_rejects_bad_input():
    with pytest.raises(ValueError, match="balance must be one of"):
        losses.resolve_lambdas("grad_norm", 1.0, 1.0, 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="loss_y must be finite"):
        losses.resolve_lambdas("loss_ratio", 1.0, [1.0, float("nan")], 1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="multiplier_f must be a finite number >= 0"):
        losses.resolve_lambdas("none", None, None, None, 1.0, -0.5)


def test_lambda_calibrator_matches_resolve_lambdas(rng):
    values = rng.random((4, 3)) + 0.05
    calibrator = losses.LambdaCalibrator()
    for loss_c, loss_y, loss_f in values:
        calibrator.update(tf.constant(loss_c), loss_y, loss_f)
    assert calibrator.num_batches == 4
    np.testing.assert_allclose(calibrator.means(), values.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(calibrator.resolve("loss_ratio", 1.0, 0.5),
                               losses.resolve_lambdas("loss_ratio", values[:, 0], values[:, 1],
                                                      values[:, 2], 1.0, 0.5), rtol=1e-12)
    with pytest.raises(ValueError, match="no batch was added"):
        losses.LambdaCalibrator().means()


# ---- compiled use ------------------------------------------------------------------------------


def test_losses_compile_with_xla_and_match_eager(rng):
    num_labels = 6
    layer = LabelGraph(normalize_graph(rng.random((num_labels, num_labels)) *
                                       (rng.random((num_labels, num_labels)) < 0.4)))
    labels = random_labels(rng, (4, num_labels))
    logits = rng.normal(size=(4, num_labels)).astype(np.float32)
    inputs = smoothness_inputs(rng, batch=4, num_labels=num_labels)

    def all_losses(logits, labels, asym_c):
        states = losses.query_label_states(logits, labels, asym_c)
        atoms = losses.atom_label_states(logits, labels, layer, asym_c)
        loss_y, loss_f = losses.smoothness_losses(states, inputs["query_f"], atoms[:, None, :] +
                                                  inputs["neighbor_y"], inputs["neighbor_f"],
                                                  inputs["coef_y"], inputs["coef_f"],
                                                  inputs["valid"])
        return losses.masked_bce(labels, logits), states, atoms, loss_y, loss_f

    eager = all_losses(logits, labels, 2.0)
    compiled = tf.function(all_losses, jit_compile=True)(logits, labels, tf.constant(2.0))
    for expected, got in zip(eager, compiled):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


# ---- the official variants ----------------------------------------------------------


def test_bce_unknown_as_negative_matches_reference(rng):
    """COCO's cross-entropy: every unknown entry a negative, the mean over all B x L entries."""
    labels = random_labels(rng, (5, 7), known_ratio=0.4)
    logits = rng.normal(scale=2.0, size=(5, 7)).astype(np.float32)
    expected = reference_masked_bce(np.where(labels == 0, -1.0, labels), logits)
    got = losses.masked_bce(labels, logits, unknown_as_negative=True)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    probability = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    targets = (labels > 0).astype(np.float64)
    by_hand = -np.mean(targets * np.log(probability) + (1 - targets) * np.log(1 - probability))
    np.testing.assert_allclose(got.numpy(), by_hand, rtol=1e-5)
    assert abs(got.numpy() - losses.masked_bce(labels, logits).numpy()) > 1e-3


def test_tanh_reconstruction_matches_reference(rng):
    """The paper's Eq. 3: y - tanh(sum_s c_s y~_s) on the label side, the feature side linear."""
    inputs = smoothness_inputs(rng)
    batch = inputs["query_y"].shape[0]
    expected_y = 0.0
    for b in range(batch):
        mixed = np.zeros(inputs["query_y"].shape[1])
        for s in range(inputs["neighbor_y"].shape[1]):
            if inputs["valid"][b, s]:
                mixed += inputs["coef_y"][b, s] * inputs["neighbor_y"][b, s].astype(np.float64)
        expected_y += np.sum((inputs["query_y"][b] - np.tanh(mixed)) ** 2)
    expected_y /= batch
    _, expected_f = reference_smoothness(**inputs)
    loss_y, loss_f = losses.smoothness_losses(**inputs, reconstruction="tanh")
    np.testing.assert_allclose([loss_y.numpy(), loss_f.numpy()], [expected_y, expected_f],
                               rtol=1e-5)
    with pytest.raises(ValueError, match="reconstruction must be one of"):
        losses.smoothness_losses(**inputs, reconstruction="sigmoid")

"""IMCL losses: partial (masked) BCE, label states, the prediction-smoothness loss, lambda balancing.

docs/method.md §1. Every function computes in float32, whatever
the dtype of its inputs (logits may be float16 under mixed precision), and returns float32.

Label rows use the dataset convention: +1 known present, -1 known absent, 0 unknown. Only the
label-state functions accept values above 1 (the CUB class-label augmentation `a`).
"""

from __future__ import annotations

import logging
import math
from typing import Iterable

import numpy as np
import tensorflow as tf

from imcl_tf.choices import BALANCE_MODES, RECONSTRUCTIONS

logger = logging.getLogger(__name__)


# ---- Partial binary cross-entropy (docs/method.md §1) -------------------------------------------


def masked_bce(labels, logits, unknown_as_negative: bool = False) -> tf.Tensor:
    """Binary cross-entropy over the KNOWN entries of a batch, float32 scalar.

    The reduction is the official one (TF1 SUM_BY_NONZERO_WEIGHTS): the sum of the per-entry losses
    over known entries divided by the number of known entries in the batch, not a per-image mean.
    A batch without any known entry gives 0 (never NaN).

    With `unknown_as_negative` every unknown entry counts as a negative and the mean is over all
    B x L entries: the official MS-COCO cross-entropy (docs/method.md §5), where unmentioned
    caption words are negatives for the cross-entropy while the smoothness loss keeps them unknown.

    Args:
      labels: [B, L] in {+1, -1, 0} (present, absent, unknown).
      logits: [B, L] classifier logits, any float dtype.
      unknown_as_negative: count unknown entries as known negatives.

    Example:
      >>> float(masked_bce([[1.0, 0.0, -1.0]], [[0.0, 5.0, 0.0]]))  # doctest: +ELLIPSIS
      0.6931...
    """
    per_entry, known = masked_bce_per_entry(labels, logits, unknown_as_negative)
    # [B, L] -> scalar; divide_no_nan turns 0 / 0 into 0 for a batch without known labels.
    return tf.math.divide_no_nan(tf.reduce_sum(per_entry), tf.reduce_sum(known))


def masked_bce_per_entry(labels, logits, unknown_as_negative: bool = False
                         ) -> tuple[tf.Tensor, tf.Tensor]:
    """Per-entry BCE and the known-entry mask, both float32 [B, L].

    The loss is 0 on unknown entries (with `unknown_as_negative`, every entry is known and the
    unknown ones are negatives). Under a distribution strategy, sum the first output and divide
    by the number of known entries summed over all replicas to get the global `masked_bce`.
    """
    labels = tf.convert_to_tensor(labels)
    logits = tf.cast(tf.convert_to_tensor(logits), tf.float32)
    labels = tf.cast(labels, tf.float32)
    _check_same_shape("masked_bce", "labels", labels, "logits", logits)
    with tf.control_dependencies([_assert_ternary("masked_bce", "labels", labels)]):
        known = tf.cast(tf.not_equal(labels, 0.0), tf.float32)  # [B, L]
    if unknown_as_negative:
        known = tf.ones_like(known)
    targets = tf.cast(labels > 0.0, tf.float32)  # [B, L], 1 for present, 0 otherwise
    # max(z, 0) - z t + log(1 + exp(-|z|)): stable for any logit magnitude.
    per_entry = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)
    return per_entry * known, known


# ---- Label states (docs/method.md §1) -----------------------------------------------------------


def asym_tanh(x, c) -> tf.Tensor:
    """Asymmetric tanh sigma_c(x) = (e^x - e^-x) / (e^x + c e^-x), float32, range (-1/c, 1).

    sigma_c(0) = 0, sigma_1 = tanh and sigma_c'(0) = 2 / (1 + c). It is evaluated as
    1 - (1 + 1/c) * sigmoid(-2 s) with s = x - ln(c) / 2, which is algebraically the spec's
    (e^s - e^-s / c) / (e^s + e^-s) and stays finite and accurate for any |x| without clipping.

    Args:
      x: tensor of any shape (logits).
      c: asymmetry, a Python number or scalar tensor >= 1 (2 for CUB and Open Images, 1 for COCO).
    """
    x = tf.cast(tf.convert_to_tensor(x), tf.float32)
    return _asym_tanh_value(x, _checked_asymmetry("asym_tanh", c))


def _asym_tanh_value(x, c):
    """asym_tanh of float32 x for a float32 c already checked to be >= 1."""
    s = x - 0.5 * tf.math.log(c)
    return 1.0 - (1.0 + 1.0 / c) * tf.math.sigmoid(-2.0 * s)


def query_label_states(logits, labels, asym_c, a_max: float = 10.0) -> tf.Tensor:
    """Clamped label-state vectors y of query images, float32 [..., L] (docs/method.md §1).

    y = u * sigma_c(z) + clip(l, -1/c, a_max) with u = 1 on unknown entries and 0 on observed ones:
    unknown entries take the prediction, observed positives become 1 (or the class-label weight a
    of the CUB augmentation), observed negatives become -1/c. The query is NOT propagated by the
    label graph.

    Args:
      logits: [..., L] logits z.
      labels: [..., L] label rows; values in {-1, 0} or in [1, a_max].
      asym_c: the asymmetry c >= 1 of `asym_tanh`.
      a_max: ceiling of observed positive values.
    """
    predicted, unknown, observed = _label_state_parts("query_label_states", logits, labels,
                                                      asym_c, a_max)
    return unknown * predicted + observed


def atom_label_states(logits, labels, graph, asym_c, a_max: float = 10.0) -> tf.Tensor:
    """Propagated label-state vectors y~ of dictionary / neighbour images, float32 [..., L].

    y~ = u * (sigma_c(z) @ G) + clip(l, -1/c, a_max): the graph propagates the PREDICTED part only,
    then the observed entries are overwritten by the observed labels (docs/method.md §1, the code's
    row-vector convention (y G)_j = sum_l y_l G_lj).

    Args:
      logits: [..., L] logits of the atoms.
      labels: [..., L] their label rows; values in {-1, 0} or in [1, a_max].
      graph: the [L, L] matrix G (array or tensor), a Keras layer such as `label_graph.LabelGraph`
        (called on the predictions, so its masking applies and gradients reach its weight), any
        other callable computing `predictions @ G` (e.g. `LabelGraph.constant_product`), or None
        for the identity.
      asym_c: the asymmetry c >= 1 of `asym_tanh`.
      a_max: ceiling of observed positive values.
    """
    predicted, unknown, observed = _label_state_parts("atom_label_states", logits, labels,
                                                      asym_c, a_max)
    return unknown * _propagated("atom_label_states", predicted, graph) + observed


def bank_atom_label_states(logits, labels, graph, asym_c, a_max: float = 10.0,
                           jit_compile: bool = True) -> tf.Tensor:
    """`atom_label_states` of label rows checked before (a dictionary bank's), as a constant.

    The same values, for the selection states IMCL recomputes for every bank atom at every step:
    the bank checked its rows when it was filled (`memory.DictionaryBank`), so they are not
    checked again here, and the elementwise work before and after the graph product is fused by
    XLA when jit_compile is True (on CPU about 4 times faster than the separate operations at
    [3,355, 5,000]; bench/results/scale.md, "The selection pass"). No gradient flows.

    Args:
      logits: [N, L] logits of the atoms.
      labels: [N, L] their label rows, any numeric dtype (the bank's are int8).
      graph, asym_c, a_max: as in `atom_label_states`.
      jit_compile: fuse with XLA; False runs the same operations unfused.
    """
    c = _checked_asymmetry("bank_atom_label_states", asym_c)
    logits = tf.stop_gradient(tf.cast(tf.convert_to_tensor(logits), tf.float32))
    labels = tf.convert_to_tensor(labels)
    _check_same_shape("bank_atom_label_states", "labels", labels, "logits", logits)
    predict = _fused_asym_tanh if jit_compile else _asym_tanh_value
    overwrite = _fused_observed_overwrite if jit_compile else _observed_overwrite
    predicted = predict(logits, c)
    propagated = tf.stop_gradient(_propagated("bank_atom_label_states", predicted, graph))
    return overwrite(propagated, labels, c, tf.constant(float(a_max)))


def _propagated(where, predicted, graph):
    """predicted @ G for a graph given as `atom_label_states` accepts it."""
    if graph is None:
        return predicted
    if callable(graph):  # a layer, or a product such as LabelGraph.constant_product
        return tf.cast(graph(predicted), tf.float32)
    matrix = tf.cast(tf.convert_to_tensor(graph), tf.float32)
    num_labels = predicted.shape[-1]
    if matrix.shape.rank != 2 or (num_labels is not None and
                                  matrix.shape.as_list() != [num_labels, num_labels]):
        raise ValueError(f"{where}: graph must be [L, L] = [{num_labels}, "
                         f"{num_labels}] to match logits [..., {num_labels}]. "
                         f"Received: graph.shape={matrix.shape}.")
    return tf.tensordot(predicted, matrix, axes=1)  # [..., L] @ [L, L]


def _unknown_and_observed(labels, c, a_max):
    """(u, b): u = 1 on unknown entries and 0 on observed ones; b = clip(l, -1/c, a_max)."""
    labels = tf.cast(labels, tf.float32)
    unknown = 1.0 - tf.abs(tf.clip_by_value(labels, -1.0, 1.0))
    return unknown, tf.clip_by_value(labels, -1.0 / c, a_max)


def _observed_overwrite(propagated, labels, c, a_max):
    """u * propagated + b, the observed entries overwritten by their labels."""
    unknown, observed = _unknown_and_observed(labels, c, a_max)
    return unknown * propagated + observed


_fused_asym_tanh = tf.function(_asym_tanh_value, jit_compile=True, reduce_retracing=True)
_fused_observed_overwrite = tf.function(_observed_overwrite, jit_compile=True,
                                        reduce_retracing=True)


# ---- Smoothness loss (docs/method.md §1) --------------------------------------------------------




def smoothness_losses(query_y, query_f, neighbor_y, neighbor_f, coef_y, coef_f, valid,
                      per_example: bool = False, reconstruction: str = "linear"
                      ) -> tuple[tf.Tensor, tf.Tensor]:
    """Label-side and feature-side smoothness losses (L_y, L_f), float32.

    L_y = ||y - sum_s c_s y~_s||_F^2 / B and L_f = ||f - sum_s cbar_s f_s||_F^2 / B; with
    reconstruction="tanh" the label side is the paper's Eq. 3, ||y - tanh(sum_s c_s y~_s)||^2
    (the official code and the default drop the outer tanh, docs/method.md §5; the
    coefficients are fitted linearly either way, Eq. 4). The support
    (`valid`) and the coefficients come from the OMP and are constants (stop_gradient); the residuals
    are re-evaluated with gradient through the query and neighbour tensors, so gradients reach the
    classifier, the backbone (query and neighbour features) and the label graph (neighbour states).
    Invalid slots contribute nothing, whatever their coefficient or neighbour values.

    Args:
      query_y: [B, L] query label states (`query_label_states`).
      query_f: [B, D] query features.
      neighbor_y: [B, k, L] neighbour label states (`atom_label_states`).
      neighbor_f: [B, k, D] neighbour features.
      coef_y, coef_f: [B, k] label-side and feature-side coefficients.
      valid: [B, k] bool, False for empty OMP slots.
      per_example: return the per-image squared residual norms [B] instead of the batch means
        (sum them and divide by the global batch size under a distribution strategy).
      reconstruction: "linear" or "tanh", how the label side's reconstruction enters the residual.

    Returns:
      (L_y, L_f): scalars, or [B] vectors when per_example is True.
    """
    query_y = tf.cast(tf.convert_to_tensor(query_y), tf.float32)
    query_f = tf.cast(tf.convert_to_tensor(query_f), tf.float32)
    neighbor_y = tf.cast(tf.convert_to_tensor(neighbor_y), tf.float32)
    neighbor_f = tf.cast(tf.convert_to_tensor(neighbor_f), tf.float32)
    valid = tf.stop_gradient(tf.cast(tf.convert_to_tensor(valid), tf.bool))
    coef_y = tf.stop_gradient(tf.cast(tf.convert_to_tensor(coef_y), tf.float32))
    coef_f = tf.stop_gradient(tf.cast(tf.convert_to_tensor(coef_f), tf.float32))
    _check_smoothness_shapes(query_y, query_f, neighbor_y, neighbor_f, coef_y, coef_f, valid)
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"smoothness_losses: reconstruction must be one of {RECONSTRUCTIONS}. "
                         f"Received: reconstruction={reconstruction!r}.")

    reconstructed_y = _reconstruction(neighbor_y, coef_y, valid)  # [B, L]
    if reconstruction == "tanh":
        reconstructed_y = tf.tanh(reconstructed_y)
    residual_y = query_y - reconstructed_y  # [B, L]
    residual_f = query_f - _reconstruction(neighbor_f, coef_f, valid)  # [B, D]
    per_image_y = tf.reduce_sum(tf.square(residual_y), axis=-1)  # [B]
    per_image_f = tf.reduce_sum(tf.square(residual_f), axis=-1)  # [B]
    if per_example:
        return per_image_y, per_image_f
    return tf.reduce_mean(per_image_y), tf.reduce_mean(per_image_f)


# ---- Lambda balancing (docs/method.md §1) -------------------------------------------------------


def resolve_lambdas(balance: str, loss_c, loss_y, loss_f, multiplier_y: float,
                    multiplier_f: float) -> tuple[float, float]:
    """The smoothness weights (lambda_y, lambda_f) as Python floats.

    balance="loss_ratio": lambda_y = multiplier_y * mean(L_c) / mean(L_y) and
    lambda_f = multiplier_f * mean(L_c) / mean(L_f), the means taken over the calibration batches
    (each loss argument may be one value or a sequence of per-batch values). A ratio whose
    denominator is 0 (e.g. every label known, so y has nothing to smooth) cannot be formed: that
    lambda is set to 0 and a warning is logged. A multiplier of 0 gives 0 without warning.
    balance="none": the multipliers themselves; the losses are ignored (pass None).

    Raises:
      ValueError: unknown balance, negative or non-finite multiplier, negative or non-finite loss.
    """
    multipliers = {"multiplier_y": multiplier_y, "multiplier_f": multiplier_f}
    for name, value in multipliers.items():
        if not (isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(value)
                and value >= 0):
            raise ValueError(f"resolve_lambdas: {name} must be a finite number >= 0. "
                             f"Received: {name}={value!r}.")
    if balance == "none":
        return float(multiplier_y), float(multiplier_f)
    if balance != "loss_ratio":
        raise ValueError(f"resolve_lambdas: balance must be one of {BALANCE_MODES}. "
                         f"Received: balance={balance!r}.")
    mean_c = _calibration_mean("loss_c", loss_c)
    if mean_c == 0.0:
        logger.warning("resolve_lambdas: mean L_c over the calibration batches is 0 (no known "
                       "label, or a perfectly fitted model), so every loss_ratio lambda is 0.")
    lambdas = []
    for side, multiplier, losses in (("y", multiplier_y, loss_y), ("f", multiplier_f, loss_f)):
        if multiplier == 0:
            lambdas.append(0.0)
            continue
        mean_side = _calibration_mean(f"loss_{side}", losses)
        if mean_side == 0.0:
            logger.warning("resolve_lambdas: mean L_%s over the calibration batches is 0, so "
                           "lambda_%s = multiplier * L_c / L_%s is undefined; using lambda_%s = 0 "
                           "(the %s smoothness term is off). Check that some labels are unknown "
                           "and that the OMP finds neighbours.", side, side, side, side, side)
            lambdas.append(0.0)
        else:
            lambdas.append(float(multiplier) * mean_c / mean_side)
    return lambdas[0], lambdas[1]


class LambdaCalibrator:
    """Accumulates L_c, L_y, L_f over calibration batches, then resolves the lambdas.

    Example:
      >>> calibrator = LambdaCalibrator()
      >>> calibrator.update(0.6, 2.0, 4.0)
      >>> calibrator.update(0.2, 2.0, 4.0)
      >>> calibrator.resolve("loss_ratio", 1.0, 0.5)
      (0.2, 0.05)
    """

    def __init__(self):
        self._sums = np.zeros([3], np.float64)  # L_c, L_y, L_f
        self.num_batches = 0

    def update(self, loss_c, loss_y, loss_f) -> None:
        """Adds one batch's scalar losses (floats or scalar tensors)."""
        values = [_calibration_mean(name, value) for name, value in
                  (("loss_c", loss_c), ("loss_y", loss_y), ("loss_f", loss_f))]
        self._sums += values
        self.num_batches += 1

    def means(self) -> tuple[float, float, float]:
        """Mean (L_c, L_y, L_f) over the batches seen so far."""
        if self.num_batches == 0:
            raise ValueError("LambdaCalibrator.means: no batch was added; call update() on at "
                             "least one calibration batch first.")
        mean_c, mean_y, mean_f = self._sums / self.num_batches
        return float(mean_c), float(mean_y), float(mean_f)

    def resolve(self, balance: str, multiplier_y: float, multiplier_f: float) -> tuple[float, float]:
        """`resolve_lambdas` on the accumulated means."""
        if balance == "none":
            return resolve_lambdas(balance, None, None, None, multiplier_y, multiplier_f)
        return resolve_lambdas(balance, *self.means(), multiplier_y, multiplier_f)


# ---- Helpers -----------------------------------------------------------------------------------


def _reconstruction(neighbors, coefficients, valid):
    """sum_s c_s v_s over the valid slots: [B, k, X] x [B, k] -> [B, X]."""
    # tf.where (not a product with the mask) so NaN or inf in an unused slot cannot leak in.
    coefficients = tf.where(valid, coefficients, tf.zeros_like(coefficients))  # [B, k]
    neighbors = tf.where(valid[..., None], neighbors, tf.zeros_like(neighbors))  # [B, k, X]
    return tf.einsum("bk,bkx->bx", coefficients, neighbors)


def _label_state_parts(where, logits, labels, asym_c, a_max):
    """(sigma_c(z), u, clip(l, -1/c, a_max)), each float32 [..., L]."""
    logits = tf.cast(tf.convert_to_tensor(logits), tf.float32)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.float32)
    _check_same_shape(where, "labels", labels, "logits", logits)
    if not (isinstance(a_max, (int, float, np.floating, np.integer)) and a_max >= 1):
        raise ValueError(f"{where}: a_max must be a number >= 1 (the largest observed positive "
                         f"value). Received: a_max={a_max!r}.")
    c = _checked_asymmetry(where, asym_c)
    # Allowed: -1, 0, and positives in [1, a_max] (1, or the CUB class-label weight a).
    allowed = (tf.equal(labels, -1.0) | tf.equal(labels, 0.0) |
               ((labels >= 1.0) & (labels <= float(a_max))))
    check = tf.debugging.Assert(
        tf.reduce_all(allowed),
        [f"{where}: labels must be -1 (absent), 0 (unknown) or a positive value in "
         f"[1, a_max={a_max}]; found another value. Smallest and largest received:",
         tf.reduce_min(labels), tf.reduce_max(labels)])
    with tf.control_dependencies([check]):
        unknown, observed = _unknown_and_observed(labels, c, float(a_max))  # [..., L] u, b
    predicted = asym_tanh(logits, c)
    return predicted, unknown, observed


def _checked_asymmetry(where, c):
    """c as a float32 scalar tensor, checked to be >= 1 (statically when it is a Python number)."""
    if isinstance(c, (int, float, np.floating, np.integer)):
        if not (math.isfinite(c) and c >= 1):
            raise ValueError(f"{where}: the asymmetry c must be a finite number >= 1 (c = 1 is "
                             f"tanh). Received: c={c!r}.")
        return tf.constant(float(c), tf.float32)
    c = tf.cast(tf.convert_to_tensor(c), tf.float32)
    if c.shape.rank not in (None, 0):
        raise ValueError(f"{where}: the asymmetry c must be a scalar. Received: shape {c.shape}.")
    with tf.control_dependencies([tf.debugging.assert_greater_equal(
            c, 1.0, message=f"{where}: the asymmetry c must be >= 1 (c = 1 is tanh)")]):
        return tf.identity(c)


def _assert_ternary(where, name, labels):
    ternary = tf.equal(labels, 1.0) | tf.equal(labels, 0.0) | tf.equal(labels, -1.0)
    return tf.debugging.Assert(
        tf.reduce_all(ternary),
        [f"{where}: {name} must contain only +1 (present), -1 (absent) and 0 (unknown); found "
         f"another value. Smallest and largest received:",
         tf.reduce_min(labels), tf.reduce_max(labels)])


def _check_same_shape(where, name_a, a, name_b, b):
    if not a.shape.is_compatible_with(b.shape):
        raise ValueError(f"{where}: {name_a} and {name_b} must have the same shape. "
                         f"Received: {name_a}.shape={a.shape}, {name_b}.shape={b.shape}.")


def _check_smoothness_shapes(query_y, query_f, neighbor_y, neighbor_f, coef_y, coef_f, valid):
    expected = {"query_y": 2, "query_f": 2, "neighbor_y": 3, "neighbor_f": 3, "coef_y": 2,
                "coef_f": 2, "valid": 2}
    tensors = {"query_y": query_y, "query_f": query_f, "neighbor_y": neighbor_y,
               "neighbor_f": neighbor_f, "coef_y": coef_y, "coef_f": coef_f, "valid": valid}
    for name, rank in expected.items():
        if tensors[name].shape.rank != rank:
            raise ValueError(f"smoothness_losses: {name} must have rank {rank}. "
                             f"Received: {name}.shape={tensors[name].shape}.")
    batch_slots = neighbor_y.shape[:2]
    pairs = [("neighbor_f", neighbor_f.shape[:2]), ("coef_y", coef_y.shape),
             ("coef_f", coef_f.shape), ("valid", valid.shape)]
    for name, shape in pairs:
        if not shape.is_compatible_with(batch_slots):
            raise ValueError(f"smoothness_losses: {name} must be [B, k] = {batch_slots} like "
                             f"neighbor_y's first two dims. Received: {name} leading shape {shape}.")
    if not neighbor_y.shape[0:1].concatenate(neighbor_y.shape[2:]).is_compatible_with(
            query_y.shape):
        raise ValueError(f"smoothness_losses: neighbor_y [B, k, L] does not match query_y [B, L]. "
                         f"Received: neighbor_y.shape={neighbor_y.shape}, "
                         f"query_y.shape={query_y.shape}.")
    if not neighbor_f.shape[0:1].concatenate(neighbor_f.shape[2:]).is_compatible_with(
            query_f.shape):
        raise ValueError(f"smoothness_losses: neighbor_f [B, k, D] does not match query_f [B, D]. "
                         f"Received: neighbor_f.shape={neighbor_f.shape}, "
                         f"query_f.shape={query_f.shape}.")


def _calibration_mean(name, values) -> float:
    """Mean of one value or a sequence of per-batch values, checked finite and >= 0."""
    if values is None:
        raise ValueError(f"resolve_lambdas: {name} is required when balance='loss_ratio'.")
    if isinstance(values, (tf.Tensor, tf.Variable)):
        values = values.numpy()
    elif isinstance(values, Iterable) and not isinstance(values, (str, bytes)):
        values = [v.numpy() if isinstance(v, (tf.Tensor, tf.Variable)) else v for v in values]
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise ValueError(f"resolve_lambdas: {name} is empty; give at least one calibration batch.")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"resolve_lambdas: {name} must be finite and >= 0 (losses of the "
                         f"calibration batches). Received: {name}={array.tolist()!r}; a NaN here "
                         "usually means the warm-start model diverged.")
    return float(array.mean())


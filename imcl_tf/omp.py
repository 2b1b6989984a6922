"""Joint Nonnegative OMP: the similarity-learning step of IMCL, batched for a tf.function.

For every query it greedily picks up to k dictionary atoms that jointly reconstruct the query's
label state and feature with nonnegative coefficients (docs/method.md §2, supplement
Eqs. 5-10; interface in docs/architecture.md).
"""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np
import tensorflow as tf

from imcl_tf.choices import OMP_MAX_K

OMPResult = collections.namedtuple("OMPResult", ["indices", "valid", "coef_y", "coef_f"])
OMPResult.__doc__ = """Output of `joint_nonnegative_omp`, every field [B, k] and gradient-free.

Fields:
  indices: int32, the chosen atom of each slot in selection order; 0 in invalid slots (so a
    gather never fails), which is why consumers must mask with `valid`.
  valid: bool, False for slots where no remaining atom reduces the residual; once a slot is
    invalid all later slots of that query are too.
  coef_y: float32 >= 0, label-side coefficients (exact NNLS on the valid support); 0 if invalid.
  coef_f: float32 >= 0, feature-side coefficients, same rules.
"""

# Exact NNLS enumerates all 2^k sub-supports of k x k systems per query and side at every step.
MAX_K = OMP_MAX_K
# A candidate must lower the two-sided loss by more than this fraction of the query's own
# weighted energy (lambda_y |y|^2 + lambda_f |f|^2). In exact arithmetic the rule is "gain > 0";
# in float32 an atom that is numerically a copy of a chosen one keeps a rounding-level gain
# (~1e-12 relative) and would otherwise fill a slot with a coefficient of ~0.
RELATIVE_MIN_GAIN = 1e-6
# Exact NNLS skips a sub-support whose elimination pivot falls below this fraction of the atom's
# squared norm, i.e. an atom within ~0.2 degrees of the span of the others: in float32 such a
# system is numerically singular. An optimum on an independent support always exists, and for
# nonnegative coefficients a nearly dependent atom can add at most ~1e-5 |q|^2 of fit.
DEPENDENT_PIVOT = 1e-5


def joint_nonnegative_omp(query_y: Any,
                          query_f: Any,
                          atoms_y: Any,
                          atoms_f: Any,
                          k: int,
                          lambda_y: Any = 1.0,
                          lambda_f: Any = 1.0,
                          exclude: Any = None,
                          *,
                          jit_compile: bool = False,
                          score_threshold: float = 0.0,
                          balance_scores: bool = False,
                          atoms_y_sq_norms: Any = None,
                          atoms_f_sq_norms: Any = None,
                          atoms_f_constant: float | None = None,
                          check_atoms: bool = True) -> OMPResult:
    """Selects k nonnegative sparse neighbours per query from a dictionary (Algorithm 2).

    At each of the k steps every atom m that is neither chosen yet nor excluded gets the score of
    Eq. 10 restricted to nonnegative coefficients,
        lambda_y * relu(<r_y, a_m>)^2 / |a_m|^2 + lambda_f * relu(<r_f, f_m>)^2 / |f_m|^2,
    (a side where the atom's vector has zero norm contributes 0), the best one is added (ties go
    to the lower atom index), and both coefficient vectors are refitted on the support by exact
    nonnegative least squares, each side on its own, before the residuals are updated. If the best
    score is not above `RELATIVE_MIN_GAIN` times lambda_y |y|^2 + lambda_f |f|^2 (no atom helps)
    the slot and all later ones are invalid.

    Everything runs in float32 (inputs are cast, e.g. under mixed precision) with no loop over the
    batch; k fixes the static [B, k] slot shapes, so it must be a Python int. Per step the work is
    two GEMMs ([B, L] x [L, M] and [B, D] x [D, M]), O(B M) elementwise work and 2^k tiny solves.
    Outputs carry no gradient.

    Args:
      query_y: [B, L] label states of the queries.
      query_f: [B, D] features of the queries.
      atoms_y: [M, L] label-side dictionary atoms (A y of the dictionary images), or a list or
        tuple of row blocks [M_1, L], [M_2, L], ... whose concatenation is that matrix (atom m of
        block 2 is atom M_1 + m): the caller need not join blocks it computed apart, which would
        copy the whole dictionary once more.
      atoms_f: [M, D] feature-side dictionary atoms.
      k: number of slots, 1 <= k <= min(M, MAX_K).
      lambda_y: weight >= 0 of the label side; Python number or scalar tensor.
      lambda_f: weight >= 0 of the feature side; Python number or scalar tensor.
      exclude: optional [B, M] bool, True where an atom may not be chosen for that query (itself).
      jit_compile: run the computation through a cached `tf.function(jit_compile=True)`, also
        from inside an ordinary tf.function such as a Keras train step (IMCLModel does). Inside
        a caller's own jit-compiled function leave it False: the caller's compilation covers it.
      score_threshold: the official code's tau (`thresold_coeff`, docs/method.md §5): a slot is
        valid only if its atom's score, with the weights renormalised as the official code does
        (lambda / (max(lambda_y, lambda_f) + 1e-4)), is >= tau; otherwise it and every later slot
        stay empty. 0 disables it (CUB 1e-6, COCO 1e-20, Open Images 1e-3).
      balance_scores: the official `is_balance` (Open Images end-to-end): the atoms are chosen by
        lambda_y gain_y / max gain_y + lambda_f gain_f / max gain_f, each side's gains divided by
        their maximum over the atoms the query may choose, so neither side dominates by scale.
        Validity still needs a loss decrease (the unbalanced score) above the minimum gain.
      atoms_y_sq_norms, atoms_f_sq_norms: optional [M] squared row norms of atoms_y / atoms_f
        when the caller already has them (IMCLModel computes them chunk by chunk with the
        atoms): computing them here needs an [M, L] temporary. They must be the atoms' own
        (with atoms_f_constant, the norms of the extended feature atoms).
      atoms_f_constant: if a number c, every feature atom is [atoms_f[m], c]: a constant last
        coordinate that is never stored (IMCL's bias coordinate 1), so atoms_f is [M, D - 1]
        while query_f is [B, D]. Joining it to atoms_f would copy the whole [M, D] dictionary.
      check_atoms: check atoms_y and atoms_f for NaN/Inf (the queries are always checked). In
        graph mode that is a pass over the whole dictionary at every call, longer than the
        OMP's own work at [10,000, 7,000] on CPU (bench/results/scale.md); a caller whose
        atoms are finite whenever its queries are may pass False (IMCLModel does). Unchecked,
        an atom holding NaN or Inf is never chosen (as if excluded), and no error is raised.

    Returns:
      OMPResult(indices [B, k] int32, valid [B, k] bool, coef_y [B, k] float32,
      coef_f [B, k] float32); see `OMPResult`.

    Raises:
      TypeError: k is not an int, or exclude is not boolean.
      ValueError: shapes disagree, k is out of range, a lambda is negative or not a scalar, or an
        input holds NaN/Inf (checked eagerly; in graph mode by tf.debugging asserts, which XLA
        compiles away).

    Example:
      >>> rng = np.random.default_rng(0)
      >>> atoms_y, atoms_f = rng.random((6, 4)), rng.random((6, 5))
      >>> out = joint_nonnegative_omp(atoms_y[:2], atoms_f[:2], atoms_y, atoms_f, k=2,
      ...                             exclude=np.eye(2, 6, dtype=bool))
      >>> out.indices.shape, out.valid.dtype.name
      (TensorShape([2, 2]), 'bool')
    """
    k = _check_k(k)
    query_y = _as_float32(query_y, "query_y")
    query_f = _as_float32(query_f, "query_f")
    blocks_y = _row_blocks(atoms_y)
    atoms_f = _as_float32(atoms_f, "atoms_f")
    if atoms_f_constant is not None:
        if isinstance(atoms_f_constant, bool) or not isinstance(
                atoms_f_constant, (int, float, np.floating, np.integer)) or \
                not math.isfinite(atoms_f_constant):
            raise ValueError(f"joint_nonnegative_omp: atoms_f_constant must be None or a finite "
                             f"number. Received: atoms_f_constant={atoms_f_constant!r}.")
        atoms_f_constant = float(atoms_f_constant)
    extended_f = atoms_f if atoms_f_constant is None else _Shaped(tf.TensorShape(
        [atoms_f.shape[0], None if atoms_f.shape[1] is None else atoms_f.shape[1] + 1]))
    _check_shapes(query_y, query_f, _stacked_shape(blocks_y), extended_f, k)
    lambda_y = _check_lambda(lambda_y, "lambda_y")
    lambda_f = _check_lambda(lambda_f, "lambda_f")
    if exclude is not None:
        exclude = _check_exclude(exclude, query_y, atoms_f)
    query_y, query_f = (_check_finite(x, name) for x, name in ((query_y, "query_y"),
                                                              (query_f, "query_f")))
    if check_atoms:
        atoms_f = _check_finite(atoms_f, "atoms_f")
        blocks_y = tuple(_check_finite(block, "atoms_y" if len(blocks_y) == 1 else
                                       f"atoms_y (row block {i})")
                         for i, block in enumerate(blocks_y))
    if not (isinstance(score_threshold, (int, float, np.floating, np.integer))
            and math.isfinite(score_threshold) and score_threshold >= 0):
        raise ValueError(f"joint_nonnegative_omp: score_threshold must be a finite number >= 0. "
                         f"Received: score_threshold={score_threshold!r}.")
    norms = []
    for given, atoms, name in ((atoms_y_sq_norms, atoms_f, "atoms_y_sq_norms"),
                               (atoms_f_sq_norms, atoms_f, "atoms_f_sq_norms")):
        if given is None:
            norms.append(None)
            continue
        given = _as_float32(tf.reshape(given, [-1, 1]), name)[:, 0]
        if given.shape[0] is not None and atoms.shape[0] is not None and \
                given.shape[0] != atoms.shape[0]:
            raise ValueError(f"joint_nonnegative_omp: {name} must be [M] = [{atoms.shape[0]}]. "
                             f"Received: shape {given.shape}.")
        norms.append(given)
    omp = _compiled_omp if jit_compile else _omp
    return omp(query_y, query_f, blocks_y, atoms_f, k, lambda_y, lambda_f, exclude,
               float(score_threshold), bool(balance_scores), *norms, atoms_f_constant)


# ---- The algorithm ------------------------------------------------------------------------------


def _omp(query_y, query_f, atoms_y, atoms_f, k, lambda_y, lambda_f, exclude,
         score_threshold=0.0, balance_scores=False, sq_norms_y=None, sq_norms_f=None,
         f_constant=None):
    """The k-step loop on validated float32 tensors (see joint_nonnegative_omp).

    The steps run in a tf.while_loop over fixed [B, k] slot tensors (slots not reached yet count
    as invalid), so the graph and XLA's compile time do not grow with k. atoms_y is a tuple of
    row blocks (one block: the plain [M, L] computation); f_constant is atoms_f_constant.
    """
    query_y, query_f, atoms_f = (tf.stop_gradient(x) for x in (query_y, query_f, atoms_f))
    blocks_y = tuple(tf.stop_gradient(block) for block in atoms_y)
    lambda_y = tf.stop_gradient(lambda_y)
    lambda_f = tf.stop_gradient(lambda_f)
    batch = tf.shape(query_y)[0]
    num_atoms = tf.shape(atoms_f)[0]

    # Atom norms once per call; 1/|a|^2 is 0 for zero atoms, so that side adds 0 to the score.
    if sq_norms_y is None:
        sq_norms_y = tf.concat([_squared_row_norms(block) for block in blocks_y], axis=0)
    if sq_norms_f is None:
        sq_norms_f = _squared_row_norms(atoms_f)
        if f_constant is not None:
            sq_norms_f += f_constant ** 2
    inv_norm_y = tf.math.divide_no_nan(1.0, tf.stop_gradient(sq_norms_y))  # [M]
    inv_norm_f = tf.math.divide_no_nan(1.0, tf.stop_gradient(sq_norms_f))  # [M]
    atom_index = tf.range(num_atoms, dtype=tf.int32)  # [M]
    slot_index = tf.range(k, dtype=tf.int32)  # [k]
    if exclude is None:
        blocked = tf.zeros([batch, num_atoms], dtype=tf.bool)  # [B, M]
    else:
        blocked = tf.stop_gradient(exclude)
    energy = (lambda_y * tf.reduce_sum(tf.square(query_y), axis=1)
              + lambda_f * tf.reduce_sum(tf.square(query_f), axis=1))  # [B]
    min_gain = RELATIVE_MIN_GAIN * energy  # [B]
    weight_scale = tf.maximum(lambda_y, lambda_f) + 1e-4  # the official weight renormalisation

    def one_step(step, residual_y, residual_f, blocked, indices, valid, coef):
        # The two GEMMs of the step: correlations of the residuals with every atom.
        corr_y = _block_correlations(residual_y, blocks_y)  # [B, M]
        corr_f = _feature_correlations(residual_f, atoms_f, f_constant)  # [B, M]
        score = _selection_scores(corr_y, corr_f, inv_norm_y, inv_norm_f, lambda_y, lambda_f)
        # An atom whose score is not finite (it holds NaN or Inf: possible only with
        # check_atoms=False) is never chosen, as if excluded.
        unusable = tf.logical_or(blocked, tf.logical_not(tf.math.is_finite(score)))  # [B, M]
        score = tf.where(unusable, tf.zeros_like(score), score)  # [B, M]
        choice = score
        if balance_scores:
            choice = _balanced_scores(corr_y, corr_f, inv_norm_y, inv_norm_f, lambda_y,
                                      lambda_f, unusable)
        best_choice = tf.reduce_max(choice, axis=1)  # [B]
        # tf.argmax leaves ties unspecified: take the first index attaining the maximum.
        first = tf.where(choice == best_choice[:, None], atom_index[None, :], num_atoms)  # [B, M]
        index = tf.reduce_min(first, axis=1)  # [B]
        best = tf.gather(score, tf.minimum(index, num_atoms - 1), batch_dims=1)  # [B] loss decrease
        # A slot is valid only if every earlier one is (an invalid slot leaves the residual as is).
        alive = tf.reduce_all(tf.logical_or(valid, slot_index[None, :] >= step), axis=1)  # [B]
        ok = tf.logical_and(alive, best > min_gain)  # [B]
        if score_threshold > 0:
            ok = tf.logical_and(ok, best_choice / weight_scale >= score_threshold)
        index = tf.where(ok, index, 0)
        blocked = tf.logical_or(
            blocked, tf.logical_and(atom_index[None, :] == index[:, None], ok[:, None]))
        this_slot = (slot_index == step)[None, :]  # [1, k]
        indices = tf.where(this_slot, index[:, None], indices)  # [B, k]
        valid = tf.where(this_slot, ok[:, None], valid)  # [B, k]

        # Support so far; invalid and future slots become zero atoms, which the NNLS leaves out.
        mask = tf.cast(valid, tf.float32)[:, :, None]  # [B, k, 1]
        chosen_y = _gather_rows(blocks_y, indices) * mask  # [B, k, L]
        chosen_f = _gather_features(atoms_f, indices, f_constant) * mask  # [B, k, D]
        gram = tf.stack([tf.matmul(chosen_y, chosen_y, transpose_b=True),
                         tf.matmul(chosen_f, chosen_f, transpose_b=True)])  # [2, B, k, k]
        rhs = tf.stack([tf.einsum("bl,bkl->bk", query_y, chosen_y),
                        tf.einsum("bd,bkd->bk", query_f, chosen_f)])  # [2, B, k]

        # Lines 9-10 of Algorithm 2: refit ALL coefficients of each side by exact NNLS (Eq. 5).
        coef = _nnls_small(gram, rhs)  # [2, B, k]
        residual_y = query_y - tf.einsum("bk,bkl->bl", coef[0], chosen_y)  # [B, L]
        residual_f = query_f - tf.einsum("bk,bkd->bd", coef[1], chosen_f)  # [B, D]
        return step + 1, residual_y, residual_f, blocked, indices, valid, coef

    state = (tf.constant(0), query_y, query_f, blocked,
             tf.zeros([batch, k], tf.int32), tf.zeros([batch, k], tf.bool),
             tf.zeros([2, batch, k], tf.float32))
    _, _, _, _, indices, valid, coef = tf.while_loop(
        lambda step, *_: step < k, one_step, state, maximum_iterations=k)
    return OMPResult(indices=tf.stop_gradient(indices), valid=tf.stop_gradient(valid),
                     coef_y=tf.stop_gradient(coef[0]), coef_f=tf.stop_gradient(coef[1]))


_compiled_omp = tf.function(_omp, jit_compile=True)


def _selection_scores(corr_y, corr_f, inv_norm_y, inv_norm_f, lambda_y, lambda_f):
    """Eq. 10 restricted to c >= 0: the loss decrease of fitting one new nonnegative coefficient.

    corr_*: [B, M] <residual, atom>; inv_norm_*: [M] 1/|atom|^2 (0 for zero atoms). Returns [B, M].
    """
    gain_y = tf.square(tf.nn.relu(corr_y)) * inv_norm_y[None, :]
    gain_f = tf.square(tf.nn.relu(corr_f)) * inv_norm_f[None, :]
    return lambda_y * gain_y + lambda_f * gain_f


def _balanced_scores(corr_y, corr_f, inv_norm_y, inv_norm_f, lambda_y, lambda_f, blocked):
    """The `is_balance` score: each side's gains over their maximum among the allowed atoms."""
    zeros = tf.zeros_like(corr_y)
    gain_y = tf.where(blocked, zeros, tf.square(tf.nn.relu(corr_y)) * inv_norm_y[None, :])
    gain_f = tf.where(blocked, zeros, tf.square(tf.nn.relu(corr_f)) * inv_norm_f[None, :])
    gain_y = tf.math.divide_no_nan(gain_y, tf.reduce_max(gain_y, axis=1, keepdims=True))
    gain_f = tf.math.divide_no_nan(gain_f, tf.reduce_max(gain_f, axis=1, keepdims=True))
    return lambda_y * gain_y + lambda_f * gain_f  # [B, M]


def refit_on_support(query_y: Any, query_f: Any, support_y: Any, support_f: Any,
                     valid: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """Re-solves both coefficient vectors on a fixed support, as the OMP's last refit does.

    For each query, each side on its own, exact nonnegative least squares
    min_{c >= 0} |q - sum_s c_s v_s|^2 over the valid slots (invalid slots get 0). Use it when
    the support's vectors have changed since the OMP chose them (e.g. neighbours re-encoded by
    the current network). No gradient: the coefficients are constants of the loss.

    Args:
      query_y: [B, L] label states of the queries.
      query_f: [B, D] features of the queries.
      support_y: [B, k] + [L], the label-side vectors of each query's slots.
      support_f: [B, k] + [D], the feature-side vectors of each query's slots.
      valid: [B, k] bool, False for slots to leave out.

    Returns:
      (coef_y, coef_f), each [B, k] float32 >= 0, 0 in invalid slots.

    Example:
      >>> support = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)  # B=1, k=2, 2-d vectors
      >>> coef_y, coef_f = refit_on_support([[2.0, -1.0]], [[1.0, 3.0]], support, support,
      ...                                   [[True, False]])
      >>> coef_y.numpy().tolist(), coef_f.numpy().tolist()
      ([[2.0, 0.0]], [[1.0, 0.0]])
    """
    query_y, query_f, support_y, support_f = (
        tf.stop_gradient(tf.cast(x, tf.float32))
        for x in (query_y, query_f, support_y, support_f))
    mask = tf.cast(valid, tf.float32)[:, :, None]  # [B, k, 1]: an invalid slot is a zero vector
    chosen_y = support_y * mask
    chosen_f = support_f * mask
    gram = tf.stack([tf.matmul(chosen_y, chosen_y, transpose_b=True),
                     tf.matmul(chosen_f, chosen_f, transpose_b=True)])  # [2, B, k, k]
    rhs = tf.stack([tf.einsum("bl,bkl->bk", query_y, chosen_y),
                    tf.einsum("bd,bkd->bk", query_f, chosen_f)])  # [2, B, k]
    coef = tf.stop_gradient(_nnls_small(gram, rhs))  # [2, B, k]
    return coef[0], coef[1]


def _nnls_small(gram, rhs):
    """Exact NNLS  min_{c >= 0} |q - S c|^2  for a tiny support, batched over leading axes.

    Every sub-support P of the s slots (a constant mask, 2^s of them, the empty one included) is
    solved as an unconstrained least-squares problem by Gaussian elimination (LDL^T, vectorised
    over sub-supports); the solutions with a negative entry are discarded and the feasible one
    with the smallest residual wins. The optimum of a convex NNLS is the least-squares solution on
    its own support, and one optimum always has a linearly independent support (Caratheodory), so
    sub-supports that are numerically dependent are skipped (see `DEPENDENT_PIVOT`).

    Args:
      gram: [..., s, s] Gram matrices <a_i, a_j>. A slot whose diagonal entry is 0 (invalid slot
        or zero atom on this side) gets coefficient 0.
      rhs: [..., s] right-hand sides <q, a_i>.

    Returns:
      [..., s] coefficients, all >= 0.
    """
    size = rhs.shape[-1]
    subsets = tf.constant(_subset_table(size), tf.float32)  # [P, s]
    num_subsets = subsets.shape[0]
    usable = tf.cast(tf.linalg.diag_part(gram) > 0.0, tf.float32)  # [..., s]
    member = usable[..., None, :] * subsets  # [..., P, s]: slot i is in sub-support p
    # Masked system per sub-support: the members' Gram block, identity elsewhere.
    system = (gram[..., None, :, :] * member[..., :, None] * member[..., None, :]
              + tf.linalg.diag(1.0 - member))  # [..., P, s, s]
    target = rhs[..., None, :] * member  # [..., P, s]
    floor = DEPENDENT_PIVOT * tf.linalg.diag_part(system)  # [..., P, s]
    slot = tf.range(size)  # [s]

    # Gaussian elimination (LDL^T without pivoting: the kept systems are positive definite) in a
    # loop over the pivot, so the graph does not grow with s. Row j is final after step j: at
    # the end `system` is upper triangular and `target` the forward-substituted right-hand side.
    def eliminate(j, system, target, dependent):
        pivot_row = tf.gather(system, j, axis=-2)  # [..., P, s]
        pivot = tf.gather(pivot_row, j, axis=-1)  # [..., P]
        pivot_floor = tf.gather(floor, j, axis=-1)
        # pivot / |a_j|^2 = squared sine between atom j and the span of the earlier members.
        dependent = tf.logical_or(dependent, pivot < pivot_floor)
        pivot = tf.maximum(pivot, pivot_floor)  # only keeps discarded systems finite
        below = tf.cast(slot > j, tf.float32)  # [s]
        factor = tf.gather(system, j, axis=-1) * below / pivot[..., None]  # [..., P, s]
        system = system - factor[..., :, None] * pivot_row[..., None, :]
        system = tf.linalg.set_diag(system, tf.where(slot == j, pivot[..., None],
                                                     tf.linalg.diag_part(system)))
        target = target - factor * tf.gather(target, j, axis=-1)[..., None]
        return j + 1, system, target, dependent

    _, system, target, dependent = tf.while_loop(
        lambda j, *_: j < size, eliminate,
        (tf.constant(0), system, target, tf.zeros_like(target[..., 0], dtype=tf.bool)),
        maximum_iterations=size)
    pivots = tf.linalg.diag_part(system)  # [..., P, s]

    def substitute(j, coef):  # back substitution, j = s-1 .. 0; unsolved entries are still 0
        known = tf.reduce_sum(tf.gather(system, j, axis=-2) * coef, axis=-1)  # [..., P]
        value = (tf.gather(target, j, axis=-1) - known) / tf.gather(pivots, j, axis=-1)
        return j - 1, tf.where(slot == j, value[..., None], coef)

    _, coef = tf.while_loop(lambda j, _: j >= 0, substitute,
                            (tf.constant(size - 1), tf.zeros_like(target)),
                            maximum_iterations=size)  # [..., P, s]

    # |q - S c|^2 = |q|^2 - b^T G^-1 b for the least-squares c, and b^T G^-1 b is the sum of
    # target_j^2 / pivot_j: no cancellation even when coefficients are large.
    objective = -tf.reduce_sum(tf.square(target) / pivots, axis=-1)  # [..., P] minus |q|^2
    feasible = tf.logical_and(tf.reduce_all(coef >= 0.0, axis=-1),
                              tf.logical_not(dependent))  # the empty sub-support always is
    objective = tf.where(feasible, objective, math.inf)
    lowest = tf.reduce_min(objective, axis=-1, keepdims=True)  # [..., 1]
    first = tf.where(objective == lowest, tf.range(num_subsets), num_subsets)  # [..., P]
    pick = tf.reduce_min(first, axis=-1)  # [...]
    picked = tf.gather(coef, pick, batch_dims=len(pick.shape))  # [..., s]
    return tf.where(picked > 0.0, picked, 0.0)  # turns -0.0 of empty slots into 0.0


def _block_correlations(residual, blocks):
    """[B, X] x the row blocks' [M, X] transposed -> [B, M], block by block (nothing joined)."""
    if len(blocks) == 1:
        return tf.matmul(residual, blocks[0], transpose_b=True)
    return tf.concat([tf.matmul(residual, block, transpose_b=True) for block in blocks], axis=1)


def _feature_correlations(residual_f, atoms_f, constant):
    """[B, D] x the feature atoms [M, D] (their last coordinate `constant` if given) -> [B, M]."""
    if constant is None:
        return tf.matmul(residual_f, atoms_f, transpose_b=True)
    return (tf.matmul(residual_f[:, :-1], atoms_f, transpose_b=True)
            + constant * residual_f[:, -1:])


def _gather_features(atoms_f, indices, constant):
    """Feature atoms `indices` ([B, k]) -> [B, k, D], with the constant coordinate if given."""
    rows = tf.gather(atoms_f, indices)
    if constant is None:
        return rows
    return tf.concat([rows, tf.fill(tf.concat([tf.shape(indices), [1]], 0), constant)], -1)


def _gather_rows(blocks, indices):
    """Rows `indices` (any shape, into the blocks' concatenation) -> indices.shape + [X]."""
    if len(blocks) == 1:
        return tf.gather(blocks[0], indices)
    rows, start = None, tf.constant(0, indices.dtype)
    for block in blocks:
        size = tf.cast(tf.shape(block)[0], indices.dtype)
        local = indices - start
        inside = tf.logical_and(local >= 0, local < size)
        picked = tf.gather(block, tf.clip_by_value(local, 0, size - 1))
        rows = picked if rows is None else tf.where(inside[..., None], picked, rows)
        start += size
    return rows


def _squared_row_norms(matrix):
    """[M, X] -> [M] squared L2 norms of the rows.

    A matrix-vector product instead of reduce_sum: XLA on CPU runs the row reduction of a large
    matrix on one thread (~15x slower here for a 10,000 x 2,048 dictionary).
    """
    return tf.linalg.matvec(tf.square(matrix), tf.ones([tf.shape(matrix)[1]], matrix.dtype))


def _subset_table(size):
    """[2^size, size] bool; row p holds the slots of sub-support p (bit i of p = slot i)."""
    rows = np.arange(2 ** size)[:, None]
    return (rows >> np.arange(size)[None, :]) & 1 == 1


# ---- Input checks -------------------------------------------------------------------------------


def _check_k(k):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"joint_nonnegative_omp: k must be a Python int (it fixes the static "
                        f"[B, k] output shape). Received: k={k!r} of type {type(k).__name__}.")
    k = int(k)
    if not 1 <= k <= MAX_K:
        raise ValueError(f"joint_nonnegative_omp: k must be in [1, {MAX_K}] (exact NNLS "
                         f"enumerates 2^k sub-supports). Received: k={k}.")
    return k


def _as_float32(value, name):
    tensor = tf.convert_to_tensor(value)
    if not (tensor.dtype.is_floating or tensor.dtype.is_integer):
        raise TypeError(f"joint_nonnegative_omp: {name} must be a real-valued tensor. "
                        f"Received: {name} with dtype {tensor.dtype.name}.")
    if tensor.shape.rank is not None and tensor.shape.rank != 2:
        raise ValueError(f"joint_nonnegative_omp: {name} must have rank 2. "
                         f"Received: {name}.shape={tensor.shape}.")
    return tf.cast(tensor, tf.float32)


def _row_blocks(atoms_y):
    """atoms_y as a non-empty tuple of float32 [M_i, L] blocks of one width."""
    if isinstance(atoms_y, (list, tuple)):
        if not atoms_y:
            raise ValueError("joint_nonnegative_omp: atoms_y is an empty list; give an [M, L] "
                             "tensor or a list of [M_i, L] row blocks.")
        blocks = tuple(_as_float32(block, f"atoms_y[{i}]") for i, block in enumerate(atoms_y))
    else:
        blocks = (_as_float32(atoms_y, "atoms_y"),)
    widths = {block.shape[1] for block in blocks} - {None}
    if len(widths) > 1:
        raise ValueError(f"joint_nonnegative_omp: the row blocks of atoms_y must all be [M_i, L] "
                         f"with one L. Received shapes {[tuple(b.shape) for b in blocks]}.")
    return blocks


def _stacked_shape(blocks):
    """The static shape of the blocks' concatenation, as a stand-in with a `.shape`."""
    rows = [block.shape[0] for block in blocks]
    widths = [block.shape[1] for block in blocks if block.shape[1] is not None]
    shape = tf.TensorShape([None if None in rows else sum(rows), widths[0] if widths else None])
    return _Shaped(shape)


_Shaped = collections.namedtuple("_Shaped", ["shape"])


def _check_shapes(query_y, query_f, atoms_y, atoms_f, k):
    """Static checks where dimensions are known; the rest must agree at run time."""
    tensors = {"query_y": query_y, "query_f": query_f, "atoms_y": atoms_y, "atoms_f": atoms_f}
    for first, first_axis, second, second_axis, what in (
            ("query_y", 0, "query_f", 0, "batch size B"),
            ("atoms_y", 0, "atoms_f", 0, "number of atoms M"),
            ("query_y", 1, "atoms_y", 1, "label dimension L"),
            ("query_f", 1, "atoms_f", 1, "feature dimension D")):
        a, b = tensors[first].shape[first_axis], tensors[second].shape[second_axis]
        if a is not None and b is not None and a != b:
            raise ValueError(
                f"joint_nonnegative_omp: the {what} disagrees: {first}.shape="
                f"{tensors[first].shape} but {second}.shape={tensors[second].shape}. Queries "
                f"are [B, L] and [B, D], atoms [M, L] and [M, D].")
    num_atoms = atoms_y.shape[0]
    if num_atoms is not None and k > num_atoms:
        raise ValueError(f"joint_nonnegative_omp: k={k} is larger than the number of atoms "
                         f"M={num_atoms} (atoms_y.shape={atoms_y.shape}); use k <= M.")


def _check_lambda(value, name):
    """Python numbers and eager tensors are checked now, graph tensors by run-time asserts."""
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        number = float(value)
    else:
        tensor = tf.convert_to_tensor(value, dtype_hint=tf.float32)
        if tensor.shape.rank is not None and tensor.shape.rank != 0:
            raise ValueError(f"joint_nonnegative_omp: {name} must be a scalar. "
                             f"Received: {name} with shape {tensor.shape}.")
        tensor = tf.cast(tensor, tf.float32)
        if not _is_concrete(tensor):
            with tf.control_dependencies([
                    tf.debugging.assert_all_finite(
                        tensor, f"joint_nonnegative_omp: {name} is not finite."),
                    tf.debugging.assert_non_negative(
                        tensor, message=f"joint_nonnegative_omp: {name} must be >= 0.")]):
                return tf.identity(tensor)
        number = float(tensor.numpy())
    if not (math.isfinite(number) and number >= 0.0):
        raise ValueError(f"joint_nonnegative_omp: {name} must be a finite number >= 0. "
                         f"Received: {name}={number!r}.")
    return tf.constant(number, tf.float32)


def _check_exclude(exclude, query_y, atoms_f):
    tensor = tf.convert_to_tensor(exclude)
    if tensor.dtype != tf.bool:
        raise TypeError(f"joint_nonnegative_omp: exclude must be a bool [B, M] mask (True = atom "
                        f"may not be chosen for that query). Received: exclude with dtype "
                        f"{tensor.dtype.name} and shape {tensor.shape}.")
    expected = tf.TensorShape([query_y.shape[0], atoms_f.shape[0]])
    if not tensor.shape.is_compatible_with(expected):
        raise ValueError(f"joint_nonnegative_omp: exclude must have shape [B, M] = {expected} "
                         f"(B from query_y.shape={query_y.shape}, M from atoms_f.shape="
                         f"{atoms_f.shape}). Received: exclude.shape={tensor.shape}.")
    if tensor.shape.is_fully_defined() and expected.is_fully_defined():
        return tensor
    with tf.control_dependencies([tf.debugging.assert_equal(
            tf.shape(tensor), tf.stack([tf.shape(query_y)[0], tf.shape(atoms_f)[0]]),
            message="joint_nonnegative_omp: exclude must have shape [B, M].")]):
        return tf.identity(tensor)


def _check_finite(tensor, name):
    if _is_concrete(tensor):
        finite = tf.math.is_finite(tensor)
        if not bool(tf.reduce_all(finite)):
            where = tf.where(tf.logical_not(finite))[0].numpy().tolist()
            raise ValueError(f"joint_nonnegative_omp: {name} contains non-finite values (first "
                             f"at {where}: {tensor[where[0], where[1]].numpy()}). Clean the "
                             f"inputs; NaN/Inf would make every score meaningless.")
        return tensor
    return tf.debugging.assert_all_finite(
        tensor, f"joint_nonnegative_omp: {name} contains non-finite values.")


def _is_concrete(tensor):
    """True for eager tensors, whose values can be checked in Python right away."""
    return hasattr(tensor, "numpy") and tf.executing_eagerly()

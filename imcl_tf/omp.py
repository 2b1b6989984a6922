"""Joint Nonnegative OMP: the similarity-learning step of IMCL, batched for a tf.function.

For every query it greedily picks up to k dictionary atoms that jointly reconstruct the query's
label state and feature with nonnegative coefficients (imcl-method.md section 4, supplement
Eqs. 5-10; interface in architecture.md section 5).
"""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np
import tensorflow as tf

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

# Exact NNLS enumerates all 2^k sub-supports; beyond this the graph and the work grow too fast.
MAX_K = 8
# A candidate must lower the two-sided loss by more than this fraction of the query's own
# weighted energy (lambda_y |y|^2 + lambda_f |f|^2). In exact arithmetic the rule is "gain > 0";
# in float32 an atom that is numerically a copy of a chosen one keeps a rounding-level gain
# (~1e-12 relative) and would otherwise fill a slot with a coefficient of ~0.
RELATIVE_MIN_GAIN = 1e-6
# Tikhonov term relative to each Gram diagonal entry: keeps (near-)collinear supports finite and
# bounded; it changes well-conditioned coefficients by ~1e-6 relative.
_RIDGE = 1e-6


def joint_nonnegative_omp(query_y: Any,
                          query_f: Any,
                          atoms_y: Any,
                          atoms_f: Any,
                          k: int,
                          lambda_y: Any = 1.0,
                          lambda_f: Any = 1.0,
                          exclude: Any = None,
                          *,
                          jit_compile: bool = False) -> OMPResult:
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
    batch; the k steps are unrolled, so k must be a Python int. Outputs carry no gradient.

    Args:
      query_y: [B, L] label states of the queries.
      query_f: [B, D] features of the queries.
      atoms_y: [M, L] label-side dictionary atoms (A y of the dictionary images).
      atoms_f: [M, D] feature-side dictionary atoms.
      k: number of slots, 1 <= k <= min(M, MAX_K).
      lambda_y: weight >= 0 of the label side; Python number or scalar tensor.
      lambda_f: weight >= 0 of the feature side; Python number or scalar tensor.
      exclude: optional [B, M] bool, True where an atom may not be chosen for that query (itself).
      jit_compile: run the computation through a cached `tf.function(jit_compile=True)`.
        Inside a caller's own compiled function leave it False.

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
    atoms_y = _as_float32(atoms_y, "atoms_y")
    atoms_f = _as_float32(atoms_f, "atoms_f")
    _check_shapes(query_y, query_f, atoms_y, atoms_f, k)
    lambda_y = _check_lambda(lambda_y, "lambda_y")
    lambda_f = _check_lambda(lambda_f, "lambda_f")
    if exclude is not None:
        exclude = _check_exclude(exclude, query_y, atoms_y)
    query_y, query_f, atoms_y, atoms_f = (
        _check_finite(x, name) for x, name in ((query_y, "query_y"), (query_f, "query_f"),
                                              (atoms_y, "atoms_y"), (atoms_f, "atoms_f")))
    omp = _compiled_omp if jit_compile else _omp
    return omp(query_y, query_f, atoms_y, atoms_f, k, lambda_y, lambda_f, exclude)


# ---- The algorithm ------------------------------------------------------------------------------


def _omp(query_y, query_f, atoms_y, atoms_f, k, lambda_y, lambda_f, exclude):
    """The unrolled k-step loop on validated float32 tensors (see joint_nonnegative_omp)."""
    query_y, query_f, atoms_y, atoms_f = (
        tf.stop_gradient(x) for x in (query_y, query_f, atoms_y, atoms_f))
    lambda_y = tf.stop_gradient(lambda_y)
    lambda_f = tf.stop_gradient(lambda_f)
    batch = tf.shape(query_y)[0]
    num_atoms = tf.shape(atoms_y)[0]

    # Atom norms once per call; 1/|a|^2 is 0 for zero atoms, so that side adds 0 to the score.
    inv_norm_y = tf.math.divide_no_nan(1.0, tf.reduce_sum(tf.square(atoms_y), axis=1))  # [M]
    inv_norm_f = tf.math.divide_no_nan(1.0, tf.reduce_sum(tf.square(atoms_f), axis=1))  # [M]
    atom_index = tf.range(num_atoms, dtype=tf.int32)  # [M]
    if exclude is None:
        blocked = tf.zeros([batch, num_atoms], dtype=tf.bool)  # [B, M]
    else:
        blocked = tf.stop_gradient(exclude)
    energy = (lambda_y * tf.reduce_sum(tf.square(query_y), axis=1)
              + lambda_f * tf.reduce_sum(tf.square(query_f), axis=1))  # [B]
    min_gain = RELATIVE_MIN_GAIN * energy  # [B]

    residual_y, residual_f = query_y, query_f
    alive = tf.ones([batch], dtype=tf.bool)  # [B] every earlier slot valid
    indices, valid = [], []
    chosen_y, chosen_f = [], []  # per slot: [B, L], [B, D] atom vectors (zero if invalid)
    gram_y, gram_f = [], []  # gram[i][j] = <atom_i, atom_j> for j <= i, each [B]
    rhs_y, rhs_f = [], []  # <query, atom_i>, each [B]
    coef_y, coef_f = [], []
    for step in range(k):
        # The two GEMMs of the step: correlations of the residuals with every atom.
        corr_y = tf.matmul(residual_y, atoms_y, transpose_b=True)  # [B, M]
        corr_f = tf.matmul(residual_f, atoms_f, transpose_b=True)  # [B, M]
        if step == 0:
            query_corr_y, query_corr_f = corr_y, corr_f  # residual = query at step 0
        score = _selection_scores(corr_y, corr_f, inv_norm_y, inv_norm_f, lambda_y, lambda_f)
        score = tf.where(blocked, tf.zeros_like(score), score)  # [B, M]
        best = tf.reduce_max(score, axis=1)  # [B]
        # tf.argmax leaves ties unspecified: take the first index attaining the maximum.
        first = tf.where(score == best[:, None], atom_index[None, :], num_atoms)  # [B, M]
        index = tf.reduce_min(first, axis=1)  # [B]
        ok = tf.logical_and(alive, best > min_gain)  # [B]
        index = tf.where(ok, index, 0)
        blocked = tf.logical_or(
            blocked, tf.logical_and(atom_index[None, :] == index[:, None], ok[:, None]))
        alive = ok
        indices.append(index)
        valid.append(ok)

        mask = tf.cast(ok, tf.float32)[:, None]  # [B, 1] invalid slots leave the systems
        new_y = tf.gather(atoms_y, index) * mask  # [B, L]
        new_f = tf.gather(atoms_f, index) * mask  # [B, D]
        gram_y.append([tf.reduce_sum(new_y * old, axis=1) for old in chosen_y + [new_y]])
        gram_f.append([tf.reduce_sum(new_f * old, axis=1) for old in chosen_f + [new_f]])
        chosen_y.append(new_y)
        chosen_f.append(new_f)
        rhs_y.append(tf.gather(query_corr_y, index, batch_dims=1) * mask[:, 0])
        rhs_f.append(tf.gather(query_corr_f, index, batch_dims=1) * mask[:, 0])

        # Lines 9-10 of Algorithm 2: refit ALL coefficients of each side by exact NNLS (Eq. 5).
        coef_y = _nnls_small(gram_y, rhs_y)
        coef_f = _nnls_small(gram_f, rhs_f)
        residual_y = query_y - tf.add_n([c[:, None] * a for c, a in zip(coef_y, chosen_y)])
        residual_f = query_f - tf.add_n([c[:, None] * a for c, a in zip(coef_f, chosen_f)])

    return OMPResult(indices=tf.stop_gradient(tf.stack(indices, axis=1)),
                     valid=tf.stop_gradient(tf.stack(valid, axis=1)),
                     coef_y=tf.stop_gradient(tf.stack(coef_y, axis=1)),
                     coef_f=tf.stop_gradient(tf.stack(coef_f, axis=1)))


_compiled_omp = tf.function(_omp, jit_compile=True)


def _selection_scores(corr_y, corr_f, inv_norm_y, inv_norm_f, lambda_y, lambda_f):
    """Eq. 10 restricted to c >= 0: the loss decrease of fitting one new nonnegative coefficient.

    corr_*: [B, M] <residual, atom>; inv_norm_*: [M] 1/|atom|^2 (0 for zero atoms). Returns [B, M].
    """
    gain_y = tf.square(tf.nn.relu(corr_y)) * inv_norm_y[None, :]
    gain_f = tf.square(tf.nn.relu(corr_f)) * inv_norm_f[None, :]
    return lambda_y * gain_y + lambda_f * gain_f


def _nnls_small(gram, rhs):
    """Exact NNLS  min_{c >= 0} |q - S c|^2  for a tiny support, batched over queries.

    Every sub-support P of the s slots (a constant mask, 2^s of them, the empty one included) is
    solved as an unconstrained least-squares problem by an unrolled Cholesky factorisation; the
    solutions with a negative entry are discarded and the feasible one with the smallest residual
    wins. The optimum of a convex NNLS is the least-squares solution on its own support (with a
    linearly independent support always available), so this is exact.

    Args:
      gram: lower triangle as lists, gram[i][j] = <a_i, a_j> for j <= i, each [B]. A slot whose
        diagonal entry is 0 (invalid slot or zero atom on this side) gets coefficient 0.
      rhs: list of s tensors [B], <q, a_i>.

    Returns:
      List of s coefficient tensors [B], all >= 0.
    """
    size = len(rhs)
    subsets = _subset_table(size)  # [P, s]
    usable = [gram[i][i] > 0 for i in range(size)]  # [B] each
    member = [tf.cast(tf.logical_and(usable[i][:, None], subsets[None, :, i]), tf.float32)
              for i in range(size)]  # [B, P] each: 1 if slot i is in sub-support p
    outside = [1.0 - m for m in member]

    # Masked system per sub-support: the members' ridged Gram block, identity elsewhere.
    def entry(i, j):  # [B, P]
        if i == j:
            return gram[i][i][:, None] * (1.0 + _RIDGE) * member[i] + outside[i]
        return gram[i][j][:, None] * member[i] * member[j]

    chol = [[None] * size for _ in range(size)]  # lower-triangular factor, entries [B, P]
    for j in range(size):
        diagonal = entry(j, j)
        pivot = diagonal - _sum([chol[j][q] * chol[j][q] for q in range(j)])
        # Pivot floor: rounding can make a (near-)collinear block numerically indefinite.
        chol[j][j] = tf.sqrt(tf.maximum(pivot, _RIDGE * diagonal))
        for i in range(j + 1, size):
            chol[i][j] = (entry(i, j) - _sum([chol[i][q] * chol[j][q] for q in range(j)])) / chol[j][j]
    forward = []
    for i in range(size):
        forward.append((rhs[i][:, None] * member[i]
                        - _sum([chol[i][q] * forward[q] for q in range(i)])) / chol[i][i])
    coef = [None] * size  # [B, P] each
    for i in reversed(range(size)):
        coef[i] = (forward[i] - _sum([chol[q][i] * coef[q] for q in range(i + 1, size)])) / chol[i][i]

    # |q - S c|^2 - |q|^2 = c^T G c - 2 c^T b, with the exact (unridged) Gram.
    def full_gram(i, j):
        return gram[max(i, j)][min(i, j)][:, None]

    objective = _sum([coef[i] * (_sum([full_gram(i, j) * coef[j] for j in range(size)])
                                 - 2.0 * rhs[i][:, None]) for i in range(size)])  # [B, P]
    feasible = tf.reduce_all(tf.stack([c >= 0.0 for c in coef], axis=0), axis=0)  # [B, P]
    objective = tf.where(feasible, objective, math.inf)
    lowest = tf.reduce_min(objective, axis=1, keepdims=True)  # [B, 1]; the empty set is feasible
    num_subsets = subsets.shape[0]
    first = tf.where(objective == lowest, tf.range(num_subsets)[None, :], num_subsets)
    pick = tf.reduce_min(first, axis=1)  # [B]
    picked = [tf.gather(c, pick, batch_dims=1) for c in coef]
    return [tf.where(c > 0.0, c, 0.0) for c in picked]  # turns -0.0 of empty slots into 0.0


def _subset_table(size):
    """[2^size, size] bool; row p holds the slots of sub-support p (bit i of p = slot i)."""
    rows = np.arange(2 ** size)[:, None]
    return (rows >> np.arange(size)[None, :]) & 1 == 1


def _sum(terms):
    """Sum of a Python list of tensors; 0.0 for the empty list (first pivot, first row)."""
    return tf.add_n(terms) if terms else 0.0


# ---- Input checks -------------------------------------------------------------------------------


def _check_k(k):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"joint_nonnegative_omp: k must be a Python int (the k steps are unrolled "
                        f"at trace time). Received: k={k!r} of type {type(k).__name__}.")
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
    tensor = tf.convert_to_tensor(value, dtype_hint=tf.float32)
    if tensor.shape.rank is not None and tensor.shape.rank != 0:
        raise ValueError(f"joint_nonnegative_omp: {name} must be a scalar. "
                         f"Received: {name} with shape {tensor.shape}.")
    tensor = tf.cast(tensor, tf.float32)
    if _is_concrete(tensor):
        number = float(tensor.numpy())
        if not (math.isfinite(number) and number >= 0.0):
            raise ValueError(f"joint_nonnegative_omp: {name} must be a finite number >= 0. "
                             f"Received: {name}={value!r}.")
        return tensor
    with tf.control_dependencies([
            tf.debugging.assert_all_finite(tensor, f"joint_nonnegative_omp: {name} is not finite."),
            tf.debugging.assert_non_negative(tensor, message=f"joint_nonnegative_omp: {name} must "
                                                             f"be >= 0.")]):
        return tf.identity(tensor)


def _check_exclude(exclude, query_y, atoms_y):
    tensor = tf.convert_to_tensor(exclude)
    if tensor.dtype != tf.bool:
        raise TypeError(f"joint_nonnegative_omp: exclude must be a bool [B, M] mask (True = atom "
                        f"may not be chosen for that query). Received: exclude with dtype "
                        f"{tensor.dtype.name} and shape {tensor.shape}.")
    expected = tf.TensorShape([query_y.shape[0], atoms_y.shape[0]])
    if not tensor.shape.is_compatible_with(expected):
        raise ValueError(f"joint_nonnegative_omp: exclude must have shape [B, M] = {expected} "
                         f"(B from query_y.shape={query_y.shape}, M from atoms_y.shape="
                         f"{atoms_y.shape}). Received: exclude.shape={tensor.shape}.")
    if tensor.shape.is_fully_defined() and expected.is_fully_defined():
        return tensor
    with tf.control_dependencies([tf.debugging.assert_equal(
            tf.shape(tensor), tf.stack([tf.shape(query_y)[0], tf.shape(atoms_y)[0]]),
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

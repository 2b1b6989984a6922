"""Tests of imcl_tf.omp against a plain NumPy Joint Nonnegative OMP written here (float64)."""

import itertools
import re

import numpy as np
import pytest
import tensorflow as tf

from imcl_tf import omp
from imcl_tf.omp import joint_nonnegative_omp


# ---- NumPy reference: one query at a time, greedy loop, NNLS by brute force ---------------------


def reference_nnls(atoms, target):
    """min_{c >= 0} |target - atoms^T c|^2 over every sub-support with np.linalg.lstsq."""
    size = atoms.shape[0]
    best_coef, best_loss = np.zeros(size), float(target @ target)
    for count in range(1, size + 1):
        for support in itertools.combinations(range(size), count):
            support = list(support)
            sol = np.linalg.lstsq(atoms[support].T, target, rcond=None)[0]
            if np.any(sol < 0):
                continue
            coef = np.zeros(size)
            coef[support] = sol
            residual = target - atoms.T @ coef
            loss = float(residual @ residual)
            if loss < best_loss - 1e-12 * max(best_loss, 1e-30):
                best_coef, best_loss = coef, loss
    return best_coef


def reference_omp(query_y, query_f, atoms_y, atoms_f, k, lambda_y=1.0, lambda_f=1.0,
                  exclude=None):
    """Per-query greedy Joint Nonnegative OMP in float64 (the documented semantics)."""
    query_y, query_f, atoms_y, atoms_f = (np.asarray(x, np.float64)
                                          for x in (query_y, query_f, atoms_y, atoms_f))
    batch, num_atoms = query_y.shape[0], atoms_y.shape[0]
    norm_y, norm_f = (atoms_y ** 2).sum(1), (atoms_f ** 2).sum(1)
    indices = np.zeros((batch, k), np.int64)
    valid = np.zeros((batch, k), bool)
    coef_y, coef_f = np.zeros((batch, k)), np.zeros((batch, k))
    for b in range(batch):
        energy = lambda_y * query_y[b] @ query_y[b] + lambda_f * query_f[b] @ query_f[b]
        residual_y, residual_f = query_y[b].copy(), query_f[b].copy()
        chosen = []
        for t in range(k):
            score = np.zeros(num_atoms)
            for m in range(num_atoms):
                if m in chosen or (exclude is not None and exclude[b, m]):
                    continue
                if norm_y[m] > 0:
                    score[m] += lambda_y * max(residual_y @ atoms_y[m], 0.0) ** 2 / norm_y[m]
                if norm_f[m] > 0:
                    score[m] += lambda_f * max(residual_f @ atoms_f[m], 0.0) ** 2 / norm_f[m]
            best = int(np.argmax(score))  # NumPy returns the first maximum
            if not score[best] > omp.RELATIVE_MIN_GAIN * energy:
                break
            chosen.append(best)
            indices[b, t], valid[b, t] = best, True
            coef_y[b, :t + 1] = reference_nnls(atoms_y[chosen], query_y[b])
            coef_f[b, :t + 1] = reference_nnls(atoms_f[chosen], query_f[b])
            residual_y = query_y[b] - atoms_y[chosen].T @ coef_y[b, :t + 1]
            residual_f = query_f[b] - atoms_f[chosen].T @ coef_f[b, :t + 1]
    return indices, valid, coef_y, coef_f


def random_problem(rng, batch, num_atoms, label_dim, feature_dim, mixture=True):
    """Atoms with mixed signs; queries mostly nonnegative mixtures of atoms plus noise."""
    atoms_y = rng.uniform(-1, 1, (num_atoms, label_dim)).astype(np.float32)
    atoms_f = rng.standard_normal((num_atoms, feature_dim)).astype(np.float32)
    if mixture:
        weights = rng.random((batch, num_atoms)) * (rng.random((batch, num_atoms)) < 0.1)
        query_y = weights @ atoms_y + 0.3 * rng.standard_normal((batch, label_dim))
        query_f = weights @ atoms_f + 0.3 * rng.standard_normal((batch, feature_dim))
    else:
        query_y = rng.uniform(-1, 1, (batch, label_dim))
        query_f = rng.standard_normal((batch, feature_dim))
    return query_y.astype(np.float32), query_f.astype(np.float32), atoms_y, atoms_f


def assert_matches_reference(result, problem, k, lambda_y=1.0, lambda_f=1.0, exclude=None):
    """Same slots as the reference; same coefficients where the NNLS solution is unique and
    well conditioned, otherwise (dependent or ill-conditioned support) an equally good fit."""
    indices, valid, coef_y, coef_f = reference_omp(*problem, k, lambda_y, lambda_f, exclude)
    np.testing.assert_array_equal(result.valid.numpy(), valid)
    np.testing.assert_array_equal(np.where(valid, result.indices.numpy(), -1),
                                  np.where(valid, indices, -1))
    np.testing.assert_array_equal(result.indices.numpy()[~valid], 0)  # documented padding
    query_y, query_f, atoms_y, atoms_f = (np.asarray(x, np.float64) for x in problem)
    sides = ((result.coef_y.numpy(), coef_y, query_y, atoms_y),
             (result.coef_f.numpy(), coef_f, query_f, atoms_f))
    for got, want, queries, atoms in sides:
        np.testing.assert_array_equal(got[~valid], 0.0)
        assert np.all(got >= 0.0)
        for b in range(len(queries)):
            support = atoms[indices[b][valid[b]]]  # [t, X]
            support = support[np.linalg.norm(support, axis=1) > 0]
            count = valid[b].sum()
            well_posed = (len(support) == 0 or (len(support) <= support.shape[1]
                                                 and np.linalg.cond(support) ** 2 < 1e3))
            if well_posed:
                scale = max(np.abs(want[b]).max(), 1e-6)
                np.testing.assert_allclose(got[b], want[b], rtol=1e-4, atol=1e-4 * scale)
            else:
                chosen = atoms[indices[b][:count]]
                loss = lambda c: np.sum((queries[b] - chosen.T @ c[:count]) ** 2)
                assert loss(got[b]) <= loss(want[b]) + 1e-5 * queries[b] @ queries[b]


# ---- Agreement with the reference ---------------------------------------------------------------

CASES = [  # (B, M, L, D, k, lambda_y, lambda_f, mixture)
    (1, 7, 3, 4, 1, 1.0, 1.0, True),
    (5, 40, 10, 16, 3, 1.0, 1.0, True),
    (4, 40, 10, 16, 5, 0.7, 0.2, True),
    (3, 25, 25, 6, 4, 1.0, 0.0, True),
    (3, 25, 6, 25, 4, 0.0, 2.0, True),
    (6, 60, 5, 5, 5, 1.0, 1.0, False),
    (2, 9, 12, 3, 5, 0.5, 1.5, False),
    (8, 120, 20, 30, 2, 1.0, 0.5, True),
    (4, 5, 4, 4, 5, 1.0, 1.0, False),
    (5, 30, 8, 8, 3, 3.0, 0.01, False),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_numpy_reference(case, seed):
    batch, num_atoms, label_dim, feature_dim, k, lambda_y, lambda_f, mixture = CASES[case]
    rng = np.random.default_rng(100 * case + seed)
    problem = random_problem(rng, batch, num_atoms, label_dim, feature_dim, mixture)
    result = joint_nonnegative_omp(*problem, k, lambda_y=lambda_y, lambda_f=lambda_f)
    assert result.indices.dtype == tf.int32 and result.valid.dtype == tf.bool
    assert result.coef_y.dtype == tf.float32 and result.coef_f.dtype == tf.float32
    assert result.indices.shape == (batch, k)
    assert_matches_reference(result, problem, k, lambda_y, lambda_f)


def test_excluding_the_query_itself(rng):
    query_y, query_f, atoms_y, atoms_f = random_problem(rng, 4, 30, 8, 12)
    # Put each query into the dictionary; unexcluded it is a perfect (score-maximal) match.
    slots = np.array([3, 11, 12, 29])
    atoms_y[slots], atoms_f[slots] = query_y, query_f
    free = joint_nonnegative_omp(query_y, query_f, atoms_y, atoms_f, 3)
    np.testing.assert_array_equal(free.indices.numpy()[:, 0], slots)
    np.testing.assert_allclose(free.coef_y.numpy()[:, 0], 1.0, rtol=1e-5)
    np.testing.assert_array_equal(free.valid.numpy()[:, 1:], False)  # nothing left to explain

    exclude = np.zeros((4, 30), bool)
    exclude[np.arange(4), slots] = True
    exclude[0, :5] = True  # and a few unrelated atoms for the first query
    result = joint_nonnegative_omp(query_y, query_f, atoms_y, atoms_f, 3, exclude=exclude)
    assert not np.any(exclude[np.arange(4)[:, None], result.indices.numpy()]
                      & result.valid.numpy())
    assert_matches_reference(result, (query_y, query_f, atoms_y, atoms_f), 3, exclude=exclude)


def test_exact_ties_go_to_the_lower_index(rng):
    query_y, query_f, atoms_y, atoms_f = random_problem(rng, 3, 20, 6, 9)
    atoms_y[[4, 13]], atoms_f[[4, 13]] = atoms_y[13], atoms_f[13]  # duplicates, equal scores
    query_y[:] = 3.0 * atoms_y[13] + 0.01 * rng.standard_normal((3, 6))
    query_f[:] = 3.0 * atoms_f[13] + 0.01 * rng.standard_normal((3, 9))
    result = joint_nonnegative_omp(query_y, query_f, atoms_y, atoms_f, 4)
    indices, valid = result.indices.numpy(), result.valid.numpy()
    np.testing.assert_array_equal(indices[:, 0], 4)
    assert not np.any((indices == 13) & valid)  # the copy adds nothing once 4 is in
    assert_matches_reference(result, (query_y, query_f, atoms_y, atoms_f), 4)

    exclude = np.zeros((3, 20), bool)
    exclude[:, 4] = True
    blocked = joint_nonnegative_omp(query_y, query_f, atoms_y, atoms_f, 4, exclude=exclude)
    np.testing.assert_array_equal(blocked.indices.numpy()[:, 0], 13)

    # Many exact ties at once: identical atoms everywhere, the first index wins.
    same = joint_nonnegative_omp(np.ones((2, 3)), np.ones((2, 2)), np.ones((6, 3)),
                                 np.ones((6, 2)), 2)
    np.testing.assert_array_equal(same.indices.numpy(), [[0, 0], [0, 0]])
    np.testing.assert_array_equal(same.valid.numpy(), [[True, False], [True, False]])


def test_zero_norm_atoms(rng):
    query_y, query_f, atoms_y, atoms_f = random_problem(rng, 5, 24, 7, 10)
    atoms_y[[0, 5, 9]] = 0.0  # label side empty: only the feature side can score
    atoms_f[[2, 9]] = 0.0  # atom 9 is zero on both sides
    query_y[1] = 2.0 * atoms_y[2]  # a perfect label match whose feature side is zero
    result = joint_nonnegative_omp(query_y, query_f, atoms_y, atoms_f, 4)
    indices, valid = result.indices.numpy(), result.valid.numpy()
    assert not np.any((indices == 9) & valid)
    for side, zero_atoms in ((result.coef_y.numpy(), [0, 5, 9]), (result.coef_f.numpy(), [2, 9])):
        assert np.all(side[np.isin(indices, zero_atoms) & valid] == 0.0)
    assert np.all(np.isfinite(result.coef_y.numpy())) and np.all(np.isfinite(result.coef_f.numpy()))
    assert_matches_reference(result, (query_y, query_f, atoms_y, atoms_f), 4)


def test_fewer_helpful_atoms_than_k_gives_invalid_slots(rng):
    atoms_y = -rng.random((12, 5)).astype(np.float32)  # every entry <= 0
    atoms_f = -rng.random((12, 6)).astype(np.float32)
    query_y = rng.random((3, 5)).astype(np.float32)  # every entry >= 0
    query_f = rng.random((3, 6)).astype(np.float32)
    none_help = joint_nonnegative_omp(query_y, query_f, atoms_y, atoms_f, 3)
    np.testing.assert_array_equal(none_help.valid.numpy(), False)
    np.testing.assert_array_equal(none_help.indices.numpy(), 0)
    np.testing.assert_array_equal(none_help.coef_y.numpy(), 0.0)
    np.testing.assert_array_equal(none_help.coef_f.numpy(), 0.0)

    # Two helpful atoms reconstruct the queries exactly; k=5 leaves three invalid slots.
    atoms_y[[3, 8]], atoms_f[[3, 8]] = rng.random((2, 5)), rng.random((2, 6))
    query_y = (np.array([[1.0, 0.5], [0.2, 2.0], [1.0, 0.0]]) @ atoms_y[[3, 8]]).astype(np.float32)
    query_f = (np.array([[0.3, 0.7], [1.0, 1.0], [0.5, 0.0]]) @ atoms_f[[3, 8]]).astype(np.float32)
    result = joint_nonnegative_omp(query_y, query_f, atoms_y, atoms_f, 5)
    valid = result.valid.numpy()
    np.testing.assert_array_equal(valid.sum(axis=1), [2, 2, 1])
    assert np.all(valid[:, :1]) and not np.any(valid[:, 2:])  # invalid slots are trailing
    np.testing.assert_allclose(np.sort(result.coef_y.numpy()[0, :2]), [0.5, 1.0], rtol=1e-4)
    assert_matches_reference(result, (query_y, query_f, atoms_y, atoms_f), 5)


# ---- Optimality and Eq. 10 ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_coefficients_satisfy_nnls_kkt(seed):
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, 6, 50, 12, 15, mixture=seed == 0)
    result = joint_nonnegative_omp(*problem, 5, lambda_y=0.6, lambda_f=1.3)
    query_y, query_f, atoms_y, atoms_f = (x.astype(np.float64) for x in problem)
    for b in range(6):
        support = result.indices.numpy()[b][result.valid.numpy()[b]]
        count = len(support)
        for query, atoms, coef in ((query_y[b], atoms_y, result.coef_y.numpy()[b]),
                                   (query_f[b], atoms_f, result.coef_f.numpy()[b])):
            coef = coef[:count].astype(np.float64)
            assert np.all(coef >= 0.0)
            chosen = atoms[support]  # [t, X]
            gradient = chosen @ (chosen.T @ coef - query)  # d/dc of |q - S c|^2 / 2
            tol = 1e-4 * np.linalg.norm(query) * np.linalg.norm(chosen, axis=1)
            assert np.all(np.abs(gradient[coef > 0]) <= tol[coef > 0])
            assert np.all(gradient[coef == 0] >= -tol[coef == 0])


def test_selection_score_is_the_exact_loss_decrease(rng):
    """Eq. 10: score = decrease of lambda_y|r_y|^2 + lambda_f|r_f|^2 fitting one new c >= 0."""
    residual_y, residual_f = rng.standard_normal((4, 6)), rng.standard_normal((4, 9))
    atoms_y, atoms_f = rng.standard_normal((15, 6)), rng.standard_normal((15, 9))
    atoms_y[3] = 0.0
    lambda_y, lambda_f = 0.8, 1.7
    inv_norm = lambda atoms: np.where((atoms ** 2).sum(1) > 0,
                                      1.0 / np.maximum((atoms ** 2).sum(1), 1e-30), 0.0)
    score = omp._selection_scores(
        tf.constant(residual_y @ atoms_y.T, tf.float32), tf.constant(residual_f @ atoms_f.T,
                                                                      tf.float32),
        tf.constant(inv_norm(atoms_y), tf.float32), tf.constant(inv_norm(atoms_f), tf.float32),
        lambda_y, lambda_f).numpy()

    def decrease(residual, atom):
        coef = reference_nnls(atom[None, :], residual)[0]
        after = residual - coef * atom
        for nearby in (coef + 1e-3, max(coef - 1e-3, 0.0)):  # the 1-D fit really is a minimum
            other = residual - nearby * atom
            assert other @ other >= after @ after - 1e-12
        return residual @ residual - after @ after

    expected = np.array([[lambda_y * decrease(residual_y[b], atoms_y[m])
                          + lambda_f * decrease(residual_f[b], atoms_f[m])
                          for m in range(15)] for b in range(4)])
    np.testing.assert_allclose(score, expected, rtol=1e-5, atol=1e-5 * expected.max())

    # Through the public API: with k=1 the chosen atom maximises that decrease and the
    # coefficients are the single-atom nonnegative fits.
    result = joint_nonnegative_omp(residual_y, residual_f, atoms_y, atoms_f, 1,
                                   lambda_y=lambda_y, lambda_f=lambda_f)
    np.testing.assert_array_equal(result.indices.numpy()[:, 0], expected.argmax(axis=1))
    picked = expected.argmax(axis=1)
    want_y = [reference_nnls(atoms_y[m][None], residual_y[b])[0] for b, m in enumerate(picked)]
    np.testing.assert_allclose(result.coef_y.numpy()[:, 0], want_y, rtol=1e-4, atol=1e-6)


# ---- Compilation, gradients, precision ----------------------------------------------------------


@pytest.mark.slow  # two XLA compilations: ~10 s, more on a loaded machine
def test_jit_compiled_matches_eager(rng):
    problem = random_problem(rng, 6, 45, 9, 14)
    exclude = rng.random((6, 45)) < 0.2
    eager = joint_nonnegative_omp(*problem, 4, lambda_y=0.5, lambda_f=1.0, exclude=exclude)
    compiled = joint_nonnegative_omp(*problem, 4, lambda_y=tf.constant(0.5), lambda_f=1.0,
                                     exclude=exclude, jit_compile=True)

    @tf.function(jit_compile=True)
    def inside_callers_step(query_y, query_f, atoms_y, atoms_f, lambda_y):
        return joint_nonnegative_omp(query_y, query_f, atoms_y, atoms_f, 4, lambda_y=lambda_y,
                                     exclude=tf.constant(exclude))

    nested = inside_callers_step(*problem, tf.constant(0.5))
    for other in (compiled, nested):
        np.testing.assert_array_equal(other.indices.numpy(), eager.indices.numpy())
        np.testing.assert_array_equal(other.valid.numpy(), eager.valid.numpy())
        np.testing.assert_allclose(other.coef_y.numpy(), eager.coef_y.numpy(), rtol=1e-5,
                                   atol=1e-6)
        np.testing.assert_allclose(other.coef_f.numpy(), eager.coef_f.numpy(), rtol=1e-5,
                                   atol=1e-6)


def test_unknown_batch_size_in_a_graph(rng):
    problem = random_problem(rng, 5, 30, 6, 8)
    spec = [tf.TensorSpec([None, 6]), tf.TensorSpec([None, 8]), tf.TensorSpec([30, 6]),
            tf.TensorSpec([30, 8]), tf.TensorSpec([None, 30], tf.bool)]

    @tf.function(input_signature=spec)
    def graph_omp(query_y, query_f, atoms_y, atoms_f, exclude):
        return joint_nonnegative_omp(query_y, query_f, atoms_y, atoms_f, 3, exclude=exclude)

    exclude = np.zeros((5, 30), bool)
    exclude[:, 7] = True
    result = graph_omp(*problem, exclude)
    assert_matches_reference(result, problem, 3, exclude=exclude)
    with pytest.raises(tf.errors.InvalidArgumentError, match="query_f contains non-finite"):
        bad_f = problem[1].copy()
        bad_f[2, 3] = np.nan
        graph_omp(problem[0], bad_f, problem[2], problem[3], exclude)


def test_check_atoms_false_skips_only_the_atoms_check(rng):
    """In a graph the atoms' finiteness check is a pass over the dictionary; check_atoms=False
    skips it (the result on finite atoms is unchanged) and still checks the queries."""
    problem = random_problem(rng, 5, 30, 6, 8)

    @tf.function
    def graph_omp(query_y, query_f, atoms_y, atoms_f, check_atoms):
        return joint_nonnegative_omp(query_y, query_f, atoms_y, atoms_f, 3,
                                     check_atoms=check_atoms)

    assert_matches_reference(graph_omp(*problem, False), problem, 3)
    bad_atoms = problem[2].copy()
    bad_atoms[4, 1] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match="atoms_y contains non-finite"):
        graph_omp(problem[0], problem[1], bad_atoms, problem[3], True)
    # Unchecked, the non-finite atom is never chosen: the same as excluding it for everyone.
    exclude = np.zeros((5, 30), bool)
    exclude[:, 4] = True
    expected = joint_nonnegative_omp(*problem, 3, exclude=exclude)
    for jit_compile in (False, True):
        got = joint_nonnegative_omp(*[tf.constant(x) for x in (problem[0], problem[1],
                                                               bad_atoms, problem[3])], 3,
                                    check_atoms=False, jit_compile=jit_compile)
        np.testing.assert_array_equal(got.valid, expected.valid)
        np.testing.assert_array_equal(np.where(got.valid, got.indices, -1),
                                      np.where(expected.valid, expected.indices, -1))
        np.testing.assert_allclose(got.coef_y, expected.coef_y, rtol=1e-5, atol=1e-6)
    graph_result = graph_omp(problem[0], problem[1], bad_atoms, problem[3], False)
    np.testing.assert_array_equal(graph_result.valid, expected.valid)
    bad_query = problem[0].copy()
    bad_query[0, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="query_y contains non-finite"):
        graph_omp(bad_query, problem[1], problem[2], problem[3], False)


def test_outputs_carry_no_gradient(rng):
    problem = [tf.constant(x) for x in random_problem(rng, 3, 20, 5, 7)]
    lambda_y = tf.Variable(0.7)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(problem)
        result = joint_nonnegative_omp(*problem, 3, lambda_y=lambda_y)
        total = tf.reduce_sum(result.coef_y) + tf.reduce_sum(result.coef_f)
    assert all(g is None for g in tape.gradient(total, problem + [lambda_y]))


def test_half_precision_inputs_run_in_float32(rng):
    problem = [x.astype(np.float16) for x in random_problem(rng, 4, 30, 6, 10)]
    result = joint_nonnegative_omp(*problem, 3)
    assert result.coef_y.dtype == tf.float32
    upcast = joint_nonnegative_omp(*[x.astype(np.float32) for x in problem], 3)
    np.testing.assert_array_equal(result.indices.numpy(), upcast.indices.numpy())
    np.testing.assert_array_equal(result.coef_f.numpy(), upcast.coef_f.numpy())


def test_near_collinear_atoms_stay_finite(rng):
    atoms_y = np.repeat(rng.random((1, 6)), 6, axis=0) + 1e-7 * rng.random((6, 6))
    atoms_f = np.repeat(rng.random((1, 8)), 6, axis=0) + 1e-7 * rng.random((6, 8))
    query_y, query_f = rng.random((3, 6)) + atoms_y[0], rng.random((3, 8))
    result = joint_nonnegative_omp(query_y, query_f, atoms_y, atoms_f, 5)
    for tensor in (result.coef_y, result.coef_f):
        assert np.all(np.isfinite(tensor.numpy())) and np.all(tensor.numpy() >= 0)


# ---- Bad input ----------------------------------------------------------------------------------


def _good(rng):
    return dict(query_y=rng.random((3, 4)), query_f=rng.random((3, 5)),
                atoms_y=rng.random((6, 4)), atoms_f=rng.random((6, 5)), k=2)


BAD_INPUTS = [  # (changes, error type, message pattern)
    (dict(query_y=np.ones(4)), ValueError, r"query_y must have rank 2.*query_y.shape=\(4,\)"),
    (dict(atoms_f=np.ones((6, 5, 1))), ValueError, r"atoms_f must have rank 2.*\(6, 5, 1\)"),
    (dict(query_f=np.ones((2, 5))), ValueError, r"batch size B.*query_f.shape=\(2, 5\)"),
    (dict(atoms_f=np.ones((7, 5))), ValueError, r"number of atoms M.*atoms_f.shape=\(7, 5\)"),
    (dict(atoms_y=np.ones((6, 3))), ValueError, r"label dimension L.*atoms_y.shape=\(6, 3\)"),
    (dict(query_f=np.ones((3, 2))), ValueError, r"feature dimension D.*query_f.shape=\(3, 2\)"),
    (dict(k=0), ValueError, r"k must be in \[1, 8\].*k=0"),
    (dict(k=7), ValueError, r"k=7 is larger than the number of atoms M=6"),
    (dict(k=2.0), TypeError, r"k must be a Python int.*k=2.0"),
    (dict(k=True), TypeError, r"k must be a Python int.*k=True"),
    (dict(query_y=np.array([[1, 2, 3, np.inf]] * 3)), ValueError,
     r"query_y contains non-finite values \(first at \[0, 3\]: inf\)"),
    (dict(atoms_f=np.where(np.eye(6, 5) > 0, np.nan, 1.0)), ValueError,
     r"atoms_f contains non-finite values \(first at \[0, 0\]: nan\)"),
    (dict(exclude=np.zeros((3, 5), bool)), ValueError,
     r"exclude must have shape \[B, M\] = \(3, 6\).*exclude.shape=\(3, 5\)"),
    (dict(exclude=np.zeros((3, 6), np.int32)), TypeError,
     r"exclude must be a bool.*dtype int32"),
    (dict(lambda_y=-0.5), ValueError, r"lambda_y must be a finite number >= 0.*lambda_y=-0.5"),
    (dict(lambda_f=float("nan")), ValueError, r"lambda_f must be a finite number.*lambda_f=nan"),
    (dict(lambda_f=tf.constant([1.0, 2.0])), ValueError, r"lambda_f must be a scalar.*\(2,\)"),
    (dict(lambda_y=tf.constant(-2.0)), ValueError, r"lambda_y must be a finite.*lambda_y=-2.0"),
    (dict(query_y=np.array([["a"] * 4] * 3)), TypeError, r"query_y must be a real-valued.*string"),
]


@pytest.mark.parametrize("changes,error,pattern", BAD_INPUTS,
                         ids=[re.sub(r"\W+", "_", p[2])[:40] for p in BAD_INPUTS])
def test_bad_input_is_rejected_with_a_clear_message(rng, changes, error, pattern):
    arguments = _good(rng)
    arguments.update(changes)
    with pytest.raises(error, match=pattern):
        joint_nonnegative_omp(**arguments)


def test_negative_lambda_tensor_in_a_graph_is_caught(rng):
    arguments = _good(rng)

    @tf.function
    def graph_omp(lambda_f):
        return joint_nonnegative_omp(**arguments, lambda_f=lambda_f)

    assert graph_omp(tf.constant(0.5)).indices.shape == (3, 2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="lambda_f must be >= 0"):
        graph_omp(tf.constant(-1.0))


def test_given_atom_norms_give_the_same_result_and_are_checked(rng):
    problem = random_problem(rng, 5, 30, 7, 9)
    query_y, query_f, atoms_y, atoms_f = problem
    plain = joint_nonnegative_omp(*problem, 3, lambda_y=0.5)
    given = joint_nonnegative_omp(*problem, 3, lambda_y=0.5,
                                  atoms_y_sq_norms=np.sum(np.square(atoms_y), 1),
                                  atoms_f_sq_norms=np.sum(np.square(atoms_f), 1))
    np.testing.assert_array_equal(given.indices.numpy(), plain.indices.numpy())
    np.testing.assert_array_equal(given.valid.numpy(), plain.valid.numpy())
    np.testing.assert_allclose(given.coef_y.numpy(), plain.coef_y.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(given.coef_f.numpy(), plain.coef_f.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"atoms_f_sq_norms must be \[M\] = \[30\]"):
        joint_nonnegative_omp(*problem, 3, atoms_f_sq_norms=np.ones(29))


@pytest.mark.parametrize("sizes", [(30,), (7, 23), (1, 10, 4, 15)])
def test_row_blocks_give_the_reference_result(sizes):
    """atoms_y as row blocks (eagerly, jit-compiled and in a graph with unknown block sizes) is
    the dictionary of their concatenation, with exclusions and given norms."""
    rng = np.random.default_rng(len(sizes))
    problem = random_problem(rng, 6, sum(sizes), 8, 11)
    query_y, query_f, atoms_y, atoms_f = problem
    blocks = np.split(atoms_y, np.cumsum(sizes)[:-1])
    exclude = rng.random((6, sum(sizes))) < 0.2
    for jit in (False, True):
        result = joint_nonnegative_omp(query_y, query_f, blocks, atoms_f, 4, lambda_y=0.7,
                                       exclude=exclude, jit_compile=jit)
        assert_matches_reference(result, problem, 4, lambda_y=0.7, exclude=exclude)

    @tf.function(input_signature=[tf.TensorSpec([None, 8], tf.float32)] * len(sizes))
    def graph_omp(*parts):
        return joint_nonnegative_omp(query_y, query_f, list(parts), atoms_f, 4, lambda_y=0.7,
                                     exclude=exclude,
                                     atoms_y_sq_norms=np.sum(np.square(atoms_y), 1))

    assert_matches_reference(graph_omp(*blocks), problem, 4, lambda_y=0.7, exclude=exclude)


def test_bad_row_blocks_are_rejected(rng):
    arguments = _good(rng)
    with pytest.raises(ValueError, match=r"atoms_y is an empty list"):
        joint_nonnegative_omp(**{**arguments, "atoms_y": []})
    with pytest.raises(ValueError, match=r"row blocks of atoms_y must all be \[M_i, L\] with "
                                         r"one L.*\(2, 4\), \(4, 3\)"):
        joint_nonnegative_omp(**{**arguments, "atoms_y": [np.ones((2, 4)), np.ones((4, 3))]})
    with pytest.raises(ValueError, match=r"number of atoms M.*atoms_y.shape=\(5, 4\)"):
        joint_nonnegative_omp(**{**arguments, "atoms_y": [np.ones((2, 4)), np.ones((3, 4))]})
    bad = np.ones((4, 4))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"atoms_y \(row block 1\) contains non-finite values "
                                         r"\(first at \[1, 2\]: nan\)"):
        joint_nonnegative_omp(**{**arguments, "atoms_y": [np.ones((2, 4)), bad]})


@pytest.mark.parametrize("constant", [1.0, -0.5])
def test_a_constant_feature_coordinate_is_the_joined_dictionary(constant):
    """atoms_f_constant c: the same as the feature atoms [f_m, c] joined (with or without given
    norms, eagerly and compiled), and the query keeps its D + 1 columns."""
    rng = np.random.default_rng(7)
    query_y, query_f, atoms_y, atoms_f = random_problem(rng, 6, 35, 7, 10)
    joined = np.concatenate([atoms_f, np.full((35, 1), constant, np.float32)], axis=1)
    query_f = np.concatenate([query_f, rng.standard_normal((6, 1)).astype(np.float32)], axis=1)
    problem = (query_y, query_f, atoms_y, joined)
    exclude = rng.random((6, 35)) < 0.2
    for jit in (False, True):
        for norms in (None, np.sum(np.square(joined), 1)):
            result = joint_nonnegative_omp(query_y, query_f, atoms_y, atoms_f, 3, lambda_f=0.6,
                                           exclude=exclude, jit_compile=jit,
                                           atoms_f_sq_norms=norms, atoms_f_constant=constant)
            assert_matches_reference(result, problem, 3, lambda_f=0.6, exclude=exclude)
    with pytest.raises(ValueError, match=r"feature dimension D.*query_f.shape=\(6, 10\)"):
        joint_nonnegative_omp(query_y, query_f[:, :10], atoms_y, atoms_f, 3,
                              atoms_f_constant=constant)
    with pytest.raises(ValueError, match=r"atoms_f_constant must be None or a finite number"):
        joint_nonnegative_omp(query_y, query_f, atoms_y, atoms_f, 3, atoms_f_constant=np.inf)

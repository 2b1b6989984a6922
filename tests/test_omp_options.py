"""The official OMP options: score threshold tau and score balancing, against NumPy (float64)."""

import numpy as np
import pytest

from imcl_tf import omp
from imcl_tf.omp import joint_nonnegative_omp
from test_omp import random_problem, reference_nnls


def reference(query_y, query_f, atoms_y, atoms_f, k, lambda_y, lambda_f, tau=0.0,
              balance=False):
    """Per-query greedy loop with the official tau test and is_balance choice, written here."""
    query_y, query_f, atoms_y, atoms_f = (np.asarray(x, np.float64)
                                          for x in (query_y, query_f, atoms_y, atoms_f))
    batch, num_atoms = query_y.shape[0], atoms_y.shape[0]
    norm_y, norm_f = (atoms_y ** 2).sum(1), (atoms_f ** 2).sum(1)
    scale = max(lambda_y, lambda_f) + 1e-4
    indices = np.zeros((batch, k), np.int64)
    valid = np.zeros((batch, k), bool)
    coef_y = np.zeros((batch, k))
    for b in range(batch):
        energy = lambda_y * query_y[b] @ query_y[b] + lambda_f * query_f[b] @ query_f[b]
        residual_y, residual_f = query_y[b].copy(), query_f[b].copy()
        chosen = []
        for t in range(k):
            gain_y, gain_f = np.zeros(num_atoms), np.zeros(num_atoms)
            for m in range(num_atoms):
                if m in chosen:
                    continue
                gain_y[m] = max(residual_y @ atoms_y[m], 0.0) ** 2 / norm_y[m]
                gain_f[m] = max(residual_f @ atoms_f[m], 0.0) ** 2 / norm_f[m]
            score = lambda_y * gain_y + lambda_f * gain_f
            if balance:
                choice = (lambda_y * gain_y / max(gain_y.max(), 1e-300)
                          + lambda_f * gain_f / max(gain_f.max(), 1e-300))
            else:
                choice = score
            best = int(np.argmax(choice))
            if not score[best] > omp.RELATIVE_MIN_GAIN * energy:
                break
            if choice[best] / scale < tau:
                break
            chosen.append(best)
            indices[b, t], valid[b, t] = best, True
            coef_y[b, :t + 1] = reference_nnls(atoms_y[chosen], query_y[b])
            coef_f = reference_nnls(atoms_f[chosen], query_f[b])
            residual_y = query_y[b] - atoms_y[chosen].T @ coef_y[b, :t + 1]
            residual_f = query_f[b] - atoms_f[chosen].T @ coef_f
    return indices, valid, coef_y


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lambdas", [(1.0, 0.5), (0.3, 2.0)])
def test_balanced_scores_match_the_reference(seed, lambdas):
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, 6, 30, 8, 12, mixture=False)
    # Feature gains much larger than label gains: balancing changes the choice.
    problem = (problem[0], 10 * problem[1], problem[2], 10 * problem[3])
    got = joint_nonnegative_omp(*problem, 3, *lambdas, balance_scores=True)
    indices, valid, coef_y = reference(*problem, 3, *lambdas, balance=True)
    np.testing.assert_array_equal(got.valid.numpy(), valid)
    np.testing.assert_array_equal(np.where(valid, got.indices.numpy(), -1),
                                  np.where(valid, indices, -1))
    np.testing.assert_allclose(got.coef_y.numpy(), coef_y, rtol=1e-4, atol=1e-5)
    if lambdas[0] > lambdas[1]:  # the label side has a say only once balanced
        plain = joint_nonnegative_omp(*problem, 3, *lambdas)
        assert not np.array_equal(plain.indices.numpy(), got.indices.numpy())


@pytest.mark.parametrize("seed", [0, 1])
def test_score_threshold_matches_the_reference(seed):
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, 8, 25, 6, 6, mixture=False)
    plain = joint_nonnegative_omp(*problem, 4, 1.0, 0.5)
    first = plain.valid.numpy()[:, 0]
    for balance in (False, True):
        for tau in (0.05, 0.3, 1.0):
            got = joint_nonnegative_omp(*problem, 4, 1.0, 0.5, score_threshold=tau,
                                        balance_scores=balance)
            indices, valid, coef_y = reference(*problem, 4, 1.0, 0.5, tau=tau, balance=balance)
            np.testing.assert_array_equal(got.valid.numpy(), valid, f"tau {tau}")
            np.testing.assert_array_equal(np.where(valid, got.indices.numpy(), -1),
                                          np.where(valid, indices, -1))
            np.testing.assert_allclose(got.coef_y.numpy(), coef_y, rtol=1e-4, atol=1e-5)
    assert first.all()
    cut = reference(*problem, 4, 1.0, 0.5, tau=0.3)[1]
    assert 0 < cut.sum() < plain.valid.numpy().sum()  # the threshold did remove some slots


def test_score_threshold_zero_and_compiled_agree(rng):
    problem = random_problem(rng, 5, 20, 6, 6)
    base = joint_nonnegative_omp(*problem, 3, 1.0, 0.5)
    zero = joint_nonnegative_omp(*problem, 3, 1.0, 0.5, score_threshold=0.0)
    for a, b in zip(base, zero):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    eager = joint_nonnegative_omp(*problem, 3, 1.0, 0.5, score_threshold=0.2, balance_scores=True)
    compiled = joint_nonnegative_omp(*problem, 3, 1.0, 0.5, score_threshold=0.2,
                                     balance_scores=True, jit_compile=True)
    np.testing.assert_array_equal(eager.indices.numpy(), compiled.indices.numpy())
    np.testing.assert_array_equal(eager.valid.numpy(), compiled.valid.numpy())


def test_bad_threshold_is_refused(rng):
    problem = random_problem(rng, 2, 5, 3, 3)
    with pytest.raises(ValueError, match="score_threshold must be a finite number >= 0"):
        joint_nonnegative_omp(*problem, 2, score_threshold=-1.0)

"""Dictionary selection and the bank's storage, exclusion and refresh."""

import numpy as np
import pytest
import tensorflow as tf

from imcl_tf.memory import DictionaryBank, select_dictionary


def _partial_labels(rng, num_images, num_classes, known=0.5):
    full = np.where(rng.random((num_images, num_classes)) < 0.3, 1, -1)
    mask = rng.random((num_images, num_classes)) < known
    return (full * mask).astype(np.float32)


def test_per_class_selection_covers_every_class_without_duplicates(rng):
    labels = _partial_labels(rng, 300, 12)
    chosen = select_dictionary(labels, per_class=5, seed=3)
    assert len(np.unique(chosen)) == len(chosen)
    positives_in_bank = (labels[chosen] > 0).sum(0)
    available = (labels > 0).sum(0)
    # Every class gets its quota, or all its known positives when it has fewer.
    np.testing.assert_array_less(np.minimum(available, 5) - 1, positives_in_bank)
    # Each chosen image was chosen for a class: it has at least one known positive.
    assert (labels[chosen] > 0).any(1).all()


def test_selection_is_reproducible_by_seed_and_varies_with_it(rng):
    labels = _partial_labels(rng, 300, 12)
    a = select_dictionary(labels, per_class=5, seed=7)
    b = select_dictionary(labels, per_class=5, seed=7)
    c = select_dictionary(labels, per_class=5, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_rare_class_keeps_its_images(rng):
    labels = -np.ones((100, 3), np.float32)
    labels[:, 0] = 1  # frequent class
    labels[[10, 20], 1] = 1  # rare class with two positives
    chosen = select_dictionary(labels, per_class=2, seed=0)
    assert {10, 20} <= set(chosen.tolist())


def test_whole_split_and_max_size(rng):
    labels = _partial_labels(rng, 50, 4)
    np.testing.assert_array_equal(select_dictionary(labels, per_class=0), np.arange(50))
    capped = select_dictionary(labels, per_class=0, max_size=20, seed=1)
    assert len(capped) == 20 and len(np.unique(capped)) == 20
    assert np.all(np.diff(capped) > 0)


def test_selection_errors_are_clear():
    with pytest.raises(ValueError, match="label_rows must be"):
        select_dictionary(np.zeros(5))
    with pytest.raises(ValueError, match="no training image has a known positive"):
        select_dictionary(-np.ones((5, 3)), per_class=2)
    with pytest.raises(ValueError, match="per_class"):
        select_dictionary(np.ones((5, 3)), per_class=-1)


def test_bank_refresh_exclusion_and_validation(rng):
    bank = DictionaryBank(size=5, input_shape_=(3,), inputs_dtype="float32", feature_dim=2,
                          num_classes=4)
    inputs = rng.normal(size=(5, 3)).astype(np.float32)
    labels = np.array([[1, -1, 0, 0]] * 5, np.float32)
    ids = np.array([11, 12, 13, 14, 15])
    bank.set_contents(inputs, labels, ids)
    kernel = rng.normal(size=(3, 2)).astype(np.float32)
    bank.refresh(lambda x: tf.matmul(x, kernel), batch_size=2)  # chunks of 2, 2, 1
    np.testing.assert_allclose(bank.features.numpy(), inputs @ kernel, rtol=1e-5)
    np.testing.assert_array_equal(bank.label_rows().numpy(), labels)
    mask = bank.exclusion_mask(tf.constant([13, 99], tf.int64)).numpy()
    np.testing.assert_array_equal(mask, [[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match=r"inputs must have shape \(5, 3\)"):
        bank.set_contents(inputs[:4], labels, ids)
    with pytest.raises(ValueError, match="label values must be in"):
        bank.set_contents(inputs, labels * 2, ids)
    bad = inputs.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        bank.set_contents(bad, labels, ids)

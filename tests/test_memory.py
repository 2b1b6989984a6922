"""Dictionary selection and the bank's storage, exclusion and refresh."""

import numpy as np
import pytest
import tensorflow as tf

from imcl_tf.memory import DictionaryBank, read_no_copy, select_dictionary


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


def test_bank_inputs_live_in_host_memory_not_in_weights_or_checkpoints(rng, tmp_path):
    bank = DictionaryBank(size=7, input_shape_=(4, 4, 3), inputs_dtype="uint8", feature_dim=2,
                          num_classes=3)
    images = rng.uniform(0, 255, (7, 4, 4, 3)).astype(np.float32)
    labels = rng.choice([-1, 0, 1], size=(7, 3))
    ids = np.arange(20, 27)
    # Chunks of 3, 3, 1: each converted on its own, the same as one whole-array fill.
    bank.fill((images[i:i + 3], labels[i:i + 3], ids[i:i + 3]) for i in range(0, 7, 3))
    assert bank.inputs.dtype == np.uint8
    np.testing.assert_array_equal(bank.inputs, np.round(images).astype(np.uint8))
    np.testing.assert_array_equal(bank.labels.numpy(), labels)
    np.testing.assert_array_equal(bank.ids.numpy(), ids)
    assert sorted(w.name for w in bank.weights) == ["features", "filled", "ids", "labels"]
    # Forward mode gathers neighbour inputs inside a compiled step.
    gathered = tf.function(bank)(tf.constant([6, 0, 6], tf.int32))
    assert gathered.dtype == tf.uint8 and gathered.shape == (3, 4, 4, 3)
    np.testing.assert_array_equal(gathered.numpy(), bank.inputs[[6, 0, 6]])
    bank.refresh(lambda x: tf.reduce_mean(x, axis=[1, 2])[:, :2], batch_size=3)
    expected = np.round(images).mean(axis=(1, 2))[:, :2]
    np.testing.assert_allclose(bank.features.numpy(), expected, rtol=1e-5)
    # A checkpoint holds features, labels and ids, not the 7 x 48 image bytes.
    path = tf.train.Checkpoint(bank=bank).write(str(tmp_path / "ckpt"))
    names = [name for name, _ in tf.train.list_variables(path)]
    assert not any("inputs" in name for name in names), names
    restored = DictionaryBank(size=7, input_shape_=(4, 4, 3), inputs_dtype="uint8",
                              feature_dim=2, num_classes=3)
    tf.train.Checkpoint(bank=restored).read(path).assert_existing_objects_matched()
    assert not restored.has_inputs
    with pytest.raises(ValueError, match="not in memory.*set_inputs"):
        restored.refresh(lambda x: x[:, 0, 0, :2])
    with pytest.raises(ValueError, match="not the atoms the restored bank holds"):
        restored.set_inputs([(images, labels, ids + 1)])
    restored.set_inputs([(images[:4], labels[:4], ids[:4]), (images[4:], labels[4:], ids[4:])])
    np.testing.assert_array_equal(restored.inputs, bank.inputs)
    np.testing.assert_array_equal(restored.features.numpy(), bank.features.numpy())


def test_bank_fill_rejects_bad_chunks(rng):
    bank = DictionaryBank(size=4, input_shape_=(2, 2, 3), inputs_dtype="uint8", feature_dim=2,
                          num_classes=2)
    images = rng.uniform(0, 255, (4, 2, 2, 3))
    labels = np.zeros((4, 2))
    ids = np.arange(4)
    with pytest.raises(ValueError, match=r"received 3 rows in all"):
        bank.fill([(images[:3], labels[:3], ids[:3])])
    with pytest.raises(ValueError, match=r"more than 4 rows"):
        bank.fill([(images, labels, ids), (images[:1], labels[:1], ids[:1])])
    bad = images.copy()
    bad[3, 0, 0, 0] = 300.0
    with pytest.raises(ValueError, match=r"0\.\.255.*chunk 1"):
        bank.fill([(images[:2], labels[:2], ids[:2]), (bad[2:], labels[2:], ids[2:])])
    assert not bank.has_inputs  # a failed fill leaves nothing half-written


def test_reads_without_a_copy_see_partial_writes_and_keep_their_values(rng):
    """read_no_copy after scatter writes (refresh) and slice writes: the variable's values, and a
    value read before a later partial write keeps the values it had (copy-on-write)."""
    bank = DictionaryBank(size=6, input_shape_=(3,), inputs_dtype="float32", feature_dim=2,
                          num_classes=4)
    inputs = rng.normal(size=(6, 3)).astype(np.float32)
    labels = _partial_labels(rng, 6, 4)
    bank.set_contents(inputs, labels, np.arange(6))
    kernel = rng.normal(size=(3, 2)).astype(np.float32)
    bank.refresh(lambda x: tf.matmul(x, kernel), batch_size=4)  # scatter writes, 4 + 2 rows
    first = bank.features_value()
    np.testing.assert_allclose(first.numpy(), inputs @ kernel, rtol=1e-5)
    np.testing.assert_array_equal(bank.labels_value().numpy(), labels)
    assert bank.labels_value().dtype == tf.int8
    bank.refresh(lambda x: tf.matmul(x, 2 * kernel), batch_size=4)  # while `first` is alive
    np.testing.assert_allclose(first.numpy(), inputs @ kernel, rtol=1e-5)
    np.testing.assert_allclose(bank.features_value().numpy(), inputs @ (2 * kernel), rtol=1e-5)
    # A plain tf.Variable, written in part by a slice assignment, inside a tf.function.
    variable = tf.Variable(np.arange(12, dtype=np.float32).reshape(4, 3))
    variable[1:3].assign(-np.ones((2, 3), np.float32))
    expected = np.arange(12, dtype=np.float32).reshape(4, 3)
    expected[1:3] = -1
    np.testing.assert_array_equal(tf.function(lambda: read_no_copy(variable) * 1.0)(), expected)
    before = read_no_copy(variable)
    variable.scatter_update(tf.IndexedSlices(tf.zeros([1, 3]), tf.constant([0])))
    np.testing.assert_array_equal(before.numpy(), expected)
    expected[0] = 0
    np.testing.assert_array_equal(read_no_copy(variable).numpy(), expected)

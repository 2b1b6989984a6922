"""Curriculum Labeling (imcl_tf.methods.curriculum): the partial-BCE, g, the threshold rule and
the id lookup against NumPy written here; the relabelling pass and its stages on a tiny model."""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from imcl_tf.methods import curriculum


def numpy_partial_bce(labels, logits, gamma):
    """Per image: g(p) / L * sum over known classes of the BCE, g from g(0.1) = 5, g(1) = 1."""
    alpha = 4.0 / (0.1 ** gamma - 1.0)
    beta = 1.0 - alpha
    batch, num_classes = labels.shape
    total = 0.0
    for i in range(batch):
        known = labels[i] != 0
        if not known.any():
            continue  # contributes 0
        proportion = known.sum() / num_classes
        loss = 0.0
        for c in np.flatnonzero(known):
            z = float(logits[i, c])
            # -log sigmoid(z) and -log(1 - sigmoid(z)), stable
            loss += np.logaddexp(0.0, -z) if labels[i, c] > 0 else np.logaddexp(0.0, z)
        total += (alpha * proportion ** gamma + beta) * loss / num_classes
    return total / batch


def partial_rows(rng, batch=9, num_classes=6):
    """Random rows plus one with no known positive, one with no known negative, one all unknown,
    one fully known."""
    labels = rng.choice([-1.0, 0.0, 1.0], size=[batch, num_classes])
    labels[0] = np.where(np.arange(num_classes) % 2 == 0, -1, 0)  # no known positive
    labels[1] = np.where(np.arange(num_classes) % 3 == 0, 1, 0)  # no known negative
    labels[2] = 0  # all unknown
    labels[3] = rng.choice([-1.0, 1.0], size=num_classes)  # all known
    return labels.astype(np.float32)


@pytest.mark.parametrize("gamma", [1.0, -1.0, 2.0, 0.5])
def test_partial_bce_matches_numpy(rng, gamma):
    labels = partial_rows(rng)
    logits = rng.normal(scale=3.0, size=labels.shape).astype(np.float32)
    got = float(curriculum.partial_bce(labels, logits, gamma))
    assert np.isfinite(got)
    np.testing.assert_allclose(got, numpy_partial_bce(labels, logits, gamma), rtol=1e-5)


def test_partial_bce_normalises_by_the_proportion_of_known_labels(rng):
    """The same known entries weigh more in a row with fewer known labels (g decreasing for
    gamma = 1), so this is not the plain masked BCE."""
    logits = np.zeros([1, 10], np.float32)
    sparse = np.zeros([1, 10], np.float32)
    sparse[0, 0] = 1.0  # p = 0.1: g = 5
    dense = -np.ones([1, 10], np.float32)
    dense[0, 0] = 1.0  # p = 1: g = 1
    per_entry = np.log(2.0)
    np.testing.assert_allclose(float(curriculum.partial_bce(sparse, logits, 1.0)),
                               5.0 * per_entry / 10, rtol=1e-5)
    np.testing.assert_allclose(float(curriculum.partial_bce(dense, logits, 1.0)),
                               1.0 * 10 * per_entry / 10, rtol=1e-5)


@pytest.mark.parametrize("gamma", [1.0, -1.0])
def test_partial_bce_all_unknown_rows_give_zero_and_finite_gradients(rng, gamma):
    labels = partial_rows(rng)
    logits = tf.Variable(rng.normal(size=labels.shape).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = curriculum.partial_bce(labels, logits, gamma)
    gradient = tape.gradient(loss, logits).numpy()
    assert np.all(np.isfinite(gradient))
    np.testing.assert_array_equal(gradient[labels == 0], 0.0)
    assert np.all(gradient[labels != 0] != 0.0)
    # A batch of unknown rows only: 0, not NaN.
    unknown = np.zeros([3, 6], np.float32)
    assert float(curriculum.partial_bce(unknown, logits[:3], gamma)) == 0.0


def test_partial_bce_half_precision_logits(rng):
    labels = partial_rows(rng)
    logits = rng.normal(size=labels.shape).astype(np.float16)
    got = curriculum.partial_bce(labels, logits, 1.0)
    assert got.dtype == tf.float32
    np.testing.assert_allclose(float(got), numpy_partial_bce(labels, logits.astype(np.float32),
                                                             1.0), rtol=1e-3)


@pytest.mark.parametrize("gamma", [1.0, -1.0, 2.0, 0.5, -0.3])
def test_normalization_meets_the_two_constraints(gamma):
    g = curriculum.normalization(np.array([0.1, 1.0, 0.05, 0.5], np.float32), gamma).numpy()
    np.testing.assert_allclose(g[:2], [5.0, 1.0], rtol=1e-5)
    assert np.all(g >= 1.0 - 1e-6)  # never below g(1) on (0, 1]


def test_normalization_coefficients_of_the_paper_and_gamma_zero():
    alpha, beta = curriculum.normalization_coefficients(1.0)
    np.testing.assert_allclose([alpha, beta], [-4.0 / 0.9, 1.0 + 4.0 / 0.9])
    with pytest.raises(ValueError, match="curriculum_gamma"):
        curriculum.normalization_coefficients(0.0)
    with pytest.raises(ValueError, match="curriculum_gamma"):
        curriculum.Curriculum(5, curriculum_gamma=0.0)


def numpy_threshold(rows, probabilities, theta, positive_only):
    out = rows.copy()
    for index in np.ndindex(rows.shape):
        if rows[index] != 0:
            continue
        if probabilities[index] > theta:
            out[index] = 1
        elif probabilities[index] < 1 - theta and not positive_only:
            out[index] = -1
    return out


@pytest.mark.parametrize("theta,positive_only", [(0.8808, False), (0.7, True), (0.5, False)])
def test_threshold_labels_matches_numpy(rng, theta, positive_only):
    rows = rng.choice([-1, 0, 1], size=[20, 7]).astype(np.int8)
    probabilities = rng.random(rows.shape).astype(np.float32)
    probabilities[0, :] = [theta, 1 - theta, 0.0, 1.0, 0.5, 0.999, 0.001]  # edges are strict
    rows[0, :] = 0
    got = curriculum.threshold_labels(rows, probabilities, theta, positive_only).numpy()
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got, numpy_threshold(rows, probabilities, theta,
                                                       positive_only))
    assert got[0, 0] == 0 and (got[0, 1] == 0 or theta == 0.5)


def test_threshold_labels_never_flip_known_entries(rng):
    rows = rng.choice([-1, 1], size=[10, 5]).astype(np.int8)
    confident_opposite = np.where(rows > 0, 0.0, 1.0).astype(np.float32)
    got = curriculum.threshold_labels(rows, confident_opposite, 0.6).numpy()
    np.testing.assert_array_equal(got, rows)


def test_lookup_in_state_and_out_of_state_ids(rng):
    state_ids = np.sort(rng.choice(np.arange(-1000, 1000), size=12, replace=False)).astype(
        np.int64)
    state_labels = rng.choice([-1, 0, 1], size=[12, 4]).astype(np.int8)
    outside = np.array([state_ids[0] - 5, state_ids[-1] + 5,
                        next(i for i in range(-1000, 1000) if i not in state_ids)], np.int64)
    ids = np.concatenate([state_ids[[7, 0, 11, 3]], outside])
    batch_labels = rng.choice([-1.0, 0.0, 1.0], size=[len(ids), 4]).astype(np.float32)
    positions, found = curriculum.lookup_positions(state_ids, ids)
    np.testing.assert_array_equal(found.numpy(), [True] * 4 + [False] * 3)
    np.testing.assert_array_equal(positions.numpy()[:4], [7, 0, 11, 3])
    got = curriculum.state_rows(tf.constant(state_ids), state_labels, ids, batch_labels).numpy()
    expected = batch_labels.copy()
    for row, identifier in enumerate(ids):
        where = np.flatnonzero(state_ids == identifier)
        if len(where):
            expected[row] = state_labels[where[0]]
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.float32
    # An empty state leaves every row as it is.
    empty = curriculum.state_rows(tf.zeros([0], tf.int64), np.zeros([0, 4], np.int8), ids,
                                  batch_labels)
    np.testing.assert_array_equal(empty.numpy(), batch_labels)


# ---- the state, the relabelling pass and its stages (a Dense layer as the model) ------------


def fake_run(ids, labels):
    return types.SimpleNamespace(train_ids=np.asarray(ids, np.int64),
                                 train_labels=np.asarray(labels, np.int8))


def prepared_method(rng, num_images=10, num_classes=4, **options):
    ids = rng.permutation(np.arange(100, 100 + num_images)).astype(np.int64) * 7919
    labels = rng.choice([-1, 0, 0, 1], size=[num_images, num_classes]).astype(np.int8)
    method = curriculum.Curriculum(num_classes, num_train_images=num_images, **options)
    method.attach(None)
    method.prepare(None, fake_run(ids, labels))
    return method, ids, labels


def test_prepare_sorts_the_state_and_refuses_duplicate_ids(rng):
    method, ids, labels = prepared_method(rng)
    order = np.argsort(ids)
    np.testing.assert_array_equal(method.state_ids.numpy(), ids[order])
    np.testing.assert_array_equal(method.state_labels.numpy(), labels[order])
    duplicate = ids.copy()
    duplicate[1] = duplicate[0]
    with pytest.raises(ValueError, match="distinct image/id"):
        method.prepare(None, fake_run(duplicate, labels))
    with pytest.raises(ValueError, match="built for 10 training images"):
        method.prepare(None, fake_run(ids[:5], labels[:5]))


def test_batch_rows_come_from_the_state(rng):
    method, ids, labels = prepared_method(rng)
    new_state = rng.choice([-1, 1], size=labels.shape).astype(np.int8)
    method.state_labels.assign(new_state)
    batch_ids = np.array([method.state_ids.numpy()[4], 12345], np.int64)
    batch_labels = np.zeros([2, 4 + 2], np.float32)  # 2 extra columns are dropped
    got = method.current_labels(tf.constant(batch_ids), tf.constant(batch_labels)).numpy()
    np.testing.assert_array_equal(got, [new_state[4], np.zeros(4)])


class ScoreModel(keras.Model):
    """Logits fixed per image: the model's input is the image's logit row itself."""

    def call(self, inputs, training=False):
        return inputs


def test_relabel_pass_follows_the_rule_and_keeps_earlier_labels(rng):
    method, ids, labels = prepared_method(rng, curriculum_theta=0.7)
    logits = rng.normal(scale=2.0, size=labels.shape).astype(np.float32)
    outsider = rng.normal(size=[1, 4]).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices(
        (np.concatenate([logits, outsider]),
         np.zeros([len(ids) + 1, 4], np.float32),
         np.concatenate([ids, [1]]))).batch(3)
    positives, negatives = method.relabel(ScoreModel(), dataset)
    expected = numpy_threshold(labels, 1 / (1 + np.exp(-logits)), 0.7, False)
    order = np.argsort(ids)
    np.testing.assert_array_equal(method.state_labels.numpy(), expected[order])
    newly = (expected != labels)
    assert (positives, negatives) == ((newly & (expected > 0)).sum(),
                                      (newly & (expected < 0)).sum())
    assert positives + negatives > 0
    scalars = method.scalars()
    assert scalars["curriculum/labelled"] == positives + negatives
    # A second pass with opposite scores: the labels it gave, and the known ones, stay.
    dataset_opposite = tf.data.Dataset.from_tensor_slices(
        (-logits, np.zeros(labels.shape, np.float32), ids)).batch(4)
    method.relabel(ScoreModel(), dataset_opposite)
    state = method.state_labels.numpy()
    np.testing.assert_array_equal(state[expected[order] != 0], expected[order][expected[order]
                                                                                != 0])


def test_callback_relabels_once_per_stage_boundary(rng):
    method, ids, labels = prepared_method(rng, curriculum_stage_steps=4, curriculum_theta=0.5)
    passes = []
    method.relabel = lambda model, dataset: passes.append(dataset)
    model = types.SimpleNamespace(optimizer=types.SimpleNamespace(
        iterations=tf.Variable(0, dtype=tf.int64)))
    callback = curriculum.CurriculumCallback(method, model, lambda: "train images")
    for step in range(13):
        model.optimizer.iterations.assign(step)
        callback.on_train_batch_begin(step)
    assert passes == ["train images"] * 3  # at steps 4, 8, 12
    assert int(method.stage.numpy()) == 3
    # A resumed run (its stage restored) does not redo a finished stage.
    model.optimizer.iterations.assign(12)
    callback.on_train_batch_begin(0)
    assert len(passes) == 3


def test_bad_options_name_the_flag():
    with pytest.raises(ValueError, match="curriculum_theta"):
        curriculum.Curriculum(5, curriculum_theta=0.3)
    with pytest.raises(ValueError, match="curriculum_stage_steps"):
        curriculum.Curriculum(5, curriculum_stage_steps=0)
    with pytest.raises(ValueError, match="curriculum_signs"):
        curriculum.Curriculum(5, curriculum_signs="negative")


def test_a_checkpoint_holds_the_label_state(rng, tmp_path):
    method, ids, labels = prepared_method(rng)
    state = rng.choice([-1, 0, 1], size=labels.shape).astype(np.int8)
    method.state_labels.assign(state)
    method.stage.assign(2)
    method.labelled.assign([5, 7])
    path = tf.train.Checkpoint(method=method).write(str(tmp_path / "ckpt"))
    restored = curriculum.Curriculum(4, num_train_images=len(ids))
    restored.attach(None)
    tf.train.Checkpoint(method=restored).read(path).assert_consumed()
    np.testing.assert_array_equal(restored.state_labels.numpy(), state)
    np.testing.assert_array_equal(restored.state_ids.numpy(), np.sort(ids))
    assert int(restored.stage.numpy()) == 2
    assert restored.scalars()["curriculum/labelled"] == 12.0


# ---- in the model: fit, relabel, save, reload -------------------------------------------------


def test_model_fits_relabels_saves_and_reloads_the_state(rng, tmp_path):
    from imcl_tf.models import IMCLModel, save_model_file

    num_images, num_classes = 24, 5
    inputs = rng.normal(size=[num_images, 6]).astype(np.float32)
    labels = partial_rows(rng, num_images, num_classes)
    ids = (np.arange(num_images, dtype=np.int64) * 104729)[::-1].copy()  # not sorted
    dataset = tf.data.Dataset.from_tensor_slices((inputs, labels, ids)).batch(8)
    model = IMCLModel(num_classes=num_classes, input_shape_=(6,), backbone="features",
                      method="curriculum", num_train_images=num_images,
                      curriculum_theta=0.5)
    model.method.prepare(model, fake_run(ids, labels))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    history = model.fit(dataset, epochs=2, verbose=0, shuffle=False)
    assert np.isfinite(history.history["partial_bce"][-1])
    np.testing.assert_allclose(history.history["loss"][-1], history.history["partial_bce"][-1])
    positives, negatives = model.method.relabel(model, dataset)
    # theta = 0.5 labels every unknown entry; the known ones stay.
    assert positives + negatives == int((labels == 0).sum())
    state = model.method.state_labels.numpy()
    order = np.argsort(ids)
    assert np.all(state != 0)
    np.testing.assert_array_equal(state[labels[order] != 0], labels[order][labels[order] != 0])
    # The batches now train on the state's rows.
    batch = next(iter(dataset))
    np.testing.assert_array_equal(model.method.current_labels(batch[2], batch[1]).numpy(),
                                  state[np.searchsorted(np.sort(ids), batch[2].numpy())])
    path = str(tmp_path / "curriculum.keras")
    save_model_file(model, path)
    reloaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_array_equal(reloaded.predict(inputs, verbose=0),
                                  model.predict(inputs, verbose=0))
    np.testing.assert_array_equal(reloaded.method.state_labels.numpy(), state)
    np.testing.assert_array_equal(reloaded.method.state_ids.numpy(), np.sort(ids))
    assert reloaded.method.scalars() == model.method.scalars()


# ---- a training run: stages, TensorBoard, resume ----------------------------------------------


def checkpoint_state(checkpoint_dir):
    """The label state held by the latest checkpoint of a run."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(checkpoint_dir))
    keys = [key for key in reader.get_variable_to_shape_map()
            if "state_labels" in key and "OPTIMIZER" not in key]
    assert len(keys) == 1, keys
    return reader.get_tensor(keys[0])


def test_a_run_relabels_between_stages_and_a_resume_restores_the_state(tmp_path, monkeypatch):
    from imcl_tf.training.config import TrainConfig
    from imcl_tf.training.run_files import CHECKPOINT_DIR, LOG_DIR
    from imcl_tf.training.split_reading import read_split_labels
    from imcl_tf.training.trainer import run
    from test_train_common import read_events, write_features_dataset

    data_dir = write_features_dataset(str(tmp_path / "data"), num_train=24, known_ratio=0.5)
    labels, ids = read_split_labels(data_dir, "train")
    order = np.argsort(ids)
    unknown = labels[order] == 0
    assert unknown.any()
    model_dir = str(tmp_path / "run")
    config = dict(data_dir=data_dir, model_dir=model_dir, method="curriculum",
                  backbone="features", train_steps=8, eval_every=4, checkpoint_every=4,
                  log_every=1, batch_size=8, val_split="", seed=2, verbose=0,
                  method_options={"curriculum_stage_steps": 4, "curriculum_theta": 0.5})
    summary = run(TrainConfig(**config))
    assert summary["resolved"]["curriculum_train_images"] == 24
    # The pass at the stage boundary (step 4) labelled every unknown entry (theta = 0.5); the
    # dataset's known entries are as they were.
    state = checkpoint_state(f"{model_dir}/{CHECKPOINT_DIR}")
    assert np.all(state[unknown] != 0)
    np.testing.assert_array_equal(state[~unknown], labels[order][~unknown])
    events = read_events(f"{model_dir}/{LOG_DIR}/train")
    assert [step for step, _ in events["loss/partial_bce"]] == list(range(1, 9))
    labelled = {step: float(value) for step, value in events["curriculum/labelled"]}
    assert labelled[4] == 0 and labelled[5] == labelled[8] == unknown.sum()
    # The resumed run starts from the checkpoint's state, exactly.
    restored = []
    real_restore = curriculum.Curriculum.restore

    def watched_restore(self, model, run_context):
        restored.append(self.state_labels.numpy().copy())
        return real_restore(self, model, run_context)

    monkeypatch.setattr(curriculum.Curriculum, "restore", watched_restore)
    run(TrainConfig(**{**config, "train_steps": 12}))
    assert len(restored) == 1
    np.testing.assert_array_equal(restored[0], state)

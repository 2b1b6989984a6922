"""Checks that a training method works inside the product, shared by the test_method_*.py modules:
the model fits, saves and reloads; a run warm-starts from a logistic run, logs its loss terms to
TensorBoard, resumes and exports; mixed precision keeps the scores float32.

Kept tiny (5 classes, 6-dimensional features, a few steps) so that they run in seconds on a CPU.
"""

import dataclasses
import os
import types

import keras
import numpy as np
import tensorflow as tf

from imcl_tf import export, methods, models
from imcl_tf.models import IMCLModel, save_model_file
from imcl_tf.training.config import TrainConfig
from imcl_tf.training.run_files import LOG_DIR
from imcl_tf.training.trainer import run
from test_train_common import CLASS_NAMES, read_events, write_features_dataset

NUM_CLASSES, FEATURE_DIM = len(CLASS_NAMES), 6


def bare_model(feature_dim=FEATURE_DIM):
    """What Method.attach reads of a model (its feature width, its head), for unit tests of a
    method on its own."""
    return types.SimpleNamespace(feature_dim=feature_dim,
                                 head=types.SimpleNamespace(trainable=True))


def ranking_rows(rng, batch, num_classes, known_negative=0.4):
    """Random {+1, -1, 0} rows for a ranking loss, then the rows it must skip: row 0 has no known
    positive, row 1 no known negative, row 2 nothing known; row 3 has a pair and an unknown."""
    unknown = 0.7 - known_negative
    labels = rng.choice([1.0, -1.0, 0.0], size=(batch, num_classes),
                        p=[0.3, known_negative, unknown])
    labels[0] = np.where(labels[0] > 0, -1.0, labels[0])
    labels[1] = np.where(labels[1] < 0, 1.0, labels[1])
    labels[2] = 0.0
    labels[3, :3] = [1.0, -1.0, 0.0]
    return labels.astype(np.float32)


def assert_the_draw_follows_the_global_seed(rng, loss):
    """loss(logits, labels) samples: the same tf.random seed gives the same value, another seed
    another value."""
    labels = ranking_rows(rng, 8, 8)
    logits = rng.normal(size=labels.shape).astype(np.float32)
    values = []
    for seed in (3, 3, 4):
        tf.random.set_seed(seed)
        values.append(float(loss(logits, labels)))
    assert values[0] == values[1]
    assert values[0] != values[2]


def partial_batches(seed=0, count=48, batch_size=8):
    """(features, labels, ids) arrays and their tf.data batches.

    The labels follow the features (so a method can learn them) and 40 % of them are unknown.
    Row 0 has no known negative, row 1 no known positive and row 2 nothing known.
    """
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(count, FEATURE_DIM)).astype(np.float32)
    truth = np.where(features @ rng.normal(size=(FEATURE_DIM, NUM_CLASSES)) > 0, 1.0, -1.0)
    labels = np.where(rng.random(truth.shape) < 0.4, 0.0, truth).astype(np.float32)
    labels[0] = [1, 1, 0, 0, 0]
    labels[1] = [-1, 0, -1, 0, 0]
    labels[2] = 0
    ids = np.arange(100, 100 + count, dtype=np.int64)
    dataset = tf.data.Dataset.from_tensor_slices((features, labels, ids)).batch(batch_size)
    return features, labels, ids, dataset


def _model(method, options):
    model = IMCLModel(num_classes=NUM_CLASSES, input_shape_=(FEATURE_DIM,), backbone="features",
                      method=method, method_options=dict(options))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    return model


def fit_save_reload(tmp_path, method, options, term, epochs=2):
    """Fits a features model of `method`, saves it as .keras and reloads it.

    Checks on the way that every loss term the method declares is logged and finite, that
    `term` is positive, that the model trained, and that the reloaded model is the same method
    with the same config and the same predictions. Returns (history, model, reloaded, features).
    """
    keras.utils.set_random_seed(0)
    features, _, _, dataset = partial_batches()
    model = _model(method, options)
    before = model.predict(features, verbose=0)
    history = model.fit(dataset, epochs=epochs, verbose=0, shuffle=False).history
    for name in ("loss",) + tuple(model.method.TERMS):
        assert np.all(np.isfinite(history[name])), (name, history[name])
    assert history[term][-1] > 0, history[term]
    after = model.predict(features, verbose=0)
    assert after.shape == (len(features), NUM_CLASSES) and np.all(np.isfinite(after))
    assert not np.array_equal(before, after)  # it trained
    path = str(tmp_path / "model.keras")
    save_model_file(model, path)
    reloaded = keras.saving.load_model(path, compile=False)
    assert reloaded.method_name == method and type(reloaded.method) is type(model.method)
    assert reloaded.method.get_config() == model.method.get_config()
    np.testing.assert_array_equal(reloaded.predict(features, verbose=0), after)
    return history, model, reloaded, features


def run_warm_started_resumed_and_exported(tmp_path, method, options, term):
    """A 3-step logistic run; `method` warm-started from it for 6 steps (validation on the train
    split every 3), resumed to 9; the run exported and served like its Keras model.

    Checks the summaries, that every loss/<term> tag the method declares is logged, finite, at
    every step, and that the resume starts at step 6. Returns (first, second, best model).
    """
    data_dir = write_features_dataset(str(tmp_path / "data"), num_train=32, dim=FEATURE_DIM)
    common = dict(data_dir=data_dir, backbone="features", batch_size=8, val_split="train",
                  verbose=0, seed=3)
    logistic_dir = str(tmp_path / "logistic")
    run(TrainConfig(model_dir=logistic_dir, method="logistic", train_steps=3, eval_every=3,
                    **common))
    model_dir = str(tmp_path / method)
    config = TrainConfig(model_dir=model_dir, method=method, train_steps=6, eval_every=3,
                         log_every=1, checkpoint_every=3, warm_start=logistic_dir,
                         method_options=dict(options), **common)
    first = run(config)
    assert first["method"] == method
    assert (first["start_step"], first["steps_this_run"]) == (0, 6)
    assert first["resolved"]["warm_start"] == logistic_dir
    assert first["best_val_mAP"] is not None and np.isfinite(first["best_val_mAP"])
    tags = [f"loss/{name}" for name in ("loss",) + methods.get(method).TERMS]
    assert f"loss/{term}" in tags
    assert set(first["final_train_logs"]) == {tag.split("/", 1)[1] for tag in tags}
    log_dir = os.path.join(model_dir, LOG_DIR, "train")
    assert logged_steps(log_dir, tags) == list(range(1, 7))

    second = run(dataclasses.replace(config, train_steps=9))
    assert (second["start_step"], second["steps_this_run"]) == (6, 3)
    assert second["resumed_from"].endswith("-6"), second["resumed_from"]
    assert logged_steps(log_dir, tags) == list(range(1, 10))

    version_dir = export.export_from_model_dir(model_dir, str(tmp_path / "exports"), "m")
    model, _ = models.load_model_dir(model_dir, "best")
    features = np.random.default_rng(1).normal(size=(5, FEATURE_DIM)).astype(np.float32)
    probabilities = 1.0 / (1.0 + np.exp(-model.predict(features, verbose=0)))
    served = tf.saved_model.load(version_dir).signatures["serving_default"](
        features=tf.constant(features))
    np.testing.assert_allclose(served["probabilities"].numpy(), probabilities, atol=1e-5)
    return first, second, model


def logged_steps(log_dir, tags):
    """The steps at which every one of `tags` was logged, each value checked finite."""
    events = read_events(log_dir)
    steps = None
    for tag in tags:
        assert tag in events, (tag, sorted(events))
        values = [float(value) for _, value in events[tag]]
        assert np.all(np.isfinite(values)), (tag, values)
        tag_steps = {step for step, _ in events[tag]}
        steps = tag_steps if steps is None else steps & tag_steps
    return sorted(steps)


def fit_under_mixed_precision(method, options, term):
    """A few steps under mixed_float16: finite float32 scores and loss terms."""
    features, _, _, dataset = partial_batches()
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model(method, options)
        history = model.fit(dataset, epochs=1, verbose=0, shuffle=False)
        scores = model(features)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    assert scores.dtype == tf.float32 and np.all(np.isfinite(scores.numpy()))
    assert np.isfinite(history.history[term][-1])

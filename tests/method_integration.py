"""Checks that a method works inside the product: the model fits, saves and reloads; a run logs
its loss terms, resumes and exports. Used by the per-method test modules (test_method_*.py)."""

import dataclasses
import os
import types

import keras
import numpy as np
import tensorflow as tf

from imcl_tf import export, models
from imcl_tf.models import IMCLModel, save_model_file
from imcl_tf.training.config import TrainConfig
from imcl_tf.training.run_files import LOG_DIR
from imcl_tf.training.trainer import run
from test_train_common import CLASS_NAMES, read_events, write_features_dataset

FEATURE_DIM = 6


def bare_model(feature_dim=FEATURE_DIM):
    """What Method.attach reads of a model (its feature width, its head), for unit tests of a
    method on its own."""
    return types.SimpleNamespace(feature_dim=feature_dim,
                                 head=types.SimpleNamespace(trainable=True))


def partial_batches(rng, count=24, batch_size=8):
    """(features, labels, ids) arrays and their tf.data batches: 5 classes, partial labels with
    rows that have no known positive, no known negative, and nothing known."""
    num_classes = len(CLASS_NAMES)
    features = rng.normal(size=(count, FEATURE_DIM)).astype(np.float32)
    labels = rng.choice([-1.0, 0.0, 1.0], size=(count, num_classes)).astype(np.float32)
    labels[0] = [1, 1, 0, 0, 0]
    labels[1] = [-1, 0, -1, 0, 0]
    labels[2] = 0
    ids = np.arange(100, 100 + count, dtype=np.int64)
    dataset = tf.data.Dataset.from_tensor_slices((features, labels, ids)).batch(batch_size)
    return features, labels, ids, dataset


def fit_save_reload(tmp_path, rng, method, method_options, term):
    """Fits a features model of `method` for a few steps, saves it as .keras and reloads it with
    identical predictions; returns (model, reloaded, features)."""
    keras.utils.set_random_seed(0)
    features, _, _, dataset = partial_batches(rng)
    model = IMCLModel(num_classes=len(CLASS_NAMES), input_shape_=(FEATURE_DIM,),
                      backbone="features", method=method, method_options=method_options)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    before = model.predict(features, verbose=0)
    history = model.fit(dataset, epochs=2, verbose=0, shuffle=False)
    assert np.all(np.isfinite(history.history["loss"])) and history.history[term][-1] > 0
    after = model.predict(features, verbose=0)
    assert after.shape == (len(features), len(CLASS_NAMES)) and np.all(np.isfinite(after))
    assert not np.array_equal(before, after)  # it trained
    path = str(tmp_path / "model.keras")
    save_model_file(model, path)
    reloaded = keras.saving.load_model(path, compile=False)
    assert reloaded.method_name == method
    np.testing.assert_array_equal(reloaded.predict(features, verbose=0), after)
    return model, reloaded, features


def run_resume_export(tmp_path, rng, method, method_options, term):
    """An end-to-end run (6 steps, validation on the train split every 3), its TensorBoard loss
    term, a resume to 9 steps, and the export of the run served like the Keras model."""
    data_dir = write_features_dataset(str(tmp_path / "data"), num_train=32, dim=FEATURE_DIM)
    model_dir = str(tmp_path / "run")
    config = TrainConfig(data_dir=data_dir, model_dir=model_dir, method=method,
                         backbone="features", train_steps=6, eval_every=3, batch_size=8,
                         log_every=1, checkpoint_every=3, val_split="train", verbose=0,
                         method_options=dict(method_options))
    first = run(config)
    assert first["steps_this_run"] == 6 and first["best_val_mAP"] is not None
    events = read_events(os.path.join(model_dir, LOG_DIR, "train"))
    logged = events[f"loss/{term}"]
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(float(value)) for _, value in logged)
    second = run(dataclasses.replace(config, train_steps=9))
    assert second["start_step"] == 6 and second["steps_this_run"] == 3
    assert second["resumed_from"]

    version_dir = export.export_from_model_dir(model_dir, str(tmp_path / "exports"), "m")
    model, _ = models.load_model_dir(model_dir, "best")
    features = rng.normal(size=(5, FEATURE_DIM)).astype(np.float32)
    probabilities = 1.0 / (1.0 + np.exp(-model.predict(features, verbose=0)))
    served = tf.saved_model.load(version_dir).signatures["serving_default"](
        features=tf.constant(features))
    np.testing.assert_allclose(served["probabilities"].numpy(), probabilities, atol=1e-5)
    return model


def fit_under_mixed_precision(rng, method, method_options, term):
    """A few steps under mixed_float16: finite float32 scores and loss terms."""
    features, _, _, dataset = partial_batches(rng)
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = IMCLModel(num_classes=len(CLASS_NAMES), input_shape_=(FEATURE_DIM,),
                          backbone="features", method=method, method_options=method_options)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
        history = model.fit(dataset, epochs=1, verbose=0, shuffle=False)
        scores = model(features)
    finally:
        keras.mixed_precision.set_global_policy(policy)
    assert scores.dtype == tf.float32 and np.all(np.isfinite(scores.numpy()))
    assert np.isfinite(history.history[term][-1])

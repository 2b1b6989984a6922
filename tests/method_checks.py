"""Checks every method's tests can run: the method in the model (fit, save, reload) and in a run.

Kept tiny (5 classes, 6-dimensional features, a few steps) so that they run in seconds on a CPU.
"""

import os

import keras
import numpy as np
import tensorflow as tf

from imcl_tf import methods
from imcl_tf.models import IMCLModel
from imcl_tf.training.config import TrainConfig
from imcl_tf.training.run_files import LOG_DIR
from imcl_tf.training.trainer import run
from test_train_common import read_events, write_features_dataset

NUM_CLASSES, DIM = 5, 6


def learnable_partial_batches(seed=0, count=48, batch_size=8):
    """(inputs, labels, ids) batches whose labels follow the features; 40 % of them unknown."""
    rng = np.random.default_rng(seed)
    inputs = rng.normal(size=(count, DIM)).astype(np.float32)
    truth = np.where(inputs @ rng.normal(size=(DIM, NUM_CLASSES)) > 0, 1.0, -1.0)
    labels = np.where(rng.random(truth.shape) < 0.4, 0.0, truth).astype(np.float32)
    ids = np.arange(count, dtype=np.int64)
    dataset = tf.data.Dataset.from_tensor_slices((inputs, labels, ids)).batch(batch_size)
    return inputs, dataset


def fit_save_and_reload(tmp_path, method, epochs=8, **options):
    """Trains IMCLModel with `method` on the tiny batches, saves it as .keras and reloads it.

    Returns (history, model, reloaded, inputs). Checks on the way that every logged loss is
    finite and that the reloaded model predicts as the trained one.
    """
    keras.utils.set_random_seed(0)
    model = IMCLModel(num_classes=NUM_CLASSES, input_shape_=(DIM,), backbone="features",
                      method=method, method_options=options)
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
    inputs, dataset = learnable_partial_batches()
    history = model.fit(dataset, epochs=epochs, shuffle=False, verbose=0).history
    for name in ("loss",) + tuple(model.method.TERMS):
        assert np.all(np.isfinite(history[name])), (name, history[name])
    path = str(tmp_path / f"{method}.keras")
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert type(reloaded.method) is type(model.method)
    assert reloaded.method.get_config() == model.method.get_config()
    np.testing.assert_allclose(reloaded.predict(inputs, verbose=0),
                               model.predict(inputs, verbose=0), atol=1e-6)
    return history, model, reloaded, inputs


def run_warm_started_and_resumed(tmp_path, method, **options):
    """A logistic run, then `method` warm-started from it for 6 steps, then resumed to 9.

    Checks the summary, the TensorBoard loss/<term> tags of every step, and that the second
    call resumes at step 6. Returns the two summaries.
    """
    data_dir = write_features_dataset(str(tmp_path / "data"), num_train=32, dim=DIM)
    common = dict(data_dir=data_dir, backbone="features", batch_size=8, val_split="train",
                  verbose=0, seed=3)
    logistic_dir = str(tmp_path / "logistic")
    run(TrainConfig(model_dir=logistic_dir, method="logistic", train_steps=3, eval_every=3,
                    **common))
    model_dir = str(tmp_path / method)
    config = dict(model_dir=model_dir, method=method, eval_every=3, warm_start=logistic_dir,
                  method_options=options, **common)
    first = run(TrainConfig(train_steps=6, **config))
    assert first["method"] == method
    assert (first["start_step"], first["steps_this_run"]) == (0, 6)
    assert first["resolved"]["warm_start"] == logistic_dir
    assert first["best_val_mAP"] is not None and np.isfinite(first["best_val_mAP"])
    tags = [f"loss/{term}" for term in ("loss",) + methods.get(method).TERMS]
    assert set(first["final_train_logs"]) == {tag.split("/", 1)[1] for tag in tags}
    log_dir = os.path.join(model_dir, LOG_DIR, "train")
    steps = logged_steps(log_dir, tags)
    assert steps and max(steps) <= 6, steps

    second = run(TrainConfig(train_steps=9, **config))
    assert (second["start_step"], second["steps_this_run"]) == (6, 3)
    assert second["resumed_from"].endswith("-6"), second["resumed_from"]
    resumed_steps = logged_steps(log_dir, tags)
    assert max(resumed_steps) > 6 and set(steps) <= set(resumed_steps), resumed_steps
    return first, second


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

"""Latent Noise (imcl_tf.methods.latent_noise): the noise model's reported probability and its
BCE against NumPy written here; both outputs of the method; gradients."""

import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from imcl_tf.methods import latent_noise
from imcl_tf.methods.base import Batch


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def numpy_reported(z_v, z_0, z_1):
    """h = P(h=1|v=1,x) P(v=1|x) + P(h=1|v=0,x) P(v=0|x)."""
    v, q0, q1 = sigmoid(z_v), sigmoid(z_0), sigmoid(z_1)
    return q1 * v + q0 * (1.0 - v)


def numpy_bce(labels, h, unknown_as_negative=False):
    total, count = 0.0, 0
    for index in np.ndindex(labels.shape):
        if labels[index] == 0 and not unknown_as_negative:
            continue
        total += -np.log(h[index]) if labels[index] > 0 else -np.log(1.0 - h[index])
        count += 1
    return total / count if count else 0.0


def partial_rows(rng, batch=8, num_classes=5):
    labels = rng.choice([-1.0, 0.0, 1.0], size=[batch, num_classes])
    labels[0] = [-1, 0, -1, 0, -1]  # no known positive
    labels[1] = [1, 0, 1, 0, 0]  # no known negative
    labels[2] = 0  # all unknown
    return labels.astype(np.float32)


def random_logits(rng, shape, scale=3.0):
    return [rng.normal(scale=scale, size=shape).astype(np.float32) for _ in range(3)]


def test_reported_probability_and_logit_match_numpy(rng):
    z_v, z_0, z_1 = random_logits(rng, [6, 5])
    h = numpy_reported(z_v.astype(np.float64), z_0, z_1)
    np.testing.assert_allclose(latent_noise.reported_probability(z_v, z_0, z_1).numpy(), h,
                               rtol=1e-5)
    np.testing.assert_allclose(latent_noise.reported_logits(z_v, z_0, z_1).numpy(),
                               np.log(h / (1.0 - h)), rtol=1e-4, atol=1e-5)


def test_reported_probability_limits():
    """v -> 1 gives q1, v -> 0 gives q0: the noise model, not the visual score, is reported."""
    z_0, z_1 = np.array([[-1.0]], np.float32), np.array([[2.0]], np.float32)
    np.testing.assert_allclose(latent_noise.reported_probability([[40.0]], z_0, z_1).numpy(),
                               sigmoid(2.0), rtol=1e-6)
    np.testing.assert_allclose(latent_noise.reported_probability([[-40.0]], z_0, z_1).numpy(),
                               sigmoid(-1.0), rtol=1e-6)


@pytest.mark.parametrize("unknown_as_negative", [False, True])
def test_bce_matches_numpy(rng, unknown_as_negative):
    labels = partial_rows(rng)
    z_v, z_0, z_1 = random_logits(rng, labels.shape)
    h = numpy_reported(z_v.astype(np.float64), z_0, z_1)
    got = float(latent_noise.latent_noise_bce(labels, z_v, z_0, z_1, unknown_as_negative))
    np.testing.assert_allclose(got, numpy_bce(labels, h, unknown_as_negative), rtol=1e-5)
    assert float(latent_noise.latent_noise_bce(np.zeros_like(labels), z_v, z_0, z_1)) == 0.0


def test_bce_is_not_the_visual_bce(rng):
    """With a noise model far from the identity the loss differs from the BCE of v itself."""
    labels = partial_rows(rng)
    z_v, _, _ = random_logits(rng, labels.shape)
    z_0, z_1 = np.full_like(z_v, -0.5), np.full_like(z_v, 0.5)
    got = float(latent_noise.latent_noise_bce(labels, z_v, z_0, z_1))
    visual = numpy_bce(labels, sigmoid(z_v.astype(np.float64)))
    assert abs(got - visual) > 0.05


def test_gradients_are_finite_for_extreme_logits(rng):
    labels = partial_rows(rng)
    variables = [tf.Variable(z) for z in random_logits(rng, labels.shape, scale=40.0)]
    with tf.GradientTape() as tape:
        loss = latent_noise.latent_noise_bce(labels, *variables)
    assert np.isfinite(float(loss))
    for gradient in tape.gradient(loss, variables):
        gradient = gradient.numpy()
        assert np.all(np.isfinite(gradient))
        np.testing.assert_array_equal(gradient[labels == 0], 0.0)
    logits = latent_noise.reported_logits(*variables).numpy()
    assert np.all(np.isfinite(logits))


# ---- the method on a fake model (a feature_dim and a head) -----------------------------------


def fake_model(rng, num_classes=5, dim=6):
    head = keras.layers.Dense(num_classes)
    head.build((None, dim))
    head.kernel.assign(rng.normal(size=[dim, num_classes]).astype(np.float32))
    return types.SimpleNamespace(feature_dim=dim, num_classes=num_classes, head=head)


def test_both_outputs(rng):
    model = fake_model(rng)
    method = latent_noise.LatentNoise(5)
    method.attach(model)
    features = rng.normal(size=[4, 6]).astype(np.float32)
    visual = method.logits(model, features, output="visual").numpy()
    np.testing.assert_allclose(visual, model.head(features).numpy(), rtol=1e-6)
    # At the start the noise kernel is 0: q0 = 0.05 and q1 = 0.95 for every image.
    relevant = method.logits(model, features).numpy()
    h = 0.95 * sigmoid(visual.astype(np.float64)) + 0.05 * (1 - sigmoid(visual))
    np.testing.assert_allclose(relevant, np.log(h / (1 - h)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(method.logits(model, features, output="relevant").numpy(),
                               relevant)
    # With a trained (nonzero) noise branch the relevant output follows the NumPy model.
    kernel = rng.normal(size=[6, 10]).astype(np.float32)
    method.noise.kernel.assign(kernel)
    both = features @ kernel + method.noise.bias.numpy()
    h = numpy_reported(visual.astype(np.float64), both[:, :5], both[:, 5:])
    np.testing.assert_allclose(method.logits(model, features).numpy(), np.log(h / (1 - h)),
                               rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="outputs"):
        method.logits(model, features, output="scores")


def test_loss_terms_and_gradients(rng):
    model = fake_model(rng)
    method = latent_noise.LatentNoise(5, latent_noise_q1_init=0.8, latent_noise_q0_init=0.1)
    method.attach(model)
    method.noise.kernel.assign(rng.normal(size=[6, 10]).astype(np.float32))
    features = tf.constant(rng.normal(size=[8, 6]).astype(np.float32))
    labels = partial_rows(rng)
    batch = Batch(inputs=features, labels=tf.constant(labels), ids=tf.zeros([8], tf.int64),
                  features=features)
    variables = model.head.trainable_variables + method.trainable_variables
    assert len(method.trainable_variables) == 2  # the noise branch's kernel and bias
    with tf.GradientTape() as tape:
        terms = method.loss_terms(model, batch, training=True)
    assert set(terms) == {"loss", "bce"}
    both = features.numpy() @ method.noise.kernel.numpy() + method.noise.bias.numpy()
    h = numpy_reported(model.head(features).numpy().astype(np.float64), both[:, :5], both[:, 5:])
    np.testing.assert_allclose(float(terms["loss"]), numpy_bce(labels, h), rtol=1e-5)
    for gradient in tape.gradient(terms["loss"], variables):
        assert np.all(np.isfinite(gradient.numpy())) and np.any(gradient.numpy() != 0)


def test_bad_initial_noise_names_the_flags():
    with pytest.raises(ValueError, match="latent_noise_q0_init"):
        latent_noise.LatentNoise(5, latent_noise_q1_init=0.2, latent_noise_q0_init=0.5)
    with pytest.raises(ValueError, match="latent_noise_q1_init"):
        latent_noise.LatentNoise(5, latent_noise_q1_init=1.0)


# ---- in the model: fit, save, reload ----------------------------------------------------------


def tiny_batches(rng, num_images=24, dim=6, num_classes=5):
    inputs = rng.normal(size=[num_images, dim]).astype(np.float32)
    labels = partial_rows(rng, num_images, num_classes)
    ids = np.arange(500, 500 + num_images, dtype=np.int64)
    return inputs, tf.data.Dataset.from_tensor_slices((inputs, labels, ids)).batch(8)


def test_model_fits_saves_and_reloads_both_outputs(rng, tmp_path):
    from imcl_tf.models import IMCLModel, save_model_file

    inputs, dataset = tiny_batches(rng)
    model = IMCLModel(num_classes=5, input_shape_=(6,), backbone="features",
                      method="latent_noise", latent_noise_q1_init=0.9)
    assert model.output_name == "relevant"
    model.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=False)
    kernel_before = model.method.noise.kernel.numpy().copy()
    history = model.fit(dataset, epochs=2, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][-1]) and history.history["bce"][-1] > 0
    assert np.any(model.method.noise.kernel.numpy() != kernel_before)  # the noise branch learns
    relevant = model.predict(inputs, verbose=0)
    visual = model.with_output("visual").predict(inputs, verbose=0)
    assert not np.allclose(relevant, visual)
    path = str(tmp_path / "latent_noise.keras")
    save_model_file(model.with_output("relevant"), path)
    reloaded = keras.saving.load_model(path, compile=False)
    assert reloaded.method.q1_init == 0.9 and reloaded.output_name == "relevant"
    np.testing.assert_array_equal(reloaded.predict(inputs, verbose=0), relevant)
    np.testing.assert_array_equal(reloaded.with_output("visual").predict(inputs, verbose=0),
                                  visual)
    # The output chosen at construction is the one saved and served.
    as_visual = IMCLModel(num_classes=5, input_shape_=(6,), backbone="features",
                          method="latent_noise", output="visual")
    as_visual.set_weights(model.get_weights())
    np.testing.assert_array_equal(as_visual.predict(inputs, verbose=0), visual)
    save_model_file(as_visual, str(tmp_path / "visual.keras"))
    reloaded_visual = keras.saving.load_model(str(tmp_path / "visual.keras"), compile=False)
    assert reloaded_visual.output_name == "visual"
    np.testing.assert_array_equal(reloaded_visual.predict(inputs, verbose=0), visual)


# ---- a training run, evaluated and exported with either output --------------------------------


def test_a_run_is_evaluated_and_exported_with_either_output(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from imcl_tf import evaluate, export, models
    from imcl_tf.training.config import TrainConfig
    from imcl_tf.training.run_files import LOG_DIR
    from imcl_tf.training.trainer import run
    from test_train_common import REPO_ROOT, read_events, write_features_dataset

    data_dir = write_features_dataset(str(tmp_path / "data"), num_train=24)
    model_dir = str(tmp_path / "run")
    run(TrainConfig(data_dir=data_dir, model_dir=model_dir, method="latent_noise",
                    backbone="features", train_steps=4, eval_every=2, log_every=1, batch_size=8,
                    val_split="train", seed=3, verbose=0,
                    method_options={"latent_noise_q1_init": 0.8}))
    events = read_events(os.path.join(model_dir, LOG_DIR, "train"))
    assert [step for step, _ in events["loss/bce"]] == [1, 2, 3, 4]
    model, info = models.load_model_dir(model_dir, "latest")
    assert model.output_name == "relevant" and model.method.q1_init == 0.8
    by_output = {}
    for output in ("relevant", "visual"):
        result = evaluate.evaluate_model_dir(model_dir, data_dir, split="train",
                                             checkpoint="latest", output=output,
                                             output_dir=str(tmp_path / f"eval_{output}"))
        assert result["output"] == output
        scores, _, _ = evaluate.predict_split(
            models.load_model_dir(model_dir, "latest")[0].with_output(output), data_dir,
            "train")
        by_output[output] = (result["mAP"], scores)
    assert not np.allclose(by_output["relevant"][1], by_output["visual"][1])
    with pytest.raises(evaluate.EvaluationError, match=r"--output='scores'.*relevant"):
        evaluate.evaluate_model_dir(model_dir, data_dir, split="train", checkpoint="latest",
                                    output="scores")
    # The command lines take --output.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}
    cli_eval = str(tmp_path / "eval_cli")
    completed = subprocess.run(
        [sys.executable, "-m", "imcl_tf.evaluate", f"--model_dir={model_dir}",
         f"--data_dir={data_dir}", "--split=train", "--checkpoint=latest", "--output=visual",
         f"--output_dir={cli_eval}"], capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    with open(os.path.join(cli_eval, evaluate.METRICS_JSON)) as f:
        written = json.load(f)
    assert written["output"] == "visual"
    assert written["mAP"] == pytest.approx(by_output["visual"][0], abs=1e-6)
    completed = subprocess.run(
        [sys.executable, "-m", "imcl_tf.export", f"--model_dir={model_dir}",
         f"--export_base={tmp_path / 'exports'}", "--model_name=ln", "--checkpoint=latest",
         "--output=visual"], capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    assert completed.returncode == 0, completed.stderr[-3000:]
    served = tf.saved_model.load(completed.stdout.strip().splitlines()[-1])
    features = np.random.default_rng(0).normal(size=[3, 6]).astype(np.float32)
    probabilities = served.signatures["predict_features"](features=tf.constant(features))
    visual = tf.sigmoid(model.with_output("visual")(features)).numpy()
    np.testing.assert_allclose(probabilities["probabilities"].numpy(), visual, atol=1e-5)
    with pytest.raises(export.ExportError, match=r"--output='scores'"):
        export.export_from_model_dir(model_dir, str(tmp_path / "exports"), "ln",
                                     checkpoint="latest", output="scores")

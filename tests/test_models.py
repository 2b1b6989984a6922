"""IMCLModel: both methods train end to end, save and reload, and gradients go where they should."""

import numpy as np
import pytest
import keras
import tensorflow as tf

from imcl_tf import losses
from imcl_tf.models import IMCLModel, Preprocess, build_backbone, save_model_file

SIZE, CLASSES, IMAGES = 16, 5, 48


@pytest.fixture
def batches(rng):
    images = rng.uniform(0, 255, (IMAGES, SIZE, SIZE, 3)).astype(np.float32)
    full = np.where(rng.random((IMAGES, CLASSES)) < 0.4, 1.0, -1.0)
    labels = (full * (rng.random((IMAGES, CLASSES)) < 0.5)).astype(np.float32)
    ids = np.arange(1000, 1000 + IMAGES, dtype=np.int64)
    dataset = tf.data.Dataset.from_tensor_slices((images, labels, ids)).batch(8)
    return images, labels, ids, dataset


def _model(method, images, labels, ids, **kwargs):
    model = IMCLModel(CLASSES, (SIZE, SIZE, 3), method=method,
                      dictionary_size=16 if method == "imcl" else 0, k=3, **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    if method == "imcl":
        model.fill_bank(images[:16], labels[:16], ids[:16])
    return model


@pytest.mark.parametrize("method,mode", [("logistic", "cached"), ("imcl", "cached"),
                                         ("imcl", "forward")])
def test_fit_save_reload_identical_predictions(batches, tmp_path, method, mode):
    images, labels, ids, dataset = batches
    model = _model(method, images, labels, ids, neighbour_mode=mode)
    if method == "imcl":
        resolved = model.calibrate_lambdas(dataset, num_batches=2)
        assert resolved["lambda_y"] > 0 and resolved["lambda_f"] > 0
    history = model.fit(dataset, epochs=2, verbose=0, shuffle=False)
    logs = {key: values[-1] for key, values in history.history.items()}
    assert np.isfinite(logs["loss"]) and logs["bce"] > 0
    if method == "imcl":
        assert 0 < logs["omp_valid_fraction"] <= 1
        assert logs["residual_y_after"] <= logs["residual_y_before"] + 1e-6
    else:
        assert "loss_y" not in logs and model.bank is None
    path = str(tmp_path / "model.keras")
    save_model_file(model, path)
    reloaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_array_equal(model.predict(images, verbose=0),
                                  reloaded.predict(images, verbose=0))
    if method == "imcl":
        np.testing.assert_array_equal(model.bank.features.numpy(), reloaded.bank.features.numpy())
        np.testing.assert_array_equal(model.label_graph.matrix.numpy(),
                                      reloaded.label_graph.matrix.numpy())
        assert float(reloaded.lambda_y.numpy()) == pytest.approx(float(model.lambda_y.numpy()))


def test_calibration_measures_training_mode_losses_and_keeps_batchnorm_statistics(batches):
    images, labels, ids, dataset = batches
    # Inputs far from the initial moving statistics: inference and training BatchNorm differ.
    model = _model("imcl", images, labels, ids, balance="loss_ratio")
    moving = [v.numpy().copy() for v in model.backbone.non_trainable_variables]
    assert moving, "the small CNN has BatchNorm statistics"
    resolved = model.calibrate_lambdas(dataset, num_batches=2)
    for before, variable in zip(moving, model.backbone.non_trainable_variables):
        np.testing.assert_array_equal(before, variable.numpy())
    expected_bce, inference_bce = [], []
    for start in (0, 8):
        x, y = images[start:start + 8], labels[start:start + 8]
        expected_bce.append(float(losses.masked_bce(y, model(x, training=True))))
        inference_bce.append(float(losses.masked_bce(y, model(x, training=False))))
    for before, variable in zip(moving, model.backbone.non_trainable_variables):
        variable.assign(before)
    np.testing.assert_allclose(resolved["calibration_bce"], np.mean(expected_bce), rtol=1e-5)
    assert abs(np.mean(inference_bce) - np.mean(expected_bce)) > 1e-3  # the modes do differ


def test_logistic_loss_is_the_masked_bce(batches):
    images, labels, ids, _ = batches
    model = _model("logistic", images, labels, ids)
    terms = model._loss_terms(images[:8], labels[:8], ids[:8], training=False)
    logits = model(images[:8])
    expected = losses.masked_bce(labels[:8], logits)
    np.testing.assert_allclose(terms["loss"], expected, rtol=1e-6)


def test_gradients_reach_classifier_backbone_and_graph_only_through_atoms(batches):
    images, labels, ids, _ = batches
    graph = np.full((CLASSES, CLASSES), 0.1, np.float32) + np.eye(CLASSES, dtype=np.float32)
    model = _model("imcl", images, labels, ids, label_graph_init=graph / graph.sum(0))

    def smoothness_gradients(model):
        with tf.GradientTape() as tape:
            terms = model._loss_terms(images[16:24], labels[16:24], ids[16:24], training=False)
            smooth = terms["loss_y"] + terms["loss_f"]
        variables = [model.head.kernel, model.backbone.trainable_weights[0],
                     model.label_graph.graph_matrix]
        return tape.gradient(smooth, variables)

    head_grad, backbone_grad, graph_grad = smoothness_gradients(model)
    assert np.abs(head_grad.numpy()).sum() > 0
    assert np.abs(backbone_grad.numpy()).sum() > 0
    assert np.abs(graph_grad.numpy()).sum() > 0
    # With every bank label observed, atom states no longer use the graph's propagation, so the
    # graph gets no gradient at all: it is reached through the atoms' vectors only, never the query.
    observed = np.where(labels[:16] == 0, -1.0, labels[:16]).astype(np.float32)
    model.bank.set_contents(images[:16], observed, ids[:16])
    _, _, graph_grad = smoothness_gradients(model)
    assert graph_grad is None or np.abs(graph_grad.numpy()).sum() == 0


def test_a_query_never_selects_itself(batches):
    images, labels, ids, _ = batches
    model = _model("imcl", images, labels, ids)
    # The first 8 bank images are queried: each would reconstruct itself perfectly.
    inputs, batch_labels, batch_ids = images[:8], labels[:8], ids[:8]
    features = model.extract_features(inputs)
    logits = model.head(features)
    graph = model.label_graph.matrix
    from imcl_tf.omp import joint_nonnegative_omp
    query_y = losses.query_label_states(logits, batch_labels, model.asym_c)
    bank_f = tf.concat([model.bank.features, tf.ones([16, 1])], -1)
    atoms_y = losses.atom_label_states(model.head(model.bank.features), model.bank.label_rows(),
                                       graph, model.asym_c)
    result = joint_nonnegative_omp(query_y, tf.concat([features, tf.ones([8, 1])], -1), atoms_y,
                                   bank_f, 3, exclude=model.bank.exclusion_mask(batch_ids))
    chosen = np.where(result.valid.numpy(), result.indices.numpy(), -1)
    for row, own_index in enumerate(range(8)):
        assert own_index not in chosen[row]


def test_mixed_precision_keeps_logits_float32(batches):
    images, labels, ids, dataset = batches
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = _model("imcl", images, labels, ids)
        assert model(images[:2]).dtype == tf.float32
        history = model.fit(dataset.take(2), epochs=1, verbose=0, shuffle=False)
        assert np.isfinite(history.history["loss"][-1])
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_features_backbone_is_identity_initialised(rng):
    embeddings = rng.normal(size=(6, 7)).astype(np.float32)
    model = IMCLModel(3, (7,), backbone="features", method="logistic")
    np.testing.assert_allclose(model.extract_features(embeddings), embeddings, rtol=1e-6)


def test_preprocessing_modes():
    pixels = np.array([[[[0.0, 127.5, 255.0]]]], np.float32)
    np.testing.assert_allclose(Preprocess("unit")(pixels), [[[[0, 0.5, 1]]]])
    np.testing.assert_allclose(Preprocess("symmetric")(pixels), [[[[-1, 0, 1]]]])
    np.testing.assert_allclose(Preprocess("caffe")(pixels),
                               [[[[255 - 103.939, 127.5 - 116.779, 0 - 123.68]]]], rtol=1e-6)


def test_keras_application_backbones_build_without_downloads():
    backbone = build_backbone("mobilenet_v2", (32, 32, 3), "none", freeze_batchnorm=True)
    assert backbone.output.shape[-1] == 1280
    assert not any(layer.trainable for layer in backbone.layers
                   if isinstance(layer, keras.layers.BatchNormalization))


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "imcl", "dictionary_size": 0}, "needs a dictionary bank"),
    ({"method": "imcl", "dictionary_size": 2, "k": 3}, "k must be in"),
    ({"method": "boosting"}, "method must be one of"),
    ({"backbone": "vgg7"}, "backbone must be one of"),
    ({"method": "logistic", "asym_c": 0.5}, "asym_c must be >= 1"),
    ({"method": "logistic", "backbone_weights": "missing.weights.h5"}, "no such file"),
])
def test_bad_configuration_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        IMCLModel(CLASSES, (SIZE, SIZE, 3), **kwargs)


def test_bad_batch_structure_is_explained(batches):
    images, labels, ids, _ = batches
    model = _model("logistic", images, labels, ids)
    bad = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    with pytest.raises(ValueError, match=r"\(inputs, labels, ids\)"):
        model.fit(bad, epochs=1, verbose=0, shuffle=False)

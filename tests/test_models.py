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
    if method == "imcl":
        kwargs = {"dictionary_size": 16, "k": 3, **kwargs}
    else:
        kwargs.pop("neighbour_mode", None)  # an IMCL option
    model = IMCLModel(CLASSES, (SIZE, SIZE, 3), method=method, **kwargs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    if method == "imcl":
        model.method.fill_bank(images[:16], labels[:16], ids[:16])
    return model


@pytest.mark.parametrize("method,mode", [("logistic", "cached"), ("imcl", "cached"),
                                         ("imcl", "forward")])
def test_fit_save_reload_identical_predictions(batches, tmp_path, method, mode):
    images, labels, ids, dataset = batches
    model = _model(method, images, labels, ids, neighbour_mode=mode)
    if method == "imcl":
        resolved = model.method.calibrate_lambdas(dataset, num_batches=2)
        assert resolved["lambda_y"] > 0 and resolved["lambda_f"] > 0
    history = model.fit(dataset, epochs=2, verbose=0, shuffle=False)
    logs = {key: values[-1] for key, values in history.history.items()}
    assert np.isfinite(logs["loss"]) and logs["bce"] > 0
    if method == "imcl":
        assert 0 < logs["omp_valid_fraction"] <= 1
        assert logs["residual_y_after"] <= logs["residual_y_before"] + 1e-6
    else:
        assert "loss_y" not in logs and not hasattr(model.method, "bank")
    path = str(tmp_path / "model.keras")
    save_model_file(model, path)
    reloaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_array_equal(model.predict(images, verbose=0),
                                  reloaded.predict(images, verbose=0))
    if method == "imcl":
        np.testing.assert_array_equal(model.method.bank.features.numpy(), reloaded.method.bank.features.numpy())
        np.testing.assert_array_equal(model.method.label_graph.matrix.numpy(),
                                      reloaded.method.label_graph.matrix.numpy())
        assert float(reloaded.method.lambda_y.numpy()) == pytest.approx(float(model.method.lambda_y.numpy()))


def test_calibration_measures_training_mode_losses_and_keeps_batchnorm_statistics(batches):
    images, labels, ids, dataset = batches
    # Inputs far from the initial moving statistics: inference and training BatchNorm differ.
    model = _model("imcl", images, labels, ids, balance="loss_ratio")
    moving = [v.numpy().copy() for v in model.backbone.non_trainable_variables]
    assert moving, "the small CNN has BatchNorm statistics"
    resolved = model.method.calibrate_lambdas(dataset, num_batches=2)
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
                     model.method.label_graph.values]
        return tape.gradient(smooth, variables)

    head_grad, backbone_grad, graph_grad = smoothness_gradients(model)
    assert np.abs(head_grad.numpy()).sum() > 0
    assert np.abs(backbone_grad.numpy()).sum() > 0
    assert np.abs(graph_grad.numpy()).sum() > 0
    # With every bank label observed, atom states no longer use the graph's propagation, so the
    # graph gets no gradient at all: it is reached through the atoms' vectors only, never the query.
    observed = np.where(labels[:16] == 0, -1.0, labels[:16]).astype(np.float32)
    model.method.bank.set_contents(images[:16], observed, ids[:16])
    _, _, graph_grad = smoothness_gradients(model)
    assert graph_grad is None or np.abs(graph_grad.numpy()).sum() == 0


@pytest.mark.parametrize("mode", ["cached", "forward"])
def test_neighbours_as_fixed_teachers_give_the_graph_no_gradient(batches, mode):
    images, labels, ids, _ = batches
    graph = np.full((CLASSES, CLASSES), 0.1, np.float32) + np.eye(CLASSES, dtype=np.float32)
    model = _model("imcl", images, labels, ids, label_graph_init=graph / graph.sum(0),
                   neighbour_mode=mode, atom_gradient=False)
    with tf.GradientTape() as tape:
        terms = model._loss_terms(images[16:24], labels[16:24], ids[16:24], training=False)
        smooth = terms["loss_y"] + terms["loss_f"]
    head_grad, graph_grad = tape.gradient(smooth, [model.head.kernel,
                                                   model.method.label_graph.values])
    assert np.abs(head_grad.numpy()).sum() > 0  # the query side still learns
    # The graph acts on neighbours only, so detached neighbours leave it untouched.
    assert graph_grad is None or np.abs(graph_grad.numpy()).sum() == 0


def test_a_query_never_selects_itself(batches):
    images, labels, ids, _ = batches
    model = _model("imcl", images, labels, ids)
    # The first 8 bank images are queried: each would reconstruct itself perfectly.
    inputs, batch_labels, batch_ids = images[:8], labels[:8], ids[:8]
    features = model.extract_features(inputs)
    logits = model.head(features)
    graph = model.method.label_graph.matrix
    from imcl_tf.omp import joint_nonnegative_omp
    query_y = losses.query_label_states(logits, batch_labels, model.method.asym_c)
    bank_f = tf.concat([model.method.bank.features, tf.ones([16, 1])], -1)
    atoms_y = losses.atom_label_states(model.head(model.method.bank.features), model.method.bank.label_rows(),
                                       graph, model.method.asym_c)
    result = joint_nonnegative_omp(query_y, tf.concat([features, tf.ones([8, 1])], -1), atoms_y,
                                   bank_f, 3, exclude=model.method.bank.exclusion_mask(batch_ids))
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
    ({"method": "imcl", "dictionary_size": 4, "asym_c": 0.5}, "asym_c must be >= 1"),
    ({"method": "logistic", "backbone_weights": "missing.weights.h5"}, "no such file"),
    ({"method": "imcl", "dictionary_size": 4, "refit_mode": "official_pool_rerun"},
     r"official_pool_rerun.*not implemented.*reuse_support_refit.*reuse_all"),
    ({"method": "imcl", "dictionary_size": 4, "refit_mode": "refit_everything"},
     "refit_mode must be one of"),
    ({"method": "logistic", "k": 3}, r"method 'logistic' takes no option 'k'"),
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


# ---- forward mode: where the coefficients of the re-encoded neighbours come from ---------------


def _brute_force_nnls(vectors, query):
    """min_{c >= 0} |query - vectors^T c|^2 by enumerating every sub-support (float64)."""
    vectors = np.asarray(vectors, np.float64)
    query = np.asarray(query, np.float64)
    best, best_coef = np.inf, np.zeros(len(vectors))
    for mask in range(2 ** len(vectors)):
        members = [i for i in range(len(vectors)) if mask >> i & 1]
        coef = np.zeros(len(vectors))
        if members:
            solution, *_ = np.linalg.lstsq(vectors[members].T, query, rcond=None)
            if np.any(solution < 0):
                continue
            coef[members] = solution
        residual = np.sum((query - coef @ vectors) ** 2)
        if residual < best - 1e-12:
            best, best_coef = residual, coef
    return best_coef


def _stale_forward_model(images, labels, ids, refit_mode, rng):
    """A forward-mode model whose backbone changed since its bank was encoded."""
    model = _model("imcl", images, labels, ids, neighbour_mode="forward", refit_mode=refit_mode,
                   balance="none")
    for variable in model.backbone.trainable_weights:
        noise = rng.normal(size=variable.shape).astype(np.float32)
        variable.assign(variable.numpy() * (1.0 + 0.5 * noise))
    return model


def _fit(model, inputs, labels, ids):
    features = model.extract_features(inputs)
    logits = model.head(features)
    return model.method._neighbour_fit(inputs, features, logits, tf.constant(labels), ids, False,
                                model.method.lambda_y, model.method.lambda_f)


def _independent_omp(model, inputs, labels, ids):
    """The OMP against the cached bank, computed here without the model's helper."""
    from imcl_tf.omp import joint_nonnegative_omp
    features = model.extract_features(inputs)
    query_y = losses.query_label_states(model.head(features), labels, model.method.asym_c)
    atoms_y = losses.atom_label_states(model.head(model.method.bank.features), model.method.bank.label_rows(),
                                       model.method.label_graph.matrix, model.method.asym_c)
    bank_f = tf.concat([model.method.bank.features, tf.ones([model.method.dictionary_size, 1])], -1)
    return joint_nonnegative_omp(query_y, tf.concat([features, tf.ones([len(inputs), 1])], -1),
                                 atoms_y, bank_f, model.method.k, model.method.lambda_y, model.method.lambda_f,
                                 exclude=model.method.bank.exclusion_mask(ids))


def _stale_forward_fit(batches, rng, refit_mode):
    """A forward-mode model with a stale bank, its fit on one batch and an independent OMP."""
    images, labels, ids, _ = batches
    model = _stale_forward_model(images, labels, ids, refit_mode, rng)
    inputs, batch_labels, batch_ids = images[16:24], labels[16:24], ids[16:24]
    fit = _fit(model, inputs, batch_labels, batch_ids)
    omp = _independent_omp(model, inputs, batch_labels, batch_ids)
    return model, inputs, batch_labels, batch_ids, fit, omp


def test_forward_refit_solves_nnls_on_the_omp_support_with_fresh_neighbours(batches, rng):
    model, inputs, batch_labels, batch_ids, fit, omp = _stale_forward_fit(
        batches, rng, "reuse_support_refit")
    np.testing.assert_array_equal(fit["valid"], omp.valid)  # the support is the OMP's
    np.testing.assert_array_equal(np.where(omp.valid, fit["omp"].indices, -1),
                                  np.where(omp.valid, omp.indices, -1))
    valid = omp.valid.numpy()
    assert valid.any()
    # The fresh neighbours, encoded here by the current network.
    indices = np.maximum(omp.indices.numpy(), 0)
    fresh = model.extract_features(model.method.bank(indices.reshape(-1))).numpy()
    neighbour_f = np.concatenate([fresh, np.ones((len(fresh), 1), np.float32)], -1)
    neighbour_y = losses.atom_label_states(
        model.head(fresh), tf.gather(model.method.bank.label_rows(), indices.reshape(-1)),
        model.method.label_graph.matrix, model.method.asym_c).numpy()
    neighbour_f = neighbour_f.reshape(len(inputs), model.method.k, -1)
    neighbour_y = neighbour_y.reshape(len(inputs), model.method.k, -1)
    np.testing.assert_allclose(fit["neighbour_f"], neighbour_f, rtol=1e-5, atol=1e-5)
    features = model.extract_features(inputs).numpy()
    query_f = np.concatenate([features, np.ones((len(features), 1), np.float32)], -1)
    query_y = losses.query_label_states(model.head(features), batch_labels, model.method.asym_c).numpy()
    for coef, query, neighbours, side in ((fit["coef_y"], query_y, neighbour_y, "y"),
                                          (fit["coef_f"], query_f, neighbour_f, "f")):
        expected = np.zeros(valid.shape)
        for row in range(len(inputs)):
            slots = np.flatnonzero(valid[row])
            expected[row, slots] = _brute_force_nnls(neighbours[row, slots], query[row])
        coef = np.asarray(coef)
        assert (coef >= 0).all() and (coef[~valid] == 0).all(), side
        # The untrained CNN's neighbours are nearly collinear, so in float32 (and XLA's order of
        # operations) the minimiser is only determined to about 1e-2 (a coefficient near 0 may
        # leave or join the active set: 0 against 0.012 was seen); the residual it reaches is
        # what must match the brute-force optimum.
        residual = np.linalg.norm(query - np.einsum("bk,bkd->bd", coef, neighbours), axis=-1)
        best = np.linalg.norm(query - np.einsum("bk,bkd->bd", expected, neighbours), axis=-1)
        np.testing.assert_allclose(residual, best, rtol=1e-4, atol=1e-5, err_msg=side)
        np.testing.assert_allclose(coef, expected, atol=3e-2, err_msg=side)
    # The backbone changed since the bank was encoded: the OMP's coefficients are stale.
    assert not np.allclose(fit["coef_f"], omp.coef_f, rtol=1e-3, atol=1e-4)
    # On the same support the refit can only lower each side's residual.
    refit = model.method._smoothness_terms(inputs, tf.constant(features), model.head(features),
                                    tf.constant(batch_labels), batch_ids, False, model.method.lambda_y,
                                    model.method.lambda_f)
    model.method.refit_mode = "reuse_all"
    reused = model.method._smoothness_terms(inputs, tf.constant(features), model.head(features),
                                     tf.constant(batch_labels), batch_ids, False, model.method.lambda_y,
                                     model.method.lambda_f)
    assert float(refit["loss_y"]) <= float(reused["loss_y"]) * (1 + 1e-5) + 1e-6
    assert float(refit["loss_f"]) < float(reused["loss_f"])


def test_forward_reuse_all_keeps_the_omp_coefficients(batches, rng):
    model, inputs, batch_labels, batch_ids, fit, omp = _stale_forward_fit(batches, rng, "reuse_all")
    np.testing.assert_array_equal(fit["valid"], omp.valid)
    # Exactly the model's own OMP coefficients (nothing refitted) ...
    np.testing.assert_array_equal(fit["coef_y"], fit["omp"].coef_y)
    np.testing.assert_array_equal(fit["coef_f"], fit["omp"].coef_f)
    # ... which are those of an independent OMP on the cached bank. The untrained CNN's features
    # are nearly collinear, so the feature-side NNLS is ill-conditioned: the model's OMP (XLA,
    # given norms) and this eager one differ by float32 rounding amplified to ~1e-3 relative.
    np.testing.assert_allclose(fit["coef_y"], omp.coef_y, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(fit["coef_f"], omp.coef_f, rtol=1e-2, atol=1e-4)
    assert model.get_config()["method_options"]["refit_mode"] == "reuse_all"
    assert IMCLModel.from_config(model.get_config()).method.refit_mode == "reuse_all"


def test_forward_refit_coefficients_carry_no_gradient(batches, rng):
    images, labels, ids, _ = batches
    model = _stale_forward_model(images, labels, ids, "reuse_support_refit", rng)
    inputs, batch_labels, batch_ids = images[16:24], labels[16:24], ids[16:24]
    with tf.GradientTape(persistent=True) as tape:
        fit = _fit(model, inputs, batch_labels, batch_ids)
        coefficients = tf.reduce_sum(fit["coef_y"]) + tf.reduce_sum(fit["coef_f"])
        residual = tf.reduce_sum(tf.square(fit["query_f"] - tf.einsum(
            "bk,bkd->bd", fit["coef_f"], fit["neighbour_f"])))
    assert float(coefficients) > 0
    variables = model.trainable_weights
    assert all(g is None for g in tape.gradient(coefficients, variables))
    # The residual still trains the backbone (through the query and the re-encoded neighbours).
    grads = tape.gradient(residual, model.backbone.trainable_weights)
    assert any(g is not None and np.abs(g.numpy()).sum() > 0 for g in grads)


def test_refit_on_support_matches_brute_force_and_leaves_invalid_slots_at_zero(rng):
    from imcl_tf.omp import refit_on_support
    batch, k, dim_y, dim_f = 6, 3, 4, 5
    query_y = rng.normal(size=(batch, dim_y)).astype(np.float32)
    query_f = rng.normal(size=(batch, dim_f)).astype(np.float32)
    support_y = rng.normal(size=(batch, k, dim_y)).astype(np.float32)
    support_f = rng.normal(size=(batch, k, dim_f)).astype(np.float32)
    # An invalid slot holds a vector that would fit the query exactly: it must still get 0.
    valid = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1], [1, 1, 0]], bool)
    support_y[~valid] = query_y[np.nonzero(~valid)[0]]
    support_f[~valid] = query_f[np.nonzero(~valid)[0]]
    coef_y, coef_f = refit_on_support(query_y, query_f, support_y, support_f, valid)
    for coef, query, support in ((coef_y, query_y, support_y), (coef_f, query_f, support_f)):
        expected = np.zeros((batch, k))
        for row in range(batch):
            slots = np.flatnonzero(valid[row])
            if len(slots):
                expected[row, slots] = _brute_force_nnls(support[row, slots], query[row])
        np.testing.assert_allclose(coef, expected, rtol=1e-4, atol=1e-5)
        assert np.all(coef.numpy()[~valid] == 0)


# ---- scale rules: the cheaper step computes exactly what the full one did ---------------------


def _full_gradient_loss(model, inputs, labels, ids):
    """The loss as first implemented: every atom's state with gradient, then gathered (cached).

    Written out here from docs/method.md (not with the model's helpers) so the cheaper step that
    recomputes only the chosen neighbours can be checked against it.
    """
    from imcl_tf.omp import joint_nonnegative_omp
    labels = tf.constant(labels, tf.float32)
    features = model.extract_features(inputs)
    logits = model.head(features)
    bce = losses.masked_bce(labels, logits)
    graph = tf.scatter_nd(*_dense_graph_parts(model.method.label_graph))  # dense [L, L], with gradient
    query_y = losses.query_label_states(logits, labels, model.method.asym_c)
    query_f = tf.concat([features, tf.ones_like(features[:, :1])], -1)
    bank_f = tf.concat([model.method.bank.features, tf.ones([model.method.dictionary_size, 1])], -1)
    predicted = losses.asym_tanh(model.head(model.method.bank.features), model.method.asym_c)
    bank_labels = tf.cast(model.method.bank.labels, tf.float32)
    unknown = 1.0 - tf.abs(bank_labels)
    observed = tf.clip_by_value(bank_labels, -1.0 / model.method.asym_c, 10.0)
    atoms_y = unknown * tf.matmul(predicted, graph) + observed  # [M, L] with gradient
    omp = joint_nonnegative_omp(tf.stop_gradient(query_y), tf.stop_gradient(query_f),
                                tf.stop_gradient(atoms_y), bank_f, model.method.k, model.method.lambda_y,
                                model.method.lambda_f, exclude=model.method.bank.exclusion_mask(ids))
    indices = tf.maximum(omp.indices, 0)
    mask = tf.cast(omp.valid, tf.float32)
    recon_y = tf.einsum("bk,bkl->bl", omp.coef_y * mask, tf.gather(atoms_y, indices))
    recon_f = tf.einsum("bk,bkd->bd", omp.coef_f * mask, tf.gather(bank_f, indices))
    loss_y = tf.reduce_mean(tf.reduce_sum(tf.square(query_y - recon_y), -1))
    loss_f = tf.reduce_mean(tf.reduce_sum(tf.square(query_f - recon_f), -1))
    loss = bce + model.method.lambda_y * loss_y + model.method.lambda_f * loss_f
    return loss, omp


def _dense_graph_parts(layer):
    """(indices, values, shape) of the layer's graph, whatever its storage."""
    matrix = layer.matrix
    return tf.where(tf.ones_like(matrix, tf.bool)), tf.reshape(matrix, [-1]), tf.shape(matrix,
                                                                                   tf.int64)


@pytest.mark.parametrize("graph_kind", ["identity", "sparse", "dense"])
def test_selected_neighbour_recompute_gives_the_full_gradient_loss_and_gradients(
        batches, rng, monkeypatch, graph_kind):
    """Also the sparse graph product against a dense one: same loss, same gradients."""
    import imcl_tf.label_graph as label_graph_lib
    import imcl_tf.methods.imcl as models_lib
    # Selection states in chunks of 5 atoms (16 atoms: chunks 5, 5, 5, 1).
    monkeypatch.setattr(models_lib, "ATOM_STATE_CHUNK_ENTRIES", 5 * CLASSES)
    monkeypatch.setattr(models_lib, "MIN_ATOM_STATE_CHUNK", 1)
    monkeypatch.setattr(label_graph_lib, "DENSE_PRODUCT_RATIO",
                        0 if graph_kind == "sparse" else 10**6)
    images, labels, ids, _ = batches
    if graph_kind == "identity":
        graph = None
    else:
        raw = rng.random((CLASSES, CLASSES)) * (rng.random((CLASSES, CLASSES)) <
                                                (0.3 if graph_kind == "sparse" else 1.1))
        graph = raw + np.eye(CLASSES)
        graph = (graph / graph.sum(0)).astype(np.float32)
    model = _model("imcl", images, labels, ids, label_graph_init=graph, balance="none")
    assert [block.shape[0] for block in model.method.selection_atom_state_blocks()] == [5, 5, 5, 1]
    expected_structure = {"identity": "diagonal", "sparse": "general", "dense": "general"}
    assert model.method.label_graph.structure == expected_structure[graph_kind]
    assert model.method.label_graph.dense_product == (graph_kind == "dense")
    for variable in model.trainable_weights:  # a trained-looking model, not the initial one
        variable.assign(variable + 0.05 * rng.normal(size=variable.shape).astype(np.float32))
    for variable in model.method.label_graph.trainable_weights:  # the graph stays in [0, 1]
        variable.assign(np.clip(variable.numpy(), 0, 1))
    inputs, batch_labels, batch_ids = images[8:24], labels[8:24], ids[8:24]
    variables = model.trainable_weights
    with tf.GradientTape(persistent=True) as tape:
        terms = model._loss_terms(inputs, batch_labels, batch_ids, training=False)
        expected, omp = _full_gradient_loss(model, inputs, batch_labels, batch_ids)
    fit = _fit(model, inputs, batch_labels, batch_ids)
    np.testing.assert_array_equal(fit["omp"].valid, omp.valid)
    np.testing.assert_array_equal(np.where(omp.valid, fit["omp"].indices, -1),
                                  np.where(omp.valid, omp.indices, -1))
    assert omp.valid.numpy().sum() > 8
    np.testing.assert_allclose(terms["loss"], expected, rtol=1e-6)
    new = tape.gradient(terms["loss"], variables)
    old = tape.gradient(expected, variables)
    assert len(new) == len(old) > 0
    for variable, a, b in zip(variables, new, old):
        a = tf.convert_to_tensor(a).numpy() if a is not None else np.zeros(variable.shape)
        b = tf.convert_to_tensor(b).numpy() if b is not None else np.zeros(variable.shape)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=variable.path)


def test_sparse_graph_model_trains_saves_and_reloads(batches, tmp_path, rng):
    images, labels, ids, dataset = batches
    raw = rng.random((CLASSES, CLASSES)) * (rng.random((CLASSES, CLASSES)) < 0.3)
    graph = raw + np.eye(CLASSES)
    graph = (graph / graph.sum(0)).astype(np.float32)
    model = _model("imcl", images, labels, ids, label_graph_init=graph, balance="none")
    model.fit(dataset, epochs=1, verbose=0, shuffle=False)
    matrix = model.method.label_graph.matrix.numpy()
    assert not np.array_equal(matrix, graph)  # the graph learned
    np.testing.assert_array_equal(matrix[graph == 0], 0)  # on its support only
    assert matrix.min() >= 0 and matrix.max() <= 1  # clipped
    path = str(tmp_path / "model.keras")
    save_model_file(model, path)
    reloaded = keras.saving.load_model(path, compile=False)
    np.testing.assert_array_equal(reloaded.method.label_graph.matrix.numpy(), matrix)
    assert reloaded.method.label_graph.num_entries == np.count_nonzero(graph)
    fixed = _model("imcl", images, labels, ids, learn_label_graph=False)
    assert fixed.method.label_graph.weights == []  # a fixed identity graph stores nothing


@pytest.mark.slow  # XLA compiles the OMP for each model: ~40 s on 2 cores
def test_xla_compiled_omp_inside_the_train_step_matches_the_uncompiled_one(batches):
    images, labels, ids, dataset = batches
    trained = []
    for jit in (True, False):
        keras.utils.set_random_seed(3)
        with tf.distribute.get_strategy().scope():  # the default strategy, as train.py runs it
            model = _model("imcl", images, labels, ids, balance="none", omp_jit_compile=jit)
        assert model.get_config()["method_options"]["omp_jit_compile"] is jit
        inputs, batch_labels, batch_ids = images[16:24], labels[16:24], ids[16:24]
        terms = model._loss_terms(inputs, batch_labels, batch_ids, training=False)
        trained.append((model, _fit(model, inputs, batch_labels, batch_ids)["omp"], terms))
        history = model.fit(dataset.take(3), epochs=1, verbose=0, shuffle=False)
        assert np.isfinite(history.history["loss"][-1])
    (compiled, omp_a, terms_a), (plain, omp_b, terms_b) = trained
    np.testing.assert_array_equal(omp_a.valid, omp_b.valid)
    np.testing.assert_array_equal(omp_a.indices, omp_b.indices)
    # The untrained CNN's features are nearly collinear, so the feature-side NNLS is
    # ill-conditioned and XLA's different float32 rounding moves its coefficients by ~1e-3
    # relative; the residual (what the loss uses) is insensitive to that.
    np.testing.assert_allclose(omp_a.coef_f, omp_b.coef_f, rtol=1e-2, atol=1e-4)
    np.testing.assert_allclose(omp_a.coef_y, omp_b.coef_y, rtol=1e-2, atol=1e-4)
    for name in ("loss", "loss_y", "loss_f"):
        np.testing.assert_allclose(terms_a[name], terms_b[name], rtol=1e-5, err_msg=name)
    for a, b in zip(compiled.trainable_weights, plain.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5, err_msg=a.path)


def test_atom_label_states_refresh_every_n_calls_and_after_a_bank_refresh(batches, tmp_path):
    images, labels, ids, _ = batches
    model = _model("imcl", images, labels, ids, label_state_refresh_every=3)
    assert IMCLModel.from_config(model.get_config()).method.label_state_refresh_every == 3

    def current():  # the states with the current weights, written out here
        return losses.atom_label_states(model.head(model.method.bank.features), model.method.bank.label_rows(),
                                        model.method.label_graph.matrix, model.method.asym_c).numpy()

    # The selection states fuse their elementwise work with XLA (losses.bank_atom_label_states),
    # whose rounding differs from the separate operations by ~1e-7 where sigma_c nears its bounds.
    CLOSE = dict(rtol=1e-6, atol=1e-6)
    first = current()
    call_1 = model.method.selection_atom_states().numpy()
    np.testing.assert_allclose(call_1, first, **CLOSE)
    model.head.kernel.assign(model.head.kernel * 1.5)
    changed = current()
    assert np.abs(changed - first).max() > 1e-3
    for _ in range(2):  # calls 2 and 3 reuse the states of call 1
        np.testing.assert_array_equal(model.method.selection_atom_states(), call_1)
    np.testing.assert_allclose(model.method.selection_atom_states(), changed, **CLOSE)
    model.head.kernel.assign(model.head.kernel * 0.5)
    model.method.refresh_bank()  # new features: due again at once
    np.testing.assert_allclose(model.method.selection_atom_states(), current(), **CLOSE)
    # Derived state: in no weight and no checkpoint.
    assert not any("atom_label_state" in w.path for w in model.weights)
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    assert not any("atom_label_state" in name for name, _ in tf.train.list_variables(path))
    exact = _model("imcl", images, labels, ids)  # n = 1: every call uses the current weights
    exact.method.selection_atom_states()
    exact.head.kernel.assign(exact.head.kernel * 1.5)
    model = exact  # what current() reads
    np.testing.assert_allclose(exact.method.selection_atom_states(), current(), **CLOSE)
    with pytest.raises(ValueError, match="label_state_refresh_every must be an integer >= 1"):
        IMCLModel(CLASSES, (SIZE, SIZE, 3), method="imcl", dictionary_size=16,
                  label_state_refresh_every=0)


def _shares_buffer(a, b):
    """True when two eager tensors are views of one buffer (a variable read without a copy)."""
    return a._numpy().__array_interface__["data"][0] == b._numpy().__array_interface__["data"][0]


def test_the_step_reads_the_bank_without_copying_it(batches):
    """The bank's refresh writes its features in parts (scatter), which puts the variable in
    TensorFlow's copy-on-read mode: every later read would copy the [M, D] features whole (15
    copies of 0.4 GB per step at 50,000 x 2,048). The step reads them without a copy and leaves
    the mode off; it never gathers from the bank's variables (a gather turns the mode on)."""
    images, labels, ids, dataset = batches
    for mode in ("cached", "forward"):
        model = _model("imcl", images, labels, ids, balance="none", neighbour_mode=mode)
        bank = model.method.bank
        step = tf.function(lambda x, y, i: model._loss_terms(x, y, i, training=True)["loss"])
        graph = step.get_concrete_function(images[16:24], labels[16:24], ids[16:24]).graph
        watched = {id(bank.features.value.handle): "features",
                   id(bank.labels.value.handle): "labels"}
        internal = {id(inner): watched[id(outer)] for outer, inner in graph.captures
                    if id(outer) in watched}
        assert sorted(internal.values()) == ["features", "labels"]
        sparse = [(op.type, internal[id(op.inputs[0])]) for op in graph.get_operations()
                  if op.type.startswith(("ResourceGather", "ResourceScatter",
                                         "ResourceStridedSliceAssign"))
                  and op.inputs and id(op.inputs[0]) in internal]
        assert not sparse, sparse
        history = model.fit(dataset.take(2), epochs=1, verbose=0, shuffle=False)
        assert np.isfinite(history.history["loss"][-1])
        for variable in (bank.features, bank.labels):  # plain reads now share the buffer
            assert _shares_buffer(tf.convert_to_tensor(variable), tf.convert_to_tensor(variable))
        model.method.refresh_bank()
        np.testing.assert_allclose(bank.features_value().numpy(),
                                   model.extract_features(bank.inputs.astype(np.float32)).numpy(),
                                   rtol=1e-5, atol=1e-6)  # the bank's uint8 images

"""Tests of imcl_tf.label_graph: builders, normalisation and the masked LabelGraph layer."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from imcl_tf.data import DataError
from imcl_tf.label_graph import (LabelGraph, build_label_graph, cooccurrence_graph,
                                 identity_graph, load_graph_npy, normalize_graph)


def sparse_nonnegative(rng, size, density=0.35):
    return (rng.random((size, size)) * (rng.random((size, size)) < density)).astype(np.float32)


def label_rows(rng, num_images, num_labels):
    values = rng.choice([-1.0, 0.0, 1.0], size=(num_images, num_labels), p=[0.3, 0.4, 0.3])
    return values.astype(np.float32)


# ---- normalisation and builders ----------------------------------------------------------------


def test_normalize_graph_columns_sum_to_one_and_diagonal_is_inverse_sum(rng):
    raw = sparse_nonnegative(rng, 9)
    normalized = normalize_graph(raw)
    with_unit_diagonal = raw.astype(np.float64).copy()
    for j in range(9):
        with_unit_diagonal[j, j] = 1.0
    column_sums = with_unit_diagonal.sum(axis=0)
    np.testing.assert_allclose(normalized.sum(axis=0), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.diag(normalized), 1.0 / column_sums, rtol=1e-6)
    for l in range(9):
        for j in range(9):
            if l != j:
                np.testing.assert_allclose(normalized[l, j], raw[l, j] / column_sums[j], rtol=1e-6)
    assert normalized.dtype == np.float32


def test_normalize_graph_does_not_modify_its_input(rng):
    raw = sparse_nonnegative(rng, 5)
    before = raw.copy()
    normalize_graph(raw)
    np.testing.assert_array_equal(raw, before)


def test_normalize_graph_rejects_bad_matrices():
    with pytest.raises(ValueError, match="square"):
        normalize_graph(np.ones((2, 3)))
    with pytest.raises(ValueError, match="finite and >= 0"):
        normalize_graph(-np.ones((2, 2)))


def reference_cooccurrence(rows, top_k=None):
    """P(l | j) estimated on the images where j is a known positive and l is known."""
    num_labels = rows.shape[1]
    graph = np.zeros((num_labels, num_labels))
    for j in range(num_labels):
        images_with_j = [i for i in range(rows.shape[0]) if rows[i, j] == 1]
        if not images_with_j:
            graph[j, j] = 1.0
            continue
        for l in range(num_labels):
            l_known = [i for i in images_with_j if rows[i, l] != 0]
            both = sum(1 for i in l_known if rows[i, l] == 1)
            graph[l, j] = both / len(l_known) if l_known else 0.0
        if top_k is not None:
            candidates = sorted((l for l in range(num_labels) if l != j),
                                key=lambda l: (-graph[l, j], l))
            for l in candidates[top_k:]:
                graph[l, j] = 0.0
    return graph


def test_cooccurrence_graph_matches_reference(rng):
    rows = label_rows(rng, 40, 7)
    rows[:, 6] = np.minimum(rows[:, 6], 0)  # a label with no known positive: identity column
    rows[rows[:, 2] == 1, 5] = 0  # label 5 never known where 2 is positive: G[5, 2] = 0
    expected = reference_cooccurrence(rows)
    assert expected[5, 2] == 0.0 and expected[6, 6] == 1.0 and expected[:6, 6].sum() == 0.0
    np.testing.assert_allclose(cooccurrence_graph(rows), expected, rtol=1e-6)
    np.testing.assert_allclose(cooccurrence_graph(rows, top_k=2),
                               reference_cooccurrence(rows, top_k=2), rtol=1e-6)


def test_cooccurrence_graph_matches_reference_on_sparse_partial_labels(rng):
    # Correlated full labels, then uniform masking at 20 %: many pairs are rarely both known.
    full = np.where(rng.random((200, 9)) < 0.3, 1.0, -1.0)
    full[:, 1] = np.where(rng.random(200) < 0.8, full[:, 0], -full[:, 0])
    rows = (full * (rng.random(full.shape) < 0.2)).astype(np.float32)
    np.testing.assert_allclose(cooccurrence_graph(rows), reference_cooccurrence(rows), rtol=1e-6)


def test_cooccurrence_graph_does_not_shrink_with_the_known_ratio(rng):
    # Two labels that always occur together, masked uniformly at 30 % known: G[0, 1] = P(0 | 1) = 1.
    full = np.repeat(np.where(rng.random((2000, 1)) < 0.5, 1.0, -1.0), 2, axis=1)
    rows = (full * (rng.random(full.shape) < 0.3)).astype(np.float32)
    graph = cooccurrence_graph(rows)
    assert graph[0, 1] == 1.0 and graph[1, 0] == 1.0
    # Independent labels with P(l) = 0.4: the estimate stays near 0.4 at 30 % and at 100 % known.
    independent = np.where(rng.random((4000, 2)) < 0.4, 1.0, -1.0)
    masked = (independent * (rng.random(independent.shape) < 0.3)).astype(np.float32)
    assert abs(cooccurrence_graph(masked)[0, 1] - 0.4) < 0.06
    assert abs(cooccurrence_graph(independent.astype(np.float32))[0, 1] - 0.4) < 0.03


def test_cooccurrence_graph_column_depends_on_known_entries_where_j_is_positive(rng):
    rows = label_rows(rng, 30, 6)
    rows[0, [1, 3]] = 1.0  # G[3, 1] > 0
    rows[1, 1], rows[1, 3] = 1.0, 0.0  # an image with 1 positive and 3 unknown
    graph = cooccurrence_graph(rows)
    assert graph[3, 1] > 0
    # Outside the images where label 1 is positive, turning unknowns into negatives and back
    # leaves column 1 unchanged.
    outside = rows[:, 1] != 1
    swapped = rows.copy()
    swapped[outside] = np.where(rows[outside] == 0, -1.0,
                                np.where(rows[outside] == -1, 0.0, rows[outside]))
    np.testing.assert_array_equal(cooccurrence_graph(swapped)[:, 1], graph[:, 1])
    # On an image where 1 is positive, making an unknown label a known negative lowers its entry.
    changed = rows.copy()
    changed[1, 3] = -1.0
    assert cooccurrence_graph(changed)[3, 1] < graph[3, 1]


def test_cooccurrence_graph_accepts_chunks(rng):
    rows = label_rows(rng, 50, 5)
    chunks = (rows[i:i + 7] for i in range(0, 50, 7))
    np.testing.assert_allclose(cooccurrence_graph(chunks), cooccurrence_graph(rows), rtol=1e-6)


def test_cooccurrence_graph_rejects_bad_rows():
    with pytest.raises(ValueError, match="only \\+1, -1 and 0"):
        cooccurrence_graph(np.array([[2.0, 0.0]]))
    with pytest.raises(ValueError, match="must be \\[N, L\\]"):
        cooccurrence_graph(np.zeros(3))


def test_load_graph_npy_reads_a_good_file(tmp_path, rng):
    raw = sparse_nonnegative(rng, 4)
    path = tmp_path / "graph.npy"
    np.save(path, raw.astype(np.float64))
    loaded = load_graph_npy(path, 4)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, raw)


@pytest.mark.parametrize("content, message", [
    (np.ones((3, 4)), "has shape \\(3, 4\\)"),
    (np.full((4, 4), np.nan), "non-finite"),
    (-np.eye(4), "negative values"),
    (np.array(["a", "b"]), "numeric array"),
])
def test_load_graph_npy_rejects_bad_arrays(tmp_path, content, message):
    path = tmp_path / "graph.npy"
    np.save(path, content)
    with pytest.raises(DataError, match=message):
        load_graph_npy(path, 4)


def test_load_graph_npy_rejects_missing_pickled_and_garbage_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_graph_npy(tmp_path / "missing.npy", 3)
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="not a readable .npy array"):
        load_graph_npy(pickled, 3)
    garbage = tmp_path / "garbage.npy"
    garbage.write_bytes(b"this is not numpy")
    with pytest.raises(DataError, match="not a readable .npy array"):
        load_graph_npy(garbage, 3)


def test_build_label_graph_dispatches_and_normalizes(tmp_path, rng):
    np.testing.assert_array_equal(build_label_graph("identity", 3), identity_graph(3))
    rows = label_rows(rng, 20, 4)
    np.testing.assert_allclose(build_label_graph("cooccurrence", 4, train_label_rows=rows),
                               normalize_graph(cooccurrence_graph(rows)), rtol=1e-6)
    raw = sparse_nonnegative(rng, 4)
    path = os.path.join(tmp_path, "g.npy")
    np.save(path, raw)
    np.testing.assert_allclose(build_label_graph(path, 4), normalize_graph(raw), rtol=1e-6)
    np.testing.assert_array_equal(build_label_graph(path, 4, normalize=False), raw)
    with pytest.raises(ValueError, match="needs the training label rows"):
        build_label_graph("cooccurrence", 4)
    with pytest.raises(ValueError, match="spec must be one of"):
        build_label_graph("wikipedia", 4)


# ---- LabelGraph layer --------------------------------------------------------------------------


def _numpy_support(graph):
    rows, columns = np.nonzero(graph)
    return rows, columns


@pytest.mark.parametrize("kind", ["sparse", "dense", "diagonal", "identity"])
def test_label_graph_constant_product_matches_the_layer_without_gradient(rng, monkeypatch, kind):
    import imcl_tf.label_graph as label_graph_lib
    monkeypatch.setattr(label_graph_lib, "DENSE_PRODUCT_RATIO", 10**6 if kind == "dense" else 0)
    if kind in ("sparse", "dense"):
        graph = normalize_graph(sparse_nonnegative(rng, 7) + np.eye(7))
    elif kind == "diagonal":
        graph = np.diag(rng.random(7) + 0.5).astype(np.float32)
    else:
        graph = np.eye(7, dtype=np.float32)
    layer = LabelGraph(graph, learnable=kind != "identity")
    assert layer.structure == {"sparse": "general", "dense": "general", "diagonal": "diagonal",
                               "identity": "identity"}[kind]
    for values in (layer.trainable_weights if kind != "identity" else []):  # trained-looking
        values.assign(values + 0.1 * rng.random(values.shape).astype(np.float32))
    matrix = layer.matrix.numpy()
    states = tf.constant(rng.normal(size=(2, 5, 7)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(states)
        product = layer.constant_product(states)
    np.testing.assert_allclose(product.numpy(), states.numpy() @ matrix, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(product.numpy(), layer(states).numpy(), rtol=1e-5, atol=1e-6)
    assert tape.gradient(product, states) is None
    assert all(tape.gradient(product, v) is None for v in layer.trainable_weights)
    in_graph = tf.function(layer.constant_product)(states)  # as the step runs it
    np.testing.assert_allclose(in_graph.numpy(), states.numpy() @ matrix, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("product", ["sparse", "dense"])
def test_label_graph_call_is_row_vector_product_on_either_path(rng, monkeypatch, product):
    import imcl_tf.label_graph as label_graph_lib
    monkeypatch.setattr(label_graph_lib, "DENSE_PRODUCT_RATIO", 10**6 if product == "dense" else 0)
    graph = normalize_graph(sparse_nonnegative(rng, 6))
    layer = LabelGraph(graph)
    assert layer.dense_product == (product == "dense") and layer.structure == "general"
    states = rng.normal(size=(3, 6)).astype(np.float32)
    np.testing.assert_allclose(layer(states).numpy(), states @ graph, rtol=1e-5, atol=1e-6)
    stacked = rng.normal(size=(2, 3, 6)).astype(np.float32)
    np.testing.assert_allclose(layer(stacked).numpy(), stacked @ graph, rtol=1e-5, atol=1e-6)
    # Gradients w.r.t. the stored values are the dense gradient dG = states^T upstream, read on
    # the support; w.r.t. the states, upstream G^T.
    upstream = rng.normal(size=(3, 6)).astype(np.float32)
    states_tensor = tf.constant(states)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(states_tensor)
        loss = tf.reduce_sum(layer(states_tensor) * upstream)
    rows, columns = _numpy_support(graph)
    np.testing.assert_array_equal(layer.support.numpy(), np.stack([rows, columns], 1))
    np.testing.assert_allclose(tape.gradient(loss, layer.values).numpy(),
                               (states.T @ upstream)[rows, columns], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tape.gradient(loss, states_tensor).numpy(), upstream @ graph.T,
                               rtol=1e-5, atol=1e-6)


def test_fixed_identity_graph_stores_nothing_and_skips_the_product(rng):
    layer = LabelGraph(identity_graph(5), learnable=False)
    assert layer.structure == "identity" and layer.weights == [] and layer.num_entries == 0
    states = rng.normal(size=(3, 5)).astype(np.float32)
    np.testing.assert_array_equal(layer(states).numpy(), states)
    np.testing.assert_array_equal(layer.matrix.numpy(), np.eye(5))
    clone = LabelGraph.from_config(layer.get_config())
    assert clone.structure == "identity" and clone.weights == []
    assert layer.statistics()["mean_diagonal"] == 1.0


def test_learnable_identity_graph_is_a_diagonal_scaling(rng):
    layer = LabelGraph(identity_graph(5), learnable=True)
    assert layer.structure == "diagonal" and layer.values.shape == (5,)
    layer.values.assign([1.0, 0.5, 0.25, 0.0, 1.0])
    states = rng.normal(size=(3, 5)).astype(np.float32)
    np.testing.assert_allclose(layer(states).numpy(), states * [1.0, 0.5, 0.25, 0.0, 1.0])
    np.testing.assert_allclose(layer.matrix.numpy(), np.diag([1.0, 0.5, 0.25, 0.0, 1.0]))


@pytest.mark.parametrize("optimizer_name, clip", [("rmsprop", True), ("rmsprop", False),
                                                  ("adam", True)])
def test_label_graph_keeps_zero_pattern_after_optimizer_steps(rng, optimizer_name, clip):
    graph = normalize_graph(sparse_nonnegative(rng, 8))
    layer = LabelGraph(graph, clip=clip)
    support = graph != 0
    optimizer = {"rmsprop": keras.optimizers.RMSprop(0.5, momentum=0.9),
                 "adam": keras.optimizers.Adam(0.5)}[optimizer_name]
    for _ in range(5):
        gradient = tf.constant(rng.normal(scale=3.0, size=(int(support.sum()),)), tf.float32)
        optimizer.apply([gradient], [layer.values])
    # The optimizer's slots hold one number per support entry, never L x L.
    slots = [v for v in optimizer.variables if len(v.shape) > 0]
    assert slots and all(tuple(v.shape) == (int(support.sum()),) for v in slots)
    matrix = layer.matrix.numpy()
    np.testing.assert_array_equal(matrix[~support], 0.0)
    values = matrix[support]
    assert np.abs(values - graph[support]).max() > 0.1  # the support did move
    if clip:
        assert values.min() >= 0.0 and values.max() <= 1.0
        assert np.any(values == 0.0) or np.any(values == 1.0)
    else:
        assert values.min() < 0.0 or values.max() > 1.0


def test_label_graph_learnable_flag_and_reset(rng):
    graph = normalize_graph(sparse_nonnegative(rng, 4))
    frozen = LabelGraph(graph, learnable=False)
    assert frozen.trainable_weights == []
    learned = LabelGraph(graph)
    assert [w.name for w in learned.trainable_weights] == ["values"]
    learned.values.assign(learned.values * 0.5)
    learned.reset_to_initial()
    np.testing.assert_array_equal(learned.matrix.numpy(), graph)


def test_label_graph_statistics_match_numpy(rng):
    graph = normalize_graph(sparse_nonnegative(rng, 6))
    layer = LabelGraph(graph)
    support = graph != 0
    changed = np.clip(graph + support * rng.normal(scale=0.4, size=graph.shape), 0, 1)
    layer.values.assign(changed[support].astype(np.float32))
    matrix = layer.matrix.numpy().astype(np.float64)
    np.testing.assert_array_equal(matrix, changed.astype(np.float32))
    stats = layer.statistics()
    assert all(isinstance(value, float) for value in stats.values())
    np.testing.assert_allclose(stats["mean_diagonal"], np.diag(matrix).mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["mean_offdiagonal_mass"],
                               np.mean([matrix[:, j].sum() - matrix[j, j] for j in range(6)]),
                               rtol=1e-6)
    np.testing.assert_allclose(stats["mean_abs_change"], np.abs(matrix - graph)[support].mean(),
                               rtol=1e-5)
    np.testing.assert_allclose(stats["mean_abs_column_sum_error"],
                               np.abs(matrix.sum(0) - 1).mean(), rtol=1e-5)
    np.testing.assert_allclose(stats["fraction_at_zero"], np.mean(matrix[support] <= 0))
    np.testing.assert_allclose(stats["fraction_at_one"], np.mean(matrix[support] >= 1))
    assert stats["num_parameters"] == support.sum()


@pytest.mark.parametrize("kind", ["general", "diagonal", "identity"])
def test_label_graph_dense_block_is_the_matrix_indexed_by_the_classes(rng, kind):
    size = 9
    if kind == "general":
        graph = normalize_graph(sparse_nonnegative(rng, size))
    else:
        graph = np.eye(size, dtype=np.float32)
    layer = LabelGraph(graph, learnable=kind != "identity")
    assert layer.structure == kind
    current = graph.copy()
    if kind != "identity":
        support = graph != 0
        current = np.clip(graph + support * rng.normal(scale=0.3, size=graph.shape), 0, 1)
        current = current.astype(np.float32)
        layer.values.assign(current[support])
    classes = rng.permutation(size)[:5]
    block = layer.dense_block(classes)
    assert block.dtype == np.float32 and block.shape == (5, 5)
    np.testing.assert_array_equal(block, current[np.ix_(classes, classes)])
    np.testing.assert_array_equal(layer.dense_block(classes, initial=True),
                                  graph[np.ix_(classes, classes)])
    np.testing.assert_array_equal(layer.dense_block(), current)
    for bad in ([0, 0, 1], [size], [-1], [[0, 1]]):
        with pytest.raises(ValueError, match="distinct label indices"):
            layer.dense_block(bad)


def test_label_graph_dense_block_refuses_a_whole_huge_graph(monkeypatch):
    import imcl_tf.label_graph as graph_module
    monkeypatch.setattr(graph_module, "DENSE_BLOCK_LIMIT", 4)
    layer = LabelGraph(np.eye(5, dtype=np.float32), learnable=False)
    with pytest.raises(ValueError, match="pass the classes"):
        layer.dense_block()
    assert layer.dense_block([4, 1]).tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_label_graph_saves_and_reloads_inside_a_keras_model(tmp_path, rng):
    graph = normalize_graph(sparse_nonnegative(rng, 6))
    inputs = keras.Input((6,))
    model = keras.Model(inputs, LabelGraph(graph, clip=True)(inputs))
    model.compile(optimizer=keras.optimizers.SGD(1.0), loss="mse")
    x = rng.normal(size=(16, 6)).astype(np.float32)
    model.fit(x, 3.0 * rng.normal(size=(16, 6)).astype(np.float32), epochs=2, batch_size=8,
              verbose=0)
    trained = model.layers[-1]
    assert not np.array_equal(trained.matrix.numpy(), graph)
    path = os.path.join(tmp_path, "graph_model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    layer = reloaded.layers[-1]
    assert isinstance(layer, LabelGraph) and layer.clip and layer.learnable
    np.testing.assert_array_equal(layer.values.numpy(), trained.values.numpy())
    np.testing.assert_array_equal(layer.initial_matrix.numpy(), graph)
    np.testing.assert_array_equal(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))
    np.testing.assert_array_equal(layer.support_mask.numpy(), (graph != 0).astype(np.float32))


def test_label_graph_config_round_trip(rng):
    graph = normalize_graph(sparse_nonnegative(rng, 4))
    with_matrix = LabelGraph(graph, learnable=False, clip=False, matrix_in_config=True)
    clone = LabelGraph.from_config(with_matrix.get_config())
    assert (clone.learnable, clone.clip, clone.num_classes) == (False, False, 4)
    np.testing.assert_array_equal(clone.matrix.numpy(), graph)
    without_matrix = LabelGraph(graph)
    config = without_matrix.get_config()
    assert "initial_matrix" not in config and config["num_classes"] == 4
    assert config["num_entries"] == np.count_nonzero(graph)
    placeholder = LabelGraph.from_config(config)
    placeholder.set_weights(without_matrix.get_weights())
    np.testing.assert_array_equal(placeholder.matrix.numpy(), graph)


def test_label_graph_computes_in_float32_under_mixed_precision(rng):
    graph = normalize_graph(sparse_nonnegative(rng, 4))
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = LabelGraph(graph)
        output = layer(tf.constant(rng.normal(size=(2, 4)), tf.float16))
    finally:
        keras.config.set_dtype_policy(previous)
    assert output.dtype == tf.float32 and layer.values.dtype == "float32"


def test_label_graph_rejects_bad_initial_matrix():
    with pytest.raises(ValueError, match="square"):
        LabelGraph(np.ones((2, 3)))
    with pytest.raises(ValueError, match="give initial_matrix, or num_classes"):
        LabelGraph()
    with pytest.raises(ValueError, match="structure must be one of"):
        LabelGraph(num_classes=3, num_entries=2, structure="banded")

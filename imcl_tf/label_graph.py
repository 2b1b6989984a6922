"""Label graphs: builders (identity, co-occurrence, .npy), normalisation and the masked Keras layer.

A graph is a NumPy float32 [L, L] matrix G in the code's row-vector convention (docs/method.md
§1, §3): a label-state row y is propagated as (y G)_j = sum_l y_l G_lj, so column j says how
label j is predicted from its related labels. After `normalize_graph` every column sums to 1 and the
propagated score of label j is a weighted average of the predictions of j and its related labels.
`LabelGraph` holds the normalised matrix on its support: only its initially non-zero entries are
stored, multiplied and trained.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from imcl_tf.choices import GRAPH_KINDS
from imcl_tf.data import DataError


# ---- Builders ----------------------------------------------------------------------------------


def build_label_graph(spec: str, num_classes: int, train_label_rows=None, top_k: int | None = None,
                      normalize: bool = True) -> np.ndarray:
    """The initial label graph named by a `--label_graph` value, float32 [L, L].

    Args:
      spec: "identity", "cooccurrence" (needs `train_label_rows`) or a path ending in ".npy".
      num_classes: L.
      train_label_rows: training-split label rows for "cooccurrence" (see `cooccurrence_graph`).
      top_k: for "cooccurrence", how many related labels each column keeps.
      normalize: apply `normalize_graph` (what `LabelGraph` expects); False gives the raw matrix.
    """
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"build_label_graph: num_classes must be a positive integer. "
                         f"Received: num_classes={num_classes!r}.")
    if spec == "identity":
        graph = identity_graph(num_classes)
    elif spec == "cooccurrence":
        if train_label_rows is None:
            raise ValueError("build_label_graph: spec='cooccurrence' needs the training label rows "
                             "(train_label_rows); pass the TRAINING split only, never test labels.")
        graph = cooccurrence_graph(train_label_rows, top_k=top_k)
        if graph.shape[0] != num_classes:
            raise ValueError(f"build_label_graph: the training label rows have {graph.shape[0]} "
                             f"classes but num_classes={num_classes}.")
    elif isinstance(spec, (str, os.PathLike)) and os.fspath(spec).endswith(".npy"):
        graph = load_graph_npy(spec, num_classes)
    else:
        raise ValueError(f"build_label_graph: spec must be one of {GRAPH_KINDS} or a path ending "
                         f"in '.npy'. Received: spec={spec!r}.")
    return normalize_graph(graph) if normalize else graph


def identity_graph(num_classes: int) -> np.ndarray:
    """The identity graph (no propagation, the CUB setting), float32 [L, L]."""
    return np.eye(num_classes, dtype=np.float32)


def cooccurrence_graph(label_rows, top_k: int | None = None) -> np.ndarray:
    """Co-occurrence graph from KNOWN labels, float32 [L, L] with entries in [0, 1].

    G[l, j] = (number of images where l and j are both known positive) /
              (number of images where j is known positive AND l is known, +1 or -1),
    i.e. an estimate of P(l | j) from the images where both are observed; the diagonal is 1.
    Counting only the images where l is known keeps the estimate unbiased under random masking:
    dividing by every image where j is positive would give (known ratio) x P(l | j) and shrink the
    graph towards the identity exactly when few labels are known. Unknown entries are ignored;
    pass the TRAINING split only. A label without any known positive gets an identity column; an
    l never known on the images where j is positive gets G[l, j] = 0 (no evidence). With
    positives-only labels (caption words, single-positive) every known l co-occurs with j, so G
    is 1 wherever two labels ever co-occur: to treat unknowns as absent, pass the rows with 0
    replaced by -1 (that gives #(l, j positive) / #(j positive)).

    Args:
      label_rows: [N, L] label rows in {+1, -1, 0}, or an iterable of such [n, L] chunks (to stream
        a large training set).
      top_k: keep only the top_k largest off-diagonal entries of each column (ties to the lower
        label index); None keeps every co-occurring label.
    """
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 0):
        raise ValueError(f"cooccurrence_graph: top_k must be None or an integer >= 0. "
                         f"Received: top_k={top_k!r}.")
    chunks = [label_rows] if isinstance(label_rows, np.ndarray) or _is_2d_list(label_rows) \
        else label_rows
    counts = None  # [L, L] float64: counts[l, j] = #images with l and j both known positive
    known_counts = None  # [L, L] float64: known_counts[l, j] = #images with j positive, l known
    for index, chunk in enumerate(chunks):
        chunk = np.asarray(chunk)
        if chunk.ndim != 2:
            raise ValueError(f"cooccurrence_graph: label rows must be [N, L]. Received: chunk "
                             f"{index} with shape {chunk.shape}.")
        if not np.all(np.isin(chunk, (-1, 0, 1))):
            bad = np.unique(chunk[~np.isin(chunk, (-1, 0, 1))])[:5]
            raise ValueError(f"cooccurrence_graph: label rows must contain only +1, -1 and 0. "
                             f"Received other values in chunk {index}, e.g. {bad.tolist()}.")
        if counts is None:
            counts = np.zeros([chunk.shape[1]] * 2, np.float64)
            known_counts = np.zeros_like(counts)
        elif chunk.shape[1] != counts.shape[0]:
            raise ValueError(f"cooccurrence_graph: chunk {index} has {chunk.shape[1]} classes, "
                             f"the first had {counts.shape[0]}.")
        positives = (chunk > 0).astype(np.float32)  # [n, L]
        known = (chunk != 0).astype(np.float32)  # [n, L]
        # Exact: float32 integers are exact up to 2^24 per chunk.
        counts += positives.T @ positives
        known_counts += known.T @ positives
    if counts is None:
        raise ValueError("cooccurrence_graph: no label rows were given.")
    with np.errstate(divide="ignore", invalid="ignore"):
        graph = np.where(known_counts > 0, counts / known_counts, 0.0)  # [L, L], column-wise
    np.fill_diagonal(graph, 1.0)
    if top_k is not None:
        graph = _keep_top_k_per_column(graph, top_k)
    return graph.astype(np.float32)


def load_graph_npy(path, num_classes: int) -> np.ndarray:
    """Loads an [L, L] nonnegative graph from a .npy file (code convention: column j feeds label j).

    Raises:
      FileNotFoundError: no such file.
      DataError: not a readable .npy array, wrong shape, non-finite or negative values.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_graph_npy: label-graph file {path!r} does not exist; give "
                                "--label_graph=identity, cooccurrence or an existing .npy path.")
    try:
        graph = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"load_graph_npy: {path!r} is not a readable .npy array ({error}); save "
                        "it with numpy.save(path, matrix) as a plain float array.") from error
    if not isinstance(graph, np.ndarray) or graph.dtype.kind not in "biuf":
        raise DataError(f"load_graph_npy: {path!r} must hold a numeric array. Received dtype "
                        f"{getattr(graph, 'dtype', type(graph))}.")
    if graph.shape != (num_classes, num_classes):
        raise DataError(f"load_graph_npy: {path!r} has shape {graph.shape} but the dataset has "
                        f"{num_classes} classes; expected ({num_classes}, {num_classes}).")
    graph = graph.astype(np.float32)
    if not np.all(np.isfinite(graph)):
        bad = np.argwhere(~np.isfinite(graph))[:3].tolist()
        raise DataError(f"load_graph_npy: {path!r} has non-finite values (NaN or inf), e.g. at "
                        f"[row, column] {bad}.")
    if np.any(graph < 0):
        bad = np.argwhere(graph < 0)[:3].tolist()
        raise DataError(f"load_graph_npy: {path!r} has negative values, e.g. at [row, column] "
                        f"{bad}; label-graph weights must be >= 0.")
    return graph


def normalize_graph(graph) -> np.ndarray:
    """Sets the diagonal to 1, then divides every column by its sum (docs/method.md §3), float32
    [L, L].

    Afterwards every column sums to 1 and G[j, j] = 1 / (sum of column j with its diagonal set to 1).
    """
    graph = np.array(graph, dtype=np.float64)  # a copy; float64 so the column sums are exact
    if graph.ndim != 2 or graph.shape[0] != graph.shape[1]:
        raise ValueError(f"normalize_graph: the graph must be a square [L, L] matrix. "
                         f"Received: shape {graph.shape}.")
    if not np.all(np.isfinite(graph)) or np.any(graph < 0):
        raise ValueError("normalize_graph: graph entries must be finite and >= 0 so that column "
                         "sums are positive.")
    np.fill_diagonal(graph, 1.0)
    return (graph / graph.sum(axis=0, keepdims=True)).astype(np.float32)


# ---- The masked, learnable graph layer ---------------------------------------------------------


# A sparse product costs about this many times a dense one per stored entry on CPU (measured:
# tf.sparse.sparse_dense_matmul against a dense matmul, [4096, 5000] states, 30,000 entries), so
# a graph denser than 1 / DENSE_PRODUCT_RATIO of L x L is multiplied as a dense matrix (built from
# its stored entries each call); sparser ones on their support only.
DENSE_PRODUCT_RATIO = 64
STRUCTURES = ("identity", "diagonal", "general")
# The most labels LabelGraph.dense_block returns without being told which (4096^2 floats: 64 MiB).
DENSE_BLOCK_LIMIT = 4096


@keras.saving.register_keras_serializable(package="imcl_tf")
class LabelGraph(keras.layers.Layer):
    """The label graph G as a Keras layer: `layer(states [..., L]) -> states @ G`.

    G is stored on its support only (docs/architecture.md, scale rules): the positions of the
    initial matrix's non-zero entries (`support`, int32 [S, 2] of (row, column), row-major) and
    their values (`values`, float32 [S], the trainable parameters) next to their initial values
    (`initial_values`). Entries outside the support are zero forever and cost nothing, neither in
    the product nor in the optimizer's slots. With clip=True a variable constraint projects the
    values to [0, 1] after every optimizer step (Keras 3 optimizers apply `variable.constraint`
    after each update). The initial matrix is expected normalised (`normalize_graph`, columns
    summing to 1).

    How the product is done depends on the structure: a fixed identity (not learnable) has no
    variable and no product at all; a graph whose support is the diagonal is an elementwise
    scaling; a graph with more than L^2 / DENSE_PRODUCT_RATIO entries is multiplied densely; any
    other one by a sparse-dense product on its support.

    Args:
      initial_matrix: the normalised [L, L] matrix (`build_label_graph`); None creates a
        placeholder of size num_classes with `num_entries` entries and the given `structure`,
        whose support and values are then restored from saved weights.
      num_classes: L, required when initial_matrix is None.
      learnable: whether the values are trainable.
      clip: project the values to [0, 1] after every optimizer step.
      matrix_in_config: put the initial matrix into get_config() (small L only; otherwise the
        weights carry it, as in any saved Keras model).
      num_entries, structure: the placeholder's support size S and structure (get_config() gives
        them); ignored when initial_matrix is given.

    Example:
      >>> layer = LabelGraph(normalize_graph([[1.0, 1.0], [0.0, 1.0]]), learnable=False)
      >>> layer(np.array([[1.0, 0.0]], np.float32)).numpy().tolist()
      [[1.0, 0.5]]
    """

    def __init__(self, initial_matrix=None, num_classes: int | None = None, learnable: bool = True,
                 clip: bool = True, matrix_in_config: bool = False, num_entries: int | None = None,
                 structure: str | None = None, **kwargs):
        # The graph works on float32 label states even under a mixed-precision policy.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.learnable = bool(learnable)
        self.clip = bool(clip)
        self.matrix_in_config = bool(matrix_in_config)
        if initial_matrix is None:
            if num_classes is None or int(num_classes) < 1:
                raise ValueError("LabelGraph: give initial_matrix, or num_classes >= 1 to create "
                                 "a placeholder restored from saved weights. Received: "
                                 f"num_classes={num_classes!r}.")
            self.num_classes = int(num_classes)
            if num_entries is None:  # an identity placeholder
                support, values = _support_of(identity_graph(self.num_classes))
            else:
                support = np.zeros([int(num_entries), 2], np.int32)
                values = np.zeros([int(num_entries)], np.float32)
            if structure is None:
                structure = ("general" if num_entries is not None else
                             "diagonal" if self.learnable else "identity")
            if structure not in STRUCTURES:
                raise ValueError(f"LabelGraph: structure must be one of {STRUCTURES}. "
                                 f"Received: structure={structure!r}.")
            self._initial_values = None
        else:
            initial = _initial_matrix(initial_matrix, num_classes)
            self.num_classes = int(initial.shape[0])
            support, values = _support_of(initial)
            structure = _structure_of(initial, support, self.learnable)
            self._initial_values = initial if matrix_in_config else None
        self.structure = structure
        self.num_entries = 0 if structure == "identity" else int(support.shape[0])
        self.dense_product = (structure == "general" and
                              self.num_entries * DENSE_PRODUCT_RATIO > self.num_classes ** 2)
        if structure == "identity":
            self.built = True  # nothing to store: G = I, and the product is skipped
            return
        self.support = self.add_weight(
            name="support", shape=support.shape, dtype="int32",
            initializer=keras.initializers.Constant(support), trainable=False)
        self.initial_values = self.add_weight(
            name="initial_values", shape=values.shape, dtype="float32",
            initializer=keras.initializers.Constant(values), trainable=False)
        self.values = self.add_weight(
            name="values", shape=values.shape, dtype="float32",
            initializer=keras.initializers.Constant(values), trainable=self.learnable,
            constraint=_ClipConstraint() if self.clip else None)
        self.built = True

    def call(self, states):
        states = tf.cast(states, tf.float32)
        if self.structure == "identity":
            return states
        if self.structure == "diagonal":
            return states * self._dense(self.values, [self.num_classes], self.support[:, :1])
        if self.dense_product:
            return tf.tensordot(states, self.matrix, axes=1)  # [..., L] @ [L, L]
        flat = tf.reshape(states, [-1, self.num_classes])  # [N, L]
        graph = tf.SparseTensor(tf.cast(self.support, tf.int64), self.values,
                                [self.num_classes, self.num_classes])
        product = tf.sparse.sparse_dense_matmul(flat, graph)  # [N, L], support entries only
        return tf.reshape(product, tf.shape(states))

    def constant_product(self, states):
        """`states @ G` like calling the layer, but a constant: no gradient reaches G or states.

        For the atoms' selection label states (IMCL's OMP only chooses with them), [..., L] of
        every bank atom at every step. A general sparse graph is multiplied there by a CSR product
        of G^T (`tf.raw_ops.SparseMatrixMatMul`), about 3 times faster on CPU than the layer's
        `sparse_dense_matmul`, which is kept for calls that need gradients (bench/results/scale.md,
        "The selection pass"). Other structures take the layer's own product.
        """
        states = tf.stop_gradient(tf.cast(states, tf.float32))
        if self.structure != "general" or self.dense_product:
            return tf.stop_gradient(self(states))
        flat = tf.reshape(states, [-1, self.num_classes])  # [N, L]
        # G^T's entries (column, row) in row-major order, as the CSR conversion needs them.
        transposed = tf.sparse.reorder(tf.SparseTensor(
            tf.cast(tf.reverse(self.support, axis=[1]), tf.int64), tf.stop_gradient(self.values),
            [self.num_classes, self.num_classes]))
        csr = tf.raw_ops.SparseTensorToCSRSparseMatrix(
            indices=transposed.indices, values=transposed.values,
            dense_shape=transposed.dense_shape)
        # (G^T flat^T)^T = flat G, with both transposes inside the kernel.
        product = tf.raw_ops.SparseMatrixMatMul(a=csr, b=flat, transpose_b=True,
                                                transpose_output=True)
        return tf.reshape(product, tf.shape(states))

    def _dense(self, values, shape, positions=None):
        positions = self.support if positions is None else positions
        return tf.scatter_nd(positions, values, shape)

    @property
    def matrix(self) -> tf.Tensor:
        """The graph G as a dense float32 [L, L] tensor (for inspection and small L)."""
        if self.structure == "identity":
            return tf.eye(self.num_classes)
        return self._dense(self.values, [self.num_classes] * 2)

    @property
    def initial_matrix(self) -> tf.Tensor:
        """The initial graph as a dense float32 [L, L] tensor."""
        if self.structure == "identity":
            return tf.eye(self.num_classes)
        return self._dense(self.initial_values, [self.num_classes] * 2)

    @property
    def support_mask(self) -> tf.Tensor:
        """float32 [L, L]: 1 on the support (the entries that are parameters), dense."""
        if self.structure == "identity":
            return tf.eye(self.num_classes)
        return self._dense(tf.ones([self.num_entries]), [self.num_classes] * 2)

    def dense_block(self, classes=None, initial: bool = False) -> np.ndarray:
        """G (or G0 with initial=True) on the rows and columns `classes`, dense float32 NumPy.

        block[a, b] = G[classes[a], classes[b]]. Built from the stored entries only, so a block
        of a few hundred labels of a graph over many thousands never forms the [L, L] matrix.
        classes=None gives the whole [L, L] matrix, refused above DENSE_BLOCK_LIMIT labels.
        """
        if classes is None:
            if self.num_classes > DENSE_BLOCK_LIMIT:
                raise ValueError(f"LabelGraph.dense_block: {self.num_classes} labels are more than "
                                 f"{DENSE_BLOCK_LIMIT}; pass the classes to show.")
            classes = np.arange(self.num_classes)
        classes = np.asarray(classes, np.int64)
        if (classes.ndim != 1 or np.any((classes < 0) | (classes >= self.num_classes))
                or np.unique(classes).size != classes.size):
            raise ValueError(f"LabelGraph.dense_block: classes must be distinct label indices in "
                             f"[0, {self.num_classes}). Received: {classes.tolist()[:10]}.")
        if self.structure == "identity":
            return (classes[:, None] == classes[None, :]).astype(np.float32)
        support = self.support.numpy()
        values = (self.initial_values if initial else self.values).numpy()
        position = np.full(self.num_classes, -1, np.int64)  # label -> its place in the block
        position[classes] = np.arange(classes.size)
        rows, columns = position[support[:, 0]], position[support[:, 1]]
        kept = (rows >= 0) & (columns >= 0)
        block = np.zeros([classes.size, classes.size], np.float32)
        block[rows[kept], columns[kept]] = values[kept]
        return block

    def reset_to_initial(self) -> None:
        """Restores G to its initial values (e.g. after a NaN loss, as the official OI run does)."""
        if self.structure != "identity":
            self.values.assign(self.initial_values)

    def statistics(self) -> dict[str, float]:
        """Scalars describing G for TensorBoard (eager only), over the support entries.

        Keys: mean_diagonal, mean_offdiagonal_mass (per-column sum of off-diagonal weights,
        averaged over columns), mean_abs_change and max_abs_change (|G - G0| over the support),
        mean_abs_column_sum_error (|column sum - 1|), fraction_at_zero and fraction_at_one
        (support entries at the clip bounds), min_value, max_value, num_parameters. Computed on
        the S stored entries, never on a dense [L, L] matrix.
        """
        size = self.num_classes
        if self.structure == "identity":
            rows = columns = np.arange(size)
            values = initial = np.ones(size, np.float32)
        else:
            support = self.support.numpy()
            rows, columns = support[:, 0], support[:, 1]
            values, initial = self.values.numpy(), self.initial_values.numpy()
        on_diagonal = rows == columns
        diagonal = np.bincount(rows[on_diagonal], values[on_diagonal].astype(np.float64),
                               minlength=size)
        column_sums = np.bincount(columns, values.astype(np.float64), minlength=size)
        change = np.abs(values - initial)
        return {
            "mean_diagonal": float(diagonal.mean()),
            "mean_offdiagonal_mass": float((column_sums - diagonal).mean()),
            "mean_abs_change": float(change.mean(dtype=np.float64)) if change.size else 0.0,
            "max_abs_change": float(change.max()) if change.size else 0.0,
            "mean_abs_column_sum_error": float(np.abs(column_sums - 1.0).mean()),
            "fraction_at_zero": float(np.mean(values <= 0.0)) if values.size else 0.0,
            "fraction_at_one": float(np.mean(values >= 1.0)) if values.size else 0.0,
            "min_value": float(values.min()) if values.size else 0.0,
            "max_value": float(values.max()) if values.size else 0.0,
            "num_parameters": float(values.size),
        }

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({"num_classes": self.num_classes, "learnable": self.learnable,
                       "clip": self.clip, "matrix_in_config": self.matrix_in_config,
                       "num_entries": None if self.structure == "identity" else self.num_entries,
                       "structure": self.structure})
        if self.matrix_in_config:
            config["initial_matrix"] = self._initial_values.tolist()
        return config


class _ClipConstraint(keras.constraints.Constraint):
    """Projects the graph's stored values to [0, 1] after every optimizer step."""

    def __call__(self, weight):
        return tf.clip_by_value(weight, 0.0, 1.0)

    def get_config(self):
        return {}


# ---- Helpers -----------------------------------------------------------------------------------


def _initial_matrix(initial_matrix, num_classes):
    initial = np.asarray(initial_matrix, dtype=np.float32)
    if initial.ndim != 2 or initial.shape[0] != initial.shape[1]:
        raise ValueError(f"LabelGraph: initial_matrix must be a square [L, L] matrix. "
                         f"Received: shape {initial.shape}.")
    if num_classes is not None and initial.shape[0] != int(num_classes):
        raise ValueError(f"LabelGraph: initial_matrix is {initial.shape} but "
                         f"num_classes={num_classes}.")
    if not np.all(np.isfinite(initial)):
        raise ValueError("LabelGraph: initial_matrix has non-finite values (NaN or inf).")
    return initial


def _support_of(matrix):
    """(support int32 [S, 2] of (row, column) in row-major order, values float32 [S])."""
    rows, columns = np.nonzero(matrix)  # row-major order
    return (np.stack([rows, columns], axis=1).astype(np.int32),
            matrix[rows, columns].astype(np.float32))


def _structure_of(matrix, support, learnable):
    """"identity" (fixed I: nothing stored), "diagonal" (support = the diagonal) or "general"."""
    size = matrix.shape[0]
    diagonal = support.shape[0] == size and np.array_equal(support[:, 0], np.arange(size)) \
        and np.array_equal(support[:, 1], np.arange(size))
    if diagonal and not learnable and np.all(np.diag(matrix) == 1.0):
        return "identity"
    return "diagonal" if diagonal else "general"


def _keep_top_k_per_column(graph, top_k):
    """Keeps the diagonal and the top_k largest positive off-diagonal entries of every column."""
    kept = np.zeros_like(graph)
    columns = np.ascontiguousarray(graph.T)  # row j of this is column j of the graph
    for j, column in enumerate(columns):
        related = np.flatnonzero(column > 0)
        related = related[related != j]
        # Largest first; equal values keep the lower label index first (lexsort is stable).
        strongest = related[np.lexsort((related, -column[related]))][:top_k]
        kept[strongest, j] = column[strongest]
    np.fill_diagonal(kept, np.diag(graph))
    return kept


def _is_2d_list(value) -> bool:
    """True for a nested Python list/tuple of rows (one chunk), False for an iterable of chunks."""
    if not isinstance(value, (list, tuple)) or not value:
        return False
    first = value[0]
    return isinstance(first, (list, tuple)) and (not first or not isinstance(
        first[0], (list, tuple, np.ndarray)))

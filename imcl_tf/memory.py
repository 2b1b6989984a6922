"""The dictionary bank: the N_S training images IMCL reconstructs each minibatch image from.

The bank holds, for M chosen training images, their network inputs (uint8 images or float
embeddings), their cached features, their PARTIAL label rows and their id hashes (docs/method.md §3).
The features, label rows and ids are non-trainable Keras weights, so they save and restore with
the model. The inputs are not (docs/architecture.md, scale rules): they stay in host memory
as a NumPy array (uint8 for images: 150 KB per 224 x 224 atom, 1.5 GB for a 10,000-image bank),
never in a variable, on an accelerator or in a checkpoint; a restored bank gets them back with
`set_inputs` (re-read from the dataset). Cached features are refreshed with the current network
every `refresh_every` steps; label states of the atoms are recomputed from the cached features
with the current classifier and graph.
"""

from __future__ import annotations

import numpy as np
import keras
import tensorflow as tf


def select_dictionary(label_rows: np.ndarray, per_class: int = 10, max_size: int = 0,
                      seed: int = 0) -> np.ndarray:
    """Chooses the training images of the bank; returns their sorted row indices.

    Args:
      label_rows: [N, L] partial label rows in {+1, -1, 0} of the training split.
      per_class: images per class with a KNOWN positive for that class (docs/method.md §3: 10).
        Classes are served rarest first; an image already chosen for another class counts for
        every class it is a known positive of, so no image appears twice. 0 takes the whole split.
      max_size: if > 0, the bank is cut to at most this many images (a seeded random subset).
      seed: seed of the random choices.
    """
    label_rows = np.asarray(label_rows)
    if label_rows.ndim != 2:
        raise ValueError(f"select_dictionary: label_rows must be [N, L], received shape {label_rows.shape}.")
    if per_class < 0 or max_size < 0:
        raise ValueError(f"select_dictionary: per_class and max_size must be >= 0, received "
                         f"per_class={per_class}, max_size={max_size}.")
    num_images = label_rows.shape[0]
    if num_images == 0:
        raise ValueError("select_dictionary: the training split is empty.")
    rng = np.random.default_rng(seed)
    if per_class == 0:
        chosen = np.arange(num_images)
    else:
        positive = label_rows > 0  # [N, L]
        chosen_mask = np.zeros(num_images, bool)
        for label in np.argsort(positive.sum(0), kind="stable"):  # rarest classes first
            candidates = np.flatnonzero(positive[:, label])
            if candidates.size == 0:
                continue
            have = int(chosen_mask[candidates].sum())
            free = candidates[~chosen_mask[candidates]]
            take = min(per_class - have, free.size)
            if take > 0:
                chosen_mask[rng.choice(free, size=take, replace=False)] = True
        chosen = np.flatnonzero(chosen_mask)
        if chosen.size == 0:
            raise ValueError("select_dictionary: no training image has a known positive label, so a "
                             "per-class dictionary is empty; use --dictionary_per_class=0 (whole split).")
    if 0 < max_size < chosen.size:
        chosen = np.sort(rng.choice(chosen, size=max_size, replace=False))
    return chosen


@keras.saving.register_keras_serializable(package="imcl_tf")
class DictionaryBank(keras.layers.Layer):
    """The M dictionary images: inputs in host memory, features, labels and ids in weights.

    Filling goes chunk by chunk (`fill`): each chunk is checked and converted to the stored dtype
    on its own, so filling never holds a float32 copy of all atoms' images.

    Args:
      size: M, the number of atoms (static: the OMP compiles once for it).
      input_shape_: shape of one network input, e.g. (64, 64, 3) or (D_in,).
      inputs_dtype: "uint8" for images (0..255), "float32" for embeddings.
      feature_dim: D, the dimension of the cached features.
      num_classes: L.
    """

    def __init__(self, size: int, input_shape_: tuple[int, ...], inputs_dtype: str, feature_dim: int,
                 num_classes: int, **kwargs):
        super().__init__(trainable=False, **kwargs)
        if size < 1:
            raise ValueError(f"DictionaryBank: size must be >= 1, received size={size}.")
        if inputs_dtype not in ("uint8", "float32"):
            raise ValueError(f"DictionaryBank: inputs_dtype must be 'uint8' or 'float32', "
                             f"received {inputs_dtype!r}.")
        self.size = int(size)
        self.input_shape_ = tuple(int(d) for d in input_shape_)
        self.inputs_dtype = inputs_dtype
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self._host = _HostInputs()  # not a weight: kept out of variables and checkpoints
        self.features = self.add_weight(shape=(self.size, self.feature_dim), dtype="float32",
                                        initializer="zeros", trainable=False, name="features")
        # Partial label rows in {+1, -1, 0}; int8 keeps a 50,000 x 5,000 bank at 250 MB.
        self.labels = self.add_weight(shape=(self.size, self.num_classes), dtype="int8",
                                      initializer="zeros", trainable=False, name="labels")
        self.ids = self.add_weight(shape=(self.size,), dtype="int64", initializer="zeros",
                                   trainable=False, name="ids")
        self.filled = self.add_weight(shape=(), dtype="bool", initializer="zeros", trainable=False,
                                      name="filled")

    @property
    def inputs(self) -> np.ndarray:
        """The atoms' network inputs, a read-only host array [M, ...] of `inputs_dtype`."""
        if self._host.array is None:
            raise ValueError("DictionaryBank: the bank's inputs are not in memory. They are kept "
                             "out of saved models and checkpoints; fill the bank (fill_bank) or, "
                             "after restoring a checkpoint, give them back with set_inputs.")
        return self._host.array

    @property
    def has_inputs(self) -> bool:
        return self._host.array is not None

    def set_contents(self, inputs: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
        """Fills the bank with the chosen training images; features are set by `refresh`."""
        inputs, labels, ids = np.asarray(inputs), np.asarray(labels), np.asarray(ids)
        for name, value, expected in (
                ("inputs", inputs, (self.size,) + self.input_shape_),
                ("labels", labels, (self.size, self.num_classes)), ("ids", ids, (self.size,))):
            if value.shape != expected:
                raise ValueError(f"DictionaryBank.set_contents: {name} must have shape "
                                 f"{expected}, received {value.shape}.")
        self.fill([(inputs, labels, ids)])

    def fill(self, chunks) -> None:
        """Fills the bank from an iterable of (inputs, labels, ids) chunks of M rows in all.

        Each chunk is checked (image values in 0..255, finite embeddings, labels in {-1, 0, 1})
        and converted on its own (images rounded to uint8), into a host array allocated once.
        """
        array = np.empty((self.size,) + self.input_shape_, self.inputs_dtype)
        labels, ids = self._read_chunks(chunks, array, "fill")
        self._host.array = array
        self.labels.assign(labels)
        self.ids.assign(ids)
        self.filled.assign(True)

    def set_inputs(self, chunks) -> None:
        """Gives a restored bank its inputs back, from (inputs, labels, ids) chunks.

        The features, labels and ids came from the checkpoint; the chunks must be the same atoms
        in the same order (checked by id and label row), or the run's data changed under it.
        """
        array = np.empty((self.size,) + self.input_shape_, self.inputs_dtype)
        labels, ids = self._read_chunks(chunks, array, "set_inputs")
        if not bool(self.filled.numpy()):
            raise ValueError("DictionaryBank.set_inputs: the bank was never filled; use fill.")
        if not np.array_equal(ids, self.ids.numpy()) or not np.array_equal(
                labels, self.labels.numpy()):
            raise ValueError("DictionaryBank.set_inputs: the given images are not the atoms the "
                             "restored bank holds (their ids or label rows differ): the "
                             "training split changed since the checkpoint was written. Train in "
                             "a new model_dir, or restore the data the run started with.")
        self._host.array = array

    def _read_chunks(self, chunks, array, where):
        labels = np.empty((self.size, self.num_classes), np.int8)
        ids = np.empty((self.size,), np.int64)
        start = 0
        for index, (inputs, chunk_labels, chunk_ids) in enumerate(chunks):
            inputs, chunk_labels, chunk_ids = (np.asarray(x) for x in
                                               (inputs, chunk_labels, chunk_ids))
            count = len(inputs)
            if start + count > self.size:
                raise ValueError(f"DictionaryBank.{where}: inputs must have shape "
                                 f"{(self.size,) + self.input_shape_}; chunk {index} brings "
                                 f"the total to more than {self.size} rows.")
            self._check_chunk(where, index, inputs, chunk_labels, chunk_ids)
            if self.inputs_dtype == "uint8" and inputs.dtype != np.uint8:
                inputs = np.rint(inputs)  # a chunk-sized float copy at most
            array[start:start + count] = inputs
            labels[start:start + count] = chunk_labels
            ids[start:start + count] = chunk_ids
            start += count
        if start != self.size:
            raise ValueError(f"DictionaryBank.{where}: inputs must have shape "
                             f"{(self.size,) + self.input_shape_}, received {start} rows in all.")
        return labels, ids

    def _check_chunk(self, where, index, inputs, labels, ids):
        count = len(inputs)
        if inputs.shape[1:] != self.input_shape_:
            raise ValueError(f"DictionaryBank.{where}: inputs must have shape "
                             f"{(self.size,) + self.input_shape_}, received rows of shape "
                             f"{inputs.shape[1:]} (chunk {index}).")
        if labels.shape != (count, self.num_classes):
            raise ValueError(f"DictionaryBank.{where}: labels must have shape "
                             f"{(self.size, self.num_classes)}, received {labels.shape} for "
                             f"{count} inputs (chunk {index}).")
        if ids.shape != (count,):
            raise ValueError(f"DictionaryBank.{where}: ids must have shape {(self.size,)}, "
                             f"received {ids.shape} for {count} inputs (chunk {index}).")
        if not np.isin(labels, (-1, 0, 1)).all():
            raise ValueError(f"DictionaryBank.{where}: label values must be in {{-1, 0, 1}}, "
                             f"received values {np.unique(labels)[:10]} (chunk {index}).")
        if self.inputs_dtype == "uint8":
            if count and (inputs.min() < 0 or inputs.max() > 255):
                raise ValueError(f"DictionaryBank.{where}: image inputs must be in 0..255, "
                                 f"received range [{inputs.min()}, {inputs.max()}] "
                                 f"(chunk {index}).")
        elif not np.isfinite(inputs).all():
            raise ValueError(f"DictionaryBank.{where}: inputs contain NaN or inf (chunk {index}).")

    def refresh(self, feature_fn, batch_size: int = 128) -> None:
        """Recomputes the cached features with `feature_fn(inputs float32) -> [n, D]`, in chunks.

        Each chunk is cast to float32 on its own and its features written in place, so no
        float32 copy of all inputs and no second [M, D] array is made.
        """
        inputs = self.inputs
        variable = self.features.value  # the tf.Variable (or distributed variable) behind it
        for start in range(0, self.size, batch_size):
            chunk = tf.cast(tf.constant(inputs[start:start + batch_size]), tf.float32)
            features = tf.cast(feature_fn(chunk), tf.float32)
            rows = tf.range(start, start + int(features.shape[0]))
            variable.scatter_update(tf.IndexedSlices(features, rows))

    def label_rows(self) -> tf.Tensor:
        """[M, L] float32 partial label rows."""
        return tf.cast(self.labels, tf.float32)

    def features_value(self) -> tf.Tensor:
        """The cached features [M, D] as a tensor, read without a copy (see `read_no_copy`)."""
        return read_no_copy(self.features)

    def labels_value(self) -> tf.Tensor:
        """The label rows [M, L] int8 as a tensor, read without a copy (see `read_no_copy`)."""
        return read_no_copy(self.labels)

    def exclusion_mask(self, query_ids: tf.Tensor) -> tf.Tensor:
        """[B, M] bool: True where the atom is the query image itself (it may not explain itself)."""
        return tf.equal(tf.cast(query_ids, tf.int64)[:, None], self.ids[None, :])

    def call(self, indices):
        """Gathers the inputs of the given atoms from host memory (to re-run neighbours)."""
        host = self._host

        def gather(rows):
            if host.array is None:
                raise ValueError("DictionaryBank: the bank's inputs are not in memory (see "
                                 "DictionaryBank.inputs); forward-mode neighbours need them.")
            return host.array[rows]

        _ = self.inputs  # a clear error now rather than from inside the graph
        gathered = tf.numpy_function(gather, [indices], tf.as_dtype(self.inputs_dtype),
                                     stateful=True)
        return tf.ensure_shape(gathered, indices.shape.concatenate(self.input_shape_))

    def get_config(self):
        config = super().get_config()
        config.update(size=self.size, input_shape_=list(self.input_shape_),
                      inputs_dtype=self.inputs_dtype, feature_dim=self.feature_dim,
                      num_classes=self.num_classes)
        return config


def read_no_copy(variable) -> tf.Tensor:
    """The value of a (Keras or TensorFlow) variable, sharing the variable's buffer.

    A TensorFlow variable that a sparse op has touched (scatter_update, as `refresh` writes the
    features, or a gather from the variable itself) is in copy-on-read mode: every later dense
    read copies it whole ([M, D] float32 is 0.4 GB at 50,000 x 2,048). This read switches the
    mode off first, so it returns the buffer itself; a later sparse write still copies the buffer
    first if a read of it is alive (TensorFlow's copy-on-write), so the values read never change.
    Gather rows from the tensor this returns, not from the variable: a gather from the variable
    switches copy-on-read on again. Distributed variables are read the ordinary way.
    """
    value = variable.value if isinstance(variable, keras.Variable) else variable  # tf.Variable
    reader = getattr(value, "read_value_no_copy", None)
    if reader is None or isinstance(value, tf.distribute.DistributedValues):
        return tf.convert_to_tensor(value)
    return reader()


class _HostInputs:
    """Holds the bank's host array outside Keras' and tf.train's tracking."""

    def __init__(self):
        self.array = None

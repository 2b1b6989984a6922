"""The dictionary bank: the N_S training images IMCL reconstructs each minibatch image from.

The bank holds, for M chosen training images, their network inputs (uint8 images or float
embeddings), their cached features, their PARTIAL label rows and their id hashes
(docs/method.md §3).
Everything lives in non-trainable Keras weights, so it saves and restores with the model. Cached
features are refreshed with the current network every `refresh_every` steps; label states of the
atoms are recomputed from the cached features with the current classifier and graph at every step.
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
    """Non-trainable storage of the M dictionary images (inputs, features, labels, id hashes).

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
        self.inputs = self.add_weight(shape=(self.size,) + self.input_shape_, dtype=inputs_dtype,
                                      initializer="zeros", trainable=False, name="inputs")
        self.features = self.add_weight(shape=(self.size, self.feature_dim), dtype="float32",
                                        initializer="zeros", trainable=False, name="features")
        # Partial label rows in {+1, -1, 0}; int8 keeps a 50,000 x 5,000 bank at 250 MB.
        self.labels = self.add_weight(shape=(self.size, self.num_classes), dtype="int8",
                                      initializer="zeros", trainable=False, name="labels")
        self.ids = self.add_weight(shape=(self.size,), dtype="int64", initializer="zeros",
                                   trainable=False, name="ids")
        self.filled = self.add_weight(shape=(), dtype="bool", initializer="zeros", trainable=False,
                                      name="filled")

    def set_contents(self, inputs: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
        """Fills the bank with the chosen training images; features are set by `refresh`."""
        inputs = np.asarray(inputs)
        labels = np.asarray(labels)
        ids = np.asarray(ids)
        expected = (self.size,) + self.input_shape_
        if inputs.shape != expected:
            raise ValueError(f"DictionaryBank.set_contents: inputs must have shape {expected}, "
                             f"received {inputs.shape}.")
        if labels.shape != (self.size, self.num_classes):
            raise ValueError(f"DictionaryBank.set_contents: labels must have shape "
                             f"{(self.size, self.num_classes)}, received {labels.shape}.")
        if ids.shape != (self.size,):
            raise ValueError(f"DictionaryBank.set_contents: ids must have shape {(self.size,)}, "
                             f"received {ids.shape}.")
        if not np.isin(labels, (-1, 0, 1)).all():
            raise ValueError("DictionaryBank.set_contents: label values must be in {-1, 0, 1}, "
                             f"received values {np.unique(labels)[:10]}.")
        if self.inputs_dtype == "uint8":
            if inputs.min() < 0 or inputs.max() > 255:
                raise ValueError("DictionaryBank.set_contents: image inputs must be in 0..255, "
                                 f"received range [{inputs.min()}, {inputs.max()}].")
            inputs = np.round(inputs)
        elif not np.isfinite(inputs).all():
            raise ValueError("DictionaryBank.set_contents: inputs contain NaN or inf.")
        self.inputs.assign(inputs.astype(self.inputs_dtype))
        self.labels.assign(labels.astype(np.int8))
        self.ids.assign(ids.astype(np.int64))
        self.filled.assign(True)

    def refresh(self, feature_fn, batch_size: int = 128) -> None:
        """Recomputes the cached features with `feature_fn(inputs float32) -> [n, D]`, in chunks."""
        chunks = []
        for start in range(0, self.size, batch_size):
            chunk = tf.cast(self.inputs[start:start + batch_size], tf.float32)
            chunks.append(tf.cast(feature_fn(chunk), tf.float32))
        self.features.assign(tf.concat(chunks, axis=0))

    def label_rows(self) -> tf.Tensor:
        """[M, L] float32 partial label rows."""
        return tf.cast(self.labels, tf.float32)

    def exclusion_mask(self, query_ids: tf.Tensor) -> tf.Tensor:
        """[B, M] bool: True where the atom is the query image itself (it may not explain itself)."""
        return tf.equal(tf.cast(query_ids, tf.int64)[:, None], self.ids[None, :])

    def call(self, indices):
        """Gathers the inputs of the given atoms (used to re-run neighbours through the network)."""
        return tf.gather(self.inputs, indices)

    def get_config(self):
        config = super().get_config()
        config.update(size=self.size, input_shape_=list(self.input_shape_),
                      inputs_dtype=self.inputs_dtype, feature_dim=self.feature_dim,
                      num_classes=self.num_classes)
        return config

"""A model's sigmoid scores on a finite (inputs, labels, ids) dataset, with the label rows."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def predict_scores(model, dataset, predict=None) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores [N, L] and label rows [N, L] of a finite (inputs, labels, ids) dataset."""
    if predict is None:
        predict = tf.function(lambda x: tf.sigmoid(model(x, training=False)),
                              reduce_retracing=True)
    scores, labels = [], []
    for inputs, batch_labels, _ in dataset:
        scores.append(predict(inputs).numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(scores), np.concatenate(labels)

"""One validation pass: sigmoid scores, label rows, the validation losses and the first images.

The losses are the training loss's parts measured on the validation split in inference mode:
the masked BCE over every known entry of the split (the official reduction: sum over known
entries / their number, over the whole split rather than a mean of batch means) and the
method's own validation losses (`Method.validation_terms`, e.g. IMCL's L_y and L_f of each
validation image against the training bank; means over images), whatever each method's `validation_terms` measures. Scores and losses
come from the same forward pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from imcl_tf import losses
from imcl_tf.methods.base import Batch


class ValidationPass:
    """Callable on a finite (inputs, labels, ids) dataset; traced once per model.

    Args:
      model: an IMCLModel.
      num_images: how many of the first inputs to keep (image mode; 0 keeps none).
    """

    def __init__(self, model, num_images: int = 0):
        self.model = model
        self.num_images = num_images
        self._step = tf.function(self._batch, reduce_retracing=True)

    def _batch(self, inputs, labels, ids):
        model = self.model
        labels = tf.cast(labels, tf.float32)
        features = model.extract_features(inputs, training=False)  # [B, D]
        # model(inputs) exactly, with the features kept for the method's validation losses.
        logits = model.method.logits(model, features, training=False, output=model.output_name)
        per_entry, known = losses.masked_bce_per_entry(labels, logits)
        out = {"scores": tf.sigmoid(logits), "bce_sum": tf.reduce_sum(per_entry),
               "known": tf.reduce_sum(known)}
        batch = Batch(inputs=inputs, labels=labels, ids=ids, features=features)
        for name, value in model.method.validation_terms(model, batch).items():
            out[f"{name}_sum"] = value
        return out

    def __call__(self, dataset) -> dict[str, Any]:
        """{"scores" [N, L], "labels" [N, L], "losses" {name: float}, "images" [n, ...] or None}."""
        scores, labels, images = [], [], []
        sums: dict[str, float] = {}
        kept = 0
        for inputs, batch_labels, ids in dataset:
            out = self._step(inputs, batch_labels, ids)
            scores.append(out.pop("scores").numpy())
            labels.append(batch_labels.numpy())
            for key, value in out.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            if kept < self.num_images:
                images.append(inputs[: self.num_images - kept].numpy())
                kept += images[-1].shape[0]
        scores, labels = np.concatenate(scores), np.concatenate(labels)
        result_losses = {"bce": sums["bce_sum"] / sums["known"] if sums["known"] else 0.0}
        for key, value in sums.items():  # the method's validation losses: means over images
            if key.endswith("_sum") and key != "bce_sum":
                result_losses[key[:-len("_sum")]] = value / len(scores)
        return {"scores": scores, "labels": labels, "losses": result_losses,
                "images": np.concatenate(images) if images else None}

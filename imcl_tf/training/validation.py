"""One validation pass: sigmoid scores, label rows, the validation losses and the first images.

The losses are the training loss's parts measured on the validation split in inference mode:
the masked BCE over every known entry of the split (the official reduction: sum over known
entries / their number, over the whole split rather than a mean of batch means) and, for IMCL,
the smoothness losses L_y and L_f of each validation image against the training dictionary bank
(mean over images). Scores and losses come from the same forward pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from imcl_tf import losses


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
        logits = model.head(features)  # [B, L]: model(inputs) exactly, features kept
        per_entry, known = losses.masked_bce_per_entry(labels, logits)
        out = {"scores": tf.sigmoid(logits), "bce_sum": tf.reduce_sum(per_entry),
               "known": tf.reduce_sum(known)}
        if model.method == "imcl":
            terms = model._smoothness_terms(inputs, features, logits, labels, ids, False,
                                            model.lambda_y, model.lambda_f)
            batch = tf.cast(tf.shape(logits)[0], tf.float32)
            out["loss_y_sum"] = terms["loss_y"] * batch
            out["loss_f_sum"] = terms["loss_f"] * batch
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
        for name in ("loss_y", "loss_f"):
            if f"{name}_sum" in sums:
                result_losses[name] = sums[f"{name}_sum"] / len(scores)
        return {"scores": scores, "labels": labels, "losses": result_losses,
                "images": np.concatenate(images) if images else None}

"""TensorBoard summaries beyond scalars written during training (PR curves)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def write_pr_curves(scores, labels, class_names, step, max_classes=10, num_thresholds=51):
    """PR curves of the first classes (known entries only) for TensorBoard's PR-curve plugin.

    At threshold t an entry is predicted positive when its score >= t; thresholds are
    linspace(0, 1, num_thresholds). Writes to the default summary writer.
    """
    from tensorboard.plugins.pr_curve import summary as pr_summary
    thresholds = np.linspace(0.0, 1.0, num_thresholds)
    for index in range(min(max_classes, scores.shape[1])):
        known = labels[:, index] != 0
        positive = labels[known, index] > 0
        class_scores = scores[known, index]
        predicted = class_scores[None, :] >= thresholds[:, None]  # [T, n]
        tp = (predicted & positive[None]).sum(1).astype(np.float64)
        fp = (predicted & ~positive[None]).sum(1).astype(np.float64)
        fn = positive.sum() - tp
        tn = (~positive).sum() - fp
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        proto = pr_summary.raw_data_pb(
            name=f"pr_curve/{index:03d}_{class_names[index]}", true_positive_counts=tp,
            false_positive_counts=fp, true_negative_counts=tn, false_negative_counts=fn,
            precision=precision, recall=recall, num_thresholds=num_thresholds)
        tf.summary.experimental.write_raw_pb(proto.SerializeToString(), step=step)

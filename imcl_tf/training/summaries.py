"""TensorBoard summaries beyond scalars: PR curves, the per-class AP table, images and heat map.

Each writer writes to the default summary writer at the step given; the pictures are drawn by
`imcl_tf.training.figures`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from imcl_tf.training import figures
from imcl_tf.training.class_choice import most_frequent

# Validation images in the prediction grid (image mode).
PREDICTION_GRID_IMAGES = 8
# The per-class AP table lists every class up to this many; beyond, the best and the worst half.
AP_TABLE_ROWS = 200
# The label-graph heat map shows every label up to this many; beyond, the most frequent ones.
HEATMAP_LABELS = 200


def write_pr_curves(scores, labels, class_names, step, classes=None, num_thresholds=51):
    """PR curves of the given classes (known entries only) for TensorBoard's PR-curve plugin.

    At threshold t an entry is predicted positive when its score >= t; thresholds are
    linspace(0, 1, num_thresholds). `classes`: class indices (None: the first ten). Tags are
    pr_curve/<index>_<name>, the index zero-padded so that TensorBoard sorts them by index.
    """
    from tensorboard.plugins.pr_curve import summary as pr_summary
    if classes is None:
        classes = range(min(10, scores.shape[1]))
    width = max(3, len(str(scores.shape[1] - 1)))
    thresholds = np.linspace(0.0, 1.0, num_thresholds)
    for index in classes:
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
            name=f"pr_curve/{index:0{width}d}_{class_names[index]}", true_positive_counts=tp,
            false_positive_counts=fp, true_negative_counts=tn, false_negative_counts=fn,
            precision=precision, recall=recall, num_thresholds=num_thresholds)
        tf.summary.experimental.write_raw_pb(proto.SerializeToString(), step=step)


def ap_table_markdown(per_class_ap, labels, class_names: Sequence[str], train_positives,
                      control_ap=None, max_rows: int = AP_TABLE_ROWS) -> str:
    """A markdown table of the per-class AP, best first; classes without an AP at the end.

    Columns: rank, class, index, AP, the validation split's known positives, the training
    split's known positives and, with `control_ap`, the control's AP and the difference. Above
    `max_rows` classes only the best and worst max_rows / 2 are listed, with a line saying so.
    """
    per_class_ap = np.asarray(per_class_ap, np.float64)
    finite = np.isfinite(per_class_ap)
    # Best first (ties: lower index), then the classes without an AP in index order.
    order = np.lexsort((np.arange(per_class_ap.size), np.where(finite, -per_class_ap, np.inf)))
    val_positives = (np.asarray(labels) > 0).sum(0)
    header = ["rank", "class", "index", "AP", "val positives", "train positives"]
    if control_ap is not None:
        header += ["control AP", "AP - control"]
    title = f"Per-class AP on the validation split, best first: {int(finite.sum())} classes"
    if finite.any():
        title += f", mean {per_class_ap[finite].mean():.4f}"
    if not finite.all():
        title += (f"; {int((~finite).sum())} without a known positive and a known negative have "
                  "no AP and come last")
    lines = [title + ".", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    shown = np.arange(order.size)
    if order.size > max_rows:
        half = max_rows // 2
        shown = np.concatenate([shown[:half], shown[-half:]])
    previous = -1
    for rank in shown:
        if rank != previous + 1:
            lines.append(f"| ... | {rank - previous - 1} classes not shown | | | | |"
                         + (" | |" if control_ap is not None else ""))
        previous = rank
        index = int(order[rank])
        row = [str(rank + 1), _markdown_cell(class_names[index]), str(index),
               _ap_cell(per_class_ap[index]), str(int(val_positives[index])),
               str(int(train_positives[index]))]
        if control_ap is not None:
            delta = per_class_ap[index] - control_ap[index]
            row += [_ap_cell(control_ap[index]),
                    f"{delta:+.4f}" if np.isfinite(delta) else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_ap_table(markdown: str, step: int) -> None:
    tf.summary.text("metrics/per_class_ap_table", markdown, step=step)


def write_label_graph(graph_layer, class_names: Sequence[str], train_positives, step: int,
                      limit: int = HEATMAP_LABELS) -> None:
    """The label graph as a heat map image (with its change since the start when it learns).

    Up to `limit` labels are shown (all of them, or the `limit` most frequent in training), read
    through LabelGraph.dense_block, which never builds the whole [L, L] matrix.
    """
    classes = most_frequent(train_positives, limit)
    current = graph_layer.dense_block(classes)
    initial = graph_layer.dense_block(classes, initial=True) if graph_layer.learnable else None
    if classes.size == len(class_names):
        note = f"all {classes.size} labels"
    else:
        note = (f"the {classes.size} most frequent of {len(class_names)} labels (by known "
                "training positives), in index order")
    note += "; entry [l, j]: weight of label l in the propagated state of label j"
    picture = figures.label_graph_heatmap(current, initial, [class_names[c] for c in classes],
                                          note)
    tf.summary.image("label_graph/heat_map", picture[None], step=step, max_outputs=1)


def write_prediction_grid(images, labels, scores, class_names: Sequence[str], step: int) -> None:
    """The first validation images with their known positives and predicted labels."""
    count = min(len(images), PREDICTION_GRID_IMAGES)
    picture = figures.prediction_grid(images[:count], labels[:count], scores[:count],
                                      class_names)
    tf.summary.image("examples/validation_predictions", picture[None], step=step, max_outputs=1)


def _markdown_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _ap_cell(value: float) -> str:
    return f"{value:.4f}" if np.isfinite(value) else "-"

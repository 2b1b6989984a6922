"""Evaluation metrics on partially labelled data (NumPy): AP, mAP conventions, PRF, frequency groups.

Label arrays use the dataset convention: +1 known present, -1 known absent, 0 unknown. Unknown
entries never count, neither as positives nor as negatives (docs/method.md §4).

mAP conventions (`map_metrics`):
  mAP                 mean AP over the classes with >= 1 known positive and >= 1 known negative.
  mAP_all_classes     the official code's convention: mean over ALL L classes of sklearn's AP on
                      the known entries, with AP := 0 for classes without a known positive; a class
                      with known positives but no known negative gets AP = 1 (what sklearn returns:
                      precision is 1 at every threshold).
  mAP_label_weighted  the official "weighted mAP": the mAP_all_classes APs averaged with weights
                      = number of known labels of each class.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Sequence

import numpy as np


# ---- Average precision -------------------------------------------------------------------------


def average_precision(scores, labels) -> float:
    """Non-interpolated AP of one class over its known entries, as sklearn's average_precision_score.

    AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds in decreasing order; tied
    scores form one threshold, so the result does not depend on the order of tied entries.

    Args:
      scores: [N] scores (higher = more likely present; logits or probabilities).
      labels: [N] in {+1, -1, 0}; entries with 0 are left out.

    Returns:
      AP in [0, 1], or NaN when the kept entries have no positive or no negative.
    """
    scores, labels = _checked_column("average_precision", scores, labels)
    kept_scores, positive = _known_entries(scores, labels)
    if not positive.any() or positive.all():
        return float("nan")
    precision, recall = _precision_recall_at_thresholds(kept_scores, positive)
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def per_class_ap(scores, labels) -> np.ndarray:
    """`average_precision` of every class, float64 [L] (NaN for classes without both kinds).

    Args:
      scores: [N, L]; labels: [N, L] in {+1, -1, 0}.
    """
    scores, labels = _checked_matrix("per_class_ap", scores, labels)
    ap = np.full([scores.shape[1]], np.nan)
    for label_index in range(scores.shape[1]):
        column = labels[:, label_index]
        known = column != 0
        positive = column[known] > 0
        if positive.any() and not positive.all():
            precision, recall = _precision_recall_at_thresholds(scores[known, label_index],
                                                                positive)
            ap[label_index] = np.sum(np.diff(recall, prepend=0.0) * precision)
    return ap


def voc_interpolated_ap(scores, labels, mode: str = "all_point") -> float:
    """Interpolated (VOC-style) AP of one class over its known entries.

    The precision envelope p_interp(r) = max_{r' >= r} P(r') is integrated either over every recall
    change ("all_point", the `voc_ap` of the Fang et al. / Misra et al. COCO-1k evaluation that the
    official code also logs) or sampled at r = 0, 0.1, ..., 1 and averaged ("11_point", VOC2007).
    Tied scores form one threshold (the original code ranks tied entries in argsort order, so it
    may differ slightly on ties).

    Returns:
      AP in [0, 1], or NaN when the kept entries have no positive or no negative.
    """
    if mode not in ("all_point", "11_point"):
        raise ValueError(f"voc_interpolated_ap: mode must be 'all_point' or '11_point'. "
                         f"Received: mode={mode!r}.")
    scores, labels = _checked_column("voc_interpolated_ap", scores, labels)
    kept_scores, positive = _known_entries(scores, labels)
    if not positive.any() or positive.all():
        return float("nan")
    precision, recall = _precision_recall_at_thresholds(kept_scores, positive)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # max precision at recall >= r
    if mode == "all_point":
        return float(np.sum(np.diff(recall, prepend=0.0) * envelope))
    samples = []
    for level in np.linspace(0.0, 1.0, 11):
        reached = recall >= level - 1e-12
        samples.append(envelope[reached].max() if reached.any() else 0.0)
    return float(np.mean(samples))


def map_metrics(scores, labels, ap=None) -> dict[str, float]:
    """The three mAP conventions (module docstring) and the number of valid classes.

    Args:
      scores: [N, L]; labels: [N, L] in {+1, -1, 0}.
      ap: optional precomputed `per_class_ap(scores, labels)` to avoid computing it twice.

    Returns:
      {"mAP", "mAP_all_classes", "mAP_label_weighted", "num_valid_classes", "num_classes"};
      mAP is NaN when no class is valid.
    """
    scores, labels = _checked_matrix("map_metrics", scores, labels)
    if ap is None:
        ap = per_class_ap(scores, labels)
    ap = np.asarray(ap, dtype=np.float64)
    if ap.shape != (labels.shape[1],):
        raise ValueError(f"map_metrics: ap must be [L] = [{labels.shape[1]}]. "
                         f"Received: shape {ap.shape}.")
    num_positive = np.sum(labels > 0, axis=0)  # [L]
    num_negative = np.sum(labels < 0, axis=0)  # [L]
    valid = (num_positive > 0) & (num_negative > 0)
    official = np.where(valid, ap, np.where(num_positive > 0, 1.0, 0.0))  # [L]
    weights = (num_positive + num_negative).astype(np.float64)  # known labels per class
    return {
        "mAP": float(np.mean(ap[valid])) if valid.any() else float("nan"),
        "mAP_all_classes": float(np.mean(official)),
        "mAP_label_weighted": (float(np.sum(weights * official) / weights.sum())
                               if weights.sum() > 0 else float("nan")),
        "num_valid_classes": int(valid.sum()),
        "num_classes": int(labels.shape[1]),
    }


# ---- Precision / recall / F1 at a decision rule ------------------------------------------------


def prf_metrics(scores, labels, threshold: float = 0.5, top_k: int | None = None) -> dict[str, float]:
    """Per-class (CP, CR, CF1) and overall (OP, OR, OF1) precision, recall and F1 on known entries.

    Predictions: score >= threshold (pass probabilities for 0.5, or logits with threshold 0), or,
    when top_k is given, the top_k scores of every image (ties to the lower class index; the
    threshold is then ignored). Only known entries are scored: a predicted unknown entry is neither
    a true nor a false positive.

    CP and CR average the per-class precision and recall over the classes with >= 1 known positive
    (recall is undefined for the others); a class without any predicted known entry has precision
    0. CF1 = 2 CP CR / (CP + CR). OP, OR, OF1 use the counts summed over all classes. Every value is
    0 when its denominator is 0.

    Returns:
      {"CP", "CR", "CF1", "OP", "OR", "OF1", "num_classes_evaluated"}.
    """
    scores, labels = _checked_matrix("prf_metrics", scores, labels)
    if top_k is not None:
        if not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= scores.shape[1]:
            raise ValueError(f"prf_metrics: top_k must be an integer in [1, L={scores.shape[1]}] "
                             f"or None. Received: top_k={top_k!r}.")
        top = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]  # [N, top_k]
        predicted = np.zeros(scores.shape, bool)
        np.put_along_axis(predicted, top, True, axis=1)
    else:
        predicted = scores >= threshold
    positive, negative = labels > 0, labels < 0
    true_positives = np.sum(predicted & positive, axis=0).astype(np.float64)  # [L]
    false_positives = np.sum(predicted & negative, axis=0).astype(np.float64)  # [L]
    false_negatives = np.sum(~predicted & positive, axis=0).astype(np.float64)  # [L]
    evaluated = (true_positives + false_negatives) > 0  # classes with a known positive
    class_precision = _safe_divide(true_positives, true_positives + false_positives)
    class_recall = _safe_divide(true_positives, true_positives + false_negatives)
    cp = float(class_precision[evaluated].mean()) if evaluated.any() else 0.0
    cr = float(class_recall[evaluated].mean()) if evaluated.any() else 0.0
    tp, fp, fn = true_positives.sum(), false_positives.sum(), false_negatives.sum()
    op = float(_safe_divide(tp, tp + fp))
    overall_recall = float(_safe_divide(tp, tp + fn))
    return {"CP": cp, "CR": cr, "CF1": _f1(cp, cr), "OP": op, "OR": overall_recall,
            "OF1": _f1(op, overall_recall), "num_classes_evaluated": int(evaluated.sum())}


# ---- Frequency groups (supplement Fig. 1 left) -------------------------------------------------


@dataclasses.dataclass
class FrequencyGroup:
    """One group of classes of similar training frequency; ranks count from the rarest class."""
    group: int  # 0-based, rarest first
    rank_start: int  # position of the group's first class in the ascending-count order
    rank_stop: int  # one past its last class
    class_indices: np.ndarray  # [n] int64, in ascending-count order
    min_count: int
    max_count: int
    total_count: int  # sum of the training annotation counts of its classes
    num_images: int | None  # training images with a known positive of one of its classes
    mean_ap_method: float  # over the classes whose AP is finite for both methods
    mean_ap_baseline: float
    mean_delta: float  # mean_ap_method - mean_ap_baseline
    num_valid_classes: int

    def to_dict(self) -> dict:
        """JSON-ready dict (class_indices as a list)."""
        values = dataclasses.asdict(self)
        values["class_indices"] = self.class_indices.tolist()
        return values


def frequency_groups(train_positive_counts, ap_method, ap_baseline, num_groups: int,
                     train_label_rows=None) -> list[FrequencyGroup]:
    """Cuts the classes, sorted by training annotation count, into num_groups equal-size groups.

    Classes are sorted by ascending count (ties to the lower class index) and split with
    numpy.array_split, so group sizes differ by at most one (the first groups are the larger).
    Means ignore classes whose AP is NaN for either method, so mean_delta is exactly
    mean_ap_method - mean_ap_baseline over the same classes.

    Args:
      train_positive_counts: [L] annotations per class in the training split (by default known
        positives; any per-class count works, e.g. all known labels).
      ap_method, ap_baseline: [L] per-class AP of the method and of the baseline.
      num_groups: number of groups (5 in the main paper, 10 in the supplement).
      train_label_rows: optional [N, L] training label rows ({+1, -1, 0} or bool positives) to count
        the images with a known positive of each group.
    """
    counts = np.asarray(train_positive_counts)
    ap_method = np.asarray(ap_method, dtype=np.float64)
    ap_baseline = np.asarray(ap_baseline, dtype=np.float64)
    if counts.ndim != 1 or ap_method.shape != counts.shape or ap_baseline.shape != counts.shape:
        raise ValueError(f"frequency_groups: train_positive_counts, ap_method and ap_baseline must "
                         f"all be [L]. Received shapes {counts.shape}, {ap_method.shape}, "
                         f"{ap_baseline.shape}.")
    if not isinstance(num_groups, (int, np.integer)) or not 1 <= num_groups <= counts.size:
        raise ValueError(f"frequency_groups: num_groups must be an integer in [1, L={counts.size}]."
                         f" Received: num_groups={num_groups!r}.")
    positives = None
    if train_label_rows is not None:
        rows = np.asarray(train_label_rows)
        if rows.ndim != 2 or rows.shape[1] != counts.size:
            raise ValueError(f"frequency_groups: train_label_rows must be [N, L={counts.size}]. "
                             f"Received: shape {rows.shape}.")
        positives = rows > 0  # [N, L]
    order = np.argsort(counts, kind="stable")
    groups = []
    rank_start = 0
    for group_index, members in enumerate(np.array_split(order, num_groups)):
        both = np.isfinite(ap_method[members]) & np.isfinite(ap_baseline[members])
        method_mean = float(ap_method[members][both].mean()) if both.any() else float("nan")
        baseline_mean = float(ap_baseline[members][both].mean()) if both.any() else float("nan")
        groups.append(FrequencyGroup(
            group=group_index, rank_start=rank_start, rank_stop=rank_start + members.size,
            class_indices=members.astype(np.int64),
            min_count=int(counts[members].min()), max_count=int(counts[members].max()),
            total_count=int(counts[members].sum()),
            num_images=(int(positives[:, members].any(axis=1).sum())
                        if positives is not None else None),
            mean_ap_method=method_mean, mean_ap_baseline=baseline_mean,
            mean_delta=method_mean - baseline_mean, num_valid_classes=int(both.sum())))
        rank_start += members.size
    return groups


# How charts name the methods of imcl_tf.models.METHODS.
METHOD_DISPLAY_NAMES = {"imcl": "IMCL", "logistic": "Logistic"}


def comparison_names(method: str, baseline_method: str) -> tuple[str, str]:
    """Chart names of a run's method and of the run it is compared with (the control).

    The real methods, e.g. ("IMCL", "Logistic"); when both runs used the same method the second
    is called "<method> (control)", so a logistic run is never drawn as "IMCL - Logistic".
    """
    name = METHOD_DISPLAY_NAMES.get(method, method or "model")
    other = METHOD_DISPLAY_NAMES.get(baseline_method, baseline_method or "baseline")
    return (name, f"{other} (control)") if other == name else (name, other)


def plot_frequency_groups(groups: Sequence[FrequencyGroup], path: str, method_name: str = "IMCL",
                          baseline_name: str = "Logistic") -> str:
    """Writes a PNG: bars of the mean AP gain per group (in AP points) and, on a second axis, the
    training images per group (annotations when image counts are absent). Returns the path.

    The title and axis name both methods (`comparison_names` makes the names). The file is
    written under a temporary name and renamed into place.
    """
    if not groups:
        raise ValueError("plot_frequency_groups: no groups to plot.")
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # Agg: no display needed
    from matplotlib.figure import Figure

    positions = np.arange(len(groups))
    gains = [100.0 * g.mean_delta for g in groups]
    use_images = all(g.num_images is not None for g in groups)
    volumes = [g.num_images if use_images else g.total_count for g in groups]

    figure = Figure(figsize=(max(6.0, 0.6 * len(groups) + 2.0), 4.0))
    FigureCanvasAgg(figure)
    axis = figure.add_subplot(1, 1, 1)
    colors = ["tab:green" if gain >= 0 else "tab:red" for gain in gains]
    axis.bar(positions, np.nan_to_num(gains), color=colors, width=0.7)
    axis.axhline(0.0, color="black", linewidth=0.8)
    axis.set_title(f"{method_name} against {baseline_name}: mean AP gain per class-frequency "
                   "group", fontsize=10)
    axis.set_xlabel("class group (ascending training annotations per class)")
    axis.set_ylabel(f"mean AP gain, {method_name} - {baseline_name} (points)")
    axis.set_xticks(positions)
    axis.set_xticklabels([f"{g.group + 1}\n{g.min_count}-{g.max_count}" for g in groups],
                         fontsize=7)
    second = axis.twinx()
    second.plot(positions, volumes, color="tab:blue", marker="o")
    second.set_ylim(bottom=0)
    second.set_ylabel("training images" if use_images else "training annotations",
                      color="tab:blue")
    figure.tight_layout()

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".png", dir=directory)
    os.close(handle)
    try:
        figure.savefig(temporary, format="png", dpi=120)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


# ---- Helpers -----------------------------------------------------------------------------------


def _precision_recall_at_thresholds(scores, positive):
    """Precision and recall at every distinct score, thresholds in decreasing order.

    scores [n] float, positive [n] bool with at least one True. Returns two [T] float64 arrays.
    """
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    sorted_positive = positive[order]
    # Last index of every run of equal scores: a threshold admits the whole tie at once.
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_positives = np.cumsum(sorted_positive, dtype=np.float64)[last_of_tie]
    admitted = last_of_tie + 1.0
    return true_positives / admitted, true_positives / true_positives[-1]


def _known_entries(scores, labels):
    known = labels != 0
    return scores[known], labels[known] > 0


def _checked_column(where, scores, labels):
    return _checked(where, scores, labels, 1, "1-D of the same length")


def _checked_matrix(where, scores, labels):
    return _checked(where, scores, labels, 2, "[N, L] of the same shape")


def _checked(where, scores, labels, ndim, shape_text):
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != ndim or scores.shape != labels.shape:
        raise ValueError(f"{where}: scores and labels must be {shape_text}. "
                         f"Received: scores.shape={scores.shape}, labels.shape={labels.shape}.")
    _check_values(where, scores, labels)
    return scores, labels


def _check_values(where, scores, labels):
    if not np.all(np.isin(labels, (-1, 0, 1))):
        bad = np.unique(labels[~np.isin(labels, (-1, 0, 1))])[:5]
        raise ValueError(f"{where}: labels must contain only +1 (present), -1 (absent) and 0 "
                         f"(unknown). Received other values, e.g. {bad.tolist()}.")
    if not np.all(np.isfinite(scores)):
        bad = np.argwhere(~np.isfinite(scores))[:3].tolist()
        raise ValueError(f"{where}: scores must be finite; NaN or inf at {bad} (check the model "
                         "outputs, e.g. a diverged training run).")


def _safe_divide(numerator, denominator):
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator),
                     where=denominator > 0)


def _f1(precision, recall):
    return 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)

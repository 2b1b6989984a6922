"""Tests of imcl_tf.metrics against plain loop references written here (sklearn is not installed)."""

import math

import numpy as np
import pytest

from imcl_tf import metrics


def random_partial_labels(rng, shape, known_ratio=0.6):
    known = rng.random(shape) < known_ratio
    return (known * np.where(rng.random(shape) < 0.35, 1, -1)).astype(np.float32)


def tied_scores(rng, shape, levels=4):
    """Scores drawn from a few values so that ties are frequent."""
    return rng.integers(0, levels, size=shape).astype(np.float32) / levels


# ---- references --------------------------------------------------------------------------------


def reference_ap(scores, labels):
    """sklearn's average_precision_score on the known entries, as a loop over distinct thresholds."""
    kept = [(s, l > 0) for s, l in zip(scores, labels) if l != 0]
    num_positive = sum(1 for _, positive in kept if positive)
    if num_positive == 0 or num_positive == len(kept):
        return math.nan
    ap, previous_recall = 0.0, 0.0
    for threshold in sorted({s for s, _ in kept}, reverse=True):
        predicted = [positive for s, positive in kept if s >= threshold]
        true_positives = sum(predicted)
        precision = true_positives / len(predicted)
        recall = true_positives / num_positive
        ap += (recall - previous_recall) * precision
        previous_recall = recall
    return ap


def reference_pr_points(scores, labels):
    kept = [(s, l > 0) for s, l in zip(scores, labels) if l != 0]
    num_positive = sum(1 for _, positive in kept if positive)
    points = []
    for threshold in sorted({s for s, _ in kept}, reverse=True):
        predicted = [positive for s, positive in kept if s >= threshold]
        points.append((sum(predicted) / num_positive, sum(predicted) / len(predicted)))
    return points  # (recall, precision), recall non-decreasing


def reference_voc_all_point(scores, labels):
    """The voc_ap of the Fang et al. evaluation code: envelope, then sum over recall changes."""
    points = reference_pr_points(scores, labels)
    recall = [0.0] + [r for r, _ in points] + [1.0]
    precision = [0.0] + [p for _, p in points] + [0.0]
    for i in range(len(precision) - 2, -1, -1):
        precision[i] = max(precision[i], precision[i + 1])
    return sum((recall[i] - recall[i - 1]) * precision[i] for i in range(1, len(recall))
               if recall[i] != recall[i - 1])


def reference_voc_11_point(scores, labels):
    points = reference_pr_points(scores, labels)
    total = 0.0
    for level in [i / 10 for i in range(11)]:
        reachable = [p for r, p in points if r >= level - 1e-12]
        total += max(reachable) if reachable else 0.0
    return total / 11


# ---- average precision -------------------------------------------------------------------------


def test_average_precision_sklearn_documentation_example():
    # sklearn's docstring example: y_true [0, 0, 1, 1], scores [0.1, 0.4, 0.35, 0.8] -> 0.8333...
    ap = metrics.average_precision([0.1, 0.4, 0.35, 0.8], [-1, -1, 1, 1])
    np.testing.assert_allclose(ap, 5.0 / 6.0)


@pytest.mark.parametrize("levels", [3, 10, 1000])
def test_average_precision_matches_loop_reference_with_ties_and_unknowns(rng, levels):
    for _ in range(20):
        labels = random_partial_labels(rng, 40)
        scores = tied_scores(rng, 40, levels)
        expected = reference_ap(scores, labels)
        got = metrics.average_precision(scores, labels)
        if math.isnan(expected):
            assert math.isnan(got)
        else:
            np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_average_precision_ignores_unknown_entries(rng):
    labels = random_partial_labels(rng, 50)
    labels[:2] = [1, -1]
    scores = rng.normal(size=50)
    changed = scores.copy()
    changed[labels == 0] = rng.normal(size=int((labels == 0).sum())) * 100
    assert metrics.average_precision(changed, labels) == metrics.average_precision(scores, labels)
    # Counting unknowns as negatives would give a different value.
    as_negatives = np.where(labels == 0, -1, labels)
    assert metrics.average_precision(scores, as_negatives) != metrics.average_precision(scores,
                                                                                       labels)


def test_average_precision_is_nan_without_positives_or_negatives():
    assert math.isnan(metrics.average_precision([0.1, 0.2, 0.3], [-1, 0, -1]))
    assert math.isnan(metrics.average_precision([0.1, 0.2, 0.3], [1, 1, 0]))
    assert math.isnan(metrics.average_precision([0.1, 0.2], [0, 0]))


def test_average_precision_rejects_bad_input():
    with pytest.raises(ValueError, match="labels must contain only"):
        metrics.average_precision([0.1, 0.2], [1, 2])
    with pytest.raises(ValueError, match="scores must be finite"):
        metrics.average_precision([np.nan, 0.2], [1, -1])
    with pytest.raises(ValueError, match="same length"):
        metrics.average_precision([0.1, 0.2], [1])


def test_per_class_ap_matches_reference(rng):
    labels = random_partial_labels(rng, (30, 8))
    labels[:, 0] = np.minimum(labels[:, 0], 0)  # no known positive
    labels[:, 1] = np.abs(labels[:, 1])  # no known negative
    scores = tied_scores(rng, (30, 8), 5)
    got = metrics.per_class_ap(scores, labels)
    expected = [reference_ap(scores[:, j], labels[:, j]) for j in range(8)]
    np.testing.assert_allclose(got, expected, rtol=1e-12, equal_nan=True)
    assert math.isnan(got[0]) and math.isnan(got[1])


@pytest.mark.parametrize("levels", [4, 1000])
def test_voc_interpolated_ap_matches_references(rng, levels):
    for _ in range(15):
        labels = random_partial_labels(rng, 35)
        labels[:2] = [1, -1]
        scores = tied_scores(rng, 35, levels)
        np.testing.assert_allclose(metrics.voc_interpolated_ap(scores, labels),
                                   reference_voc_all_point(scores, labels), rtol=1e-12)
        np.testing.assert_allclose(metrics.voc_interpolated_ap(scores, labels, mode="11_point"),
                                   reference_voc_11_point(scores, labels), rtol=1e-12)
        # Interpolation never lowers the precision curve.
        assert metrics.voc_interpolated_ap(scores, labels) >= metrics.average_precision(
            scores, labels) - 1e-12
    with pytest.raises(ValueError, match="mode must be"):
        metrics.voc_interpolated_ap([0.1, 0.2], [1, -1], mode="101_point")


# ---- mAP conventions ---------------------------------------------------------------------------


def test_map_metrics_match_loop_reference(rng):
    labels = random_partial_labels(rng, (25, 9))
    labels[:, 2] = np.minimum(labels[:, 2], 0)  # negatives only
    labels[:, 4] = np.abs(labels[:, 4])  # positives only
    labels[:, 6] = 0  # nothing known
    scores = tied_scores(rng, (25, 9), 6)
    result = metrics.map_metrics(scores, labels)

    valid_aps, official, weights = [], [], []
    for j in range(9):
        column = labels[:, j]
        num_positive, num_negative = int((column > 0).sum()), int((column < 0).sum())
        ap = reference_ap(scores[:, j], column)
        if num_positive and num_negative:
            valid_aps.append(ap)
            official.append(ap)
        else:
            official.append(1.0 if num_positive else 0.0)  # sklearn gives 1 without negatives
        weights.append(num_positive + num_negative)
    assert result["num_valid_classes"] == len(valid_aps) == 6
    assert result["num_classes"] == 9
    np.testing.assert_allclose(result["mAP"], np.mean(valid_aps), rtol=1e-12)
    np.testing.assert_allclose(result["mAP_all_classes"], np.mean(official), rtol=1e-12)
    np.testing.assert_allclose(result["mAP_label_weighted"],
                               np.dot(weights, official) / np.sum(weights), rtol=1e-12)
    precomputed = metrics.map_metrics(scores, labels, ap=metrics.per_class_ap(scores, labels))
    assert precomputed == result


def test_map_metrics_without_valid_classes_gives_nan_map():
    result = metrics.map_metrics(np.zeros((3, 2)), np.array([[1, 0], [1, 0], [0, 0]]))
    assert math.isnan(result["mAP"]) and result["num_valid_classes"] == 0
    assert result["mAP_all_classes"] == 0.5  # class 0: positives only -> 1; class 1: nothing -> 0


# ---- precision / recall / F1 -------------------------------------------------------------------


def reference_prf(scores, labels, threshold=0.5, top_k=None):
    num_images, num_labels = scores.shape
    predicted = np.zeros(scores.shape, bool)
    for i in range(num_images):
        if top_k is None:
            predicted[i] = scores[i] >= threshold
        else:
            ranked = sorted(range(num_labels), key=lambda j: (-scores[i, j], j))
            predicted[i, ranked[:top_k]] = True
    precisions, recalls = [], []
    totals = np.zeros(3)
    for j in range(num_labels):
        tp = sum(1 for i in range(num_images) if predicted[i, j] and labels[i, j] == 1)
        fp = sum(1 for i in range(num_images) if predicted[i, j] and labels[i, j] == -1)
        fn = sum(1 for i in range(num_images) if not predicted[i, j] and labels[i, j] == 1)
        totals += (tp, fp, fn)
        if tp + fn > 0:
            precisions.append(tp / (tp + fp) if tp + fp else 0.0)
            recalls.append(tp / (tp + fn))
    cp, cr = np.mean(precisions), np.mean(recalls)
    tp, fp, fn = totals
    op, o_r = tp / (tp + fp), tp / (tp + fn)
    return {"CP": cp, "CR": cr, "CF1": 2 * cp * cr / (cp + cr), "OP": op, "OR": o_r,
            "OF1": 2 * op * o_r / (op + o_r), "num_classes_evaluated": len(precisions)}


@pytest.mark.parametrize("rule", [dict(threshold=0.5), dict(threshold=0.3), dict(top_k=3)])
def test_prf_metrics_match_loop_reference(rng, rule):
    labels = random_partial_labels(rng, (30, 7))
    labels[:, 5] = np.minimum(labels[:, 5], 0)  # no known positive: left out of C*
    scores = tied_scores(rng, (30, 7), 7)
    got = metrics.prf_metrics(scores, labels, **rule)
    expected = reference_prf(scores, labels, **rule)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-12, err_msg=key)


def test_prf_metrics_ignore_predictions_on_unknown_entries(rng):
    labels = random_partial_labels(rng, (20, 5))
    labels[0] = [1, -1, 1, -1, 1]
    scores = rng.random((20, 5))
    changed = np.where(labels == 0, 1.0 - scores, scores)
    assert metrics.prf_metrics(changed, labels) == metrics.prf_metrics(scores, labels)
    with pytest.raises(ValueError, match="top_k must be an integer"):
        metrics.prf_metrics(scores, labels, top_k=6)


# ---- frequency groups --------------------------------------------------------------------------


def test_frequency_groups_match_reference(rng):
    num_labels, num_groups = 23, 5
    counts = rng.integers(0, 50, size=num_labels)
    counts[3] = counts[7]  # a tie, broken by the lower class index
    ap_method = rng.random(num_labels)
    ap_baseline = rng.random(num_labels)
    ap_method[2] = np.nan
    ap_baseline[11] = np.nan
    rows = random_partial_labels(rng, (40, num_labels), known_ratio=0.2)
    groups = metrics.frequency_groups(counts, ap_method, ap_baseline, num_groups,
                                      train_label_rows=rows)

    order = sorted(range(num_labels), key=lambda j: (counts[j], j))
    sizes = [5, 5, 5, 4, 4]  # 23 classes in 5 groups: the first groups take the extra classes
    start = 0
    assert len(groups) == num_groups
    for index, (group, size) in enumerate(zip(groups, sizes)):
        members = order[start:start + size]
        both = [j for j in members if not np.isnan(ap_method[j]) and not np.isnan(ap_baseline[j])]
        assert group.group == index
        assert (group.rank_start, group.rank_stop) == (start, start + size)
        assert group.class_indices.tolist() == members
        assert (group.min_count, group.max_count) == (min(counts[members]), max(counts[members]))
        assert group.total_count == sum(counts[members])
        assert group.num_images == sum(1 for i in range(40) if any(rows[i, j] > 0 for j in members))
        assert group.num_valid_classes == len(both)
        np.testing.assert_allclose(group.mean_ap_method, np.mean(ap_method[both]))
        np.testing.assert_allclose(group.mean_ap_baseline, np.mean(ap_baseline[both]))
        np.testing.assert_allclose(group.mean_delta,
                                   np.mean([ap_method[j] - ap_baseline[j] for j in both]))
        assert group.to_dict()["class_indices"] == members
        start += size


def test_frequency_groups_without_rows_and_bad_input(rng):
    groups = metrics.frequency_groups(np.arange(6), np.ones(6), np.zeros(6), 2)
    assert [g.num_images for g in groups] == [None, None]
    assert [g.mean_delta for g in groups] == [1.0, 1.0]
    with pytest.raises(ValueError, match="num_groups must be an integer"):
        metrics.frequency_groups(np.arange(6), np.ones(6), np.zeros(6), 7)
    with pytest.raises(ValueError, match="must all be \\[L\\]"):
        metrics.frequency_groups(np.arange(6), np.ones(5), np.zeros(6), 2)


def test_plot_frequency_groups_writes_a_png(tmp_path, rng):
    counts = rng.integers(1, 100, size=20)
    rows = random_partial_labels(rng, (30, 20), known_ratio=0.2)
    groups = metrics.frequency_groups(counts, rng.random(20), rng.random(20), 4,
                                      train_label_rows=rows)
    path = tmp_path / "plots" / "frequency_groups.png"
    assert metrics.plot_frequency_groups(groups, str(path)) == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    assert [p.name for p in path.parent.iterdir()] == ["frequency_groups.png"]  # no temporary left
    with pytest.raises(ValueError, match="no groups"):
        metrics.plot_frequency_groups([], str(path))

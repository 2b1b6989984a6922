"""Evaluation application: scores a trained run on one split of a dataset and writes the results.

    imcl-evaluate --model_dir=runs/imcl --data_dir=data/demo --split=test
        [--baseline_model_dir=runs/logistic] [--output_dir=...] [--checkpoint=best]
        [--num_groups=10] [--batch_size=64]

writes into `<model_dir>/eval/<split>` (or --output_dir):
  metrics.json          the three mAP conventions, CP/CR/CF1/OP/OR/OF1 at threshold 0.5 and at
                        top-3, the split's size and known-label ratio, what was evaluated and when;
                        with a baseline also its metrics, the deltas and the frequency groups.
  per_class_ap.csv      one row per class: AP, known positives/negatives in the split, training
                        positives (and the baseline's AP and the gain with a baseline).
  frequency_groups.csv  (baseline only) classes sorted by training positives, cut into equal groups:
  frequency_groups.png  mean AP gain over the baseline and training images per group
                        (docs/method.md §4, supplement Fig. 1 left).
Unknown labels of the split are never counted as negatives (docs/method.md §4). Every file is
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Sequence

import numpy as np
import tensorflow as tf

from imcl_tf import data
from imcl_tf import metrics as metrics_lib
from imcl_tf import models

METRICS_JSON = "metrics.json"
PER_CLASS_AP_CSV = "per_class_ap.csv"
FREQUENCY_GROUPS_CSV = "frequency_groups.csv"
FREQUENCY_GROUPS_PNG = "frequency_groups.png"
THRESHOLD = 0.5  # decision rule of the "@0.5" precision/recall/F1 metrics (on probabilities)
TOP_K = 3  # decision rule of the "@top3" metrics

# The metrics whose difference to the baseline is reported (and printed).
DELTA_KEYS = ("mAP", "mAP_all_classes", "mAP_label_weighted", f"CF1@{THRESHOLD}",
              f"OF1@{THRESHOLD}", f"CF1@top{TOP_K}", f"OF1@top{TOP_K}")


class EvaluationError(ValueError):
    """The model, the dataset or the options do not allow an evaluation; the message says why."""


# ---- Library ----------------------------------------------------------------------------------


def predict_split(model, data_dir: str, split: str, *, batch_size: int = 64,
                  image_size: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Runs `model` over a whole split in dataset order (deterministic, no shuffling).

    Args:
      model: a callable `model(inputs, training=False) -> logits [B, L]` (an IMCLModel).
      data_dir: dataset folder; split: its split name.
      batch_size: images per forward pass.
      image_size: S of the model's input (image datasets); default dataset.json's hint.

    Returns:
      scores float32 [N, L] sigmoid probabilities, labels float32 [N, L] in {+1, -1, 0}, ids int64
      [N] (`imcl_tf.data.id_hash` of image/id), row i of each belonging to the same record.
    """
    num_classes = data.load_dataset_info(data_dir).num_classes
    dataset = data.make_dataset(data_dir, split, batch_size=batch_size, image_size=image_size,
                                training=False, deterministic=True)

    @tf.function(reduce_retracing=True)
    def probabilities(inputs):
        # Logits may be float16 under mixed precision; the sigmoid is taken in float32.
        return tf.sigmoid(tf.cast(model(inputs, training=False), tf.float32))

    scores, labels, ids = [], [], []
    for batch_inputs, batch_labels, batch_ids in dataset:
        batch_scores = probabilities(batch_inputs)  # [B, L]
        if batch_scores.shape[-1] != num_classes:
            raise EvaluationError(
                f"the model outputs {batch_scores.shape[-1]} scores per image but {data_dir} has "
                f"{num_classes} classes; evaluate the model on the dataset it was trained for.")
        scores.append(batch_scores.numpy())
        labels.append(batch_labels.numpy())
        ids.append(batch_ids.numpy())
    if not scores:
        return (np.zeros([0, num_classes], np.float32), np.zeros([0, num_classes], np.float32),
                np.zeros([0], np.int64))
    return np.concatenate(scores), np.concatenate(labels), np.concatenate(ids)


def compute_metrics(scores, labels, ap=None) -> dict[str, Any]:
    """All metrics of one split from its scores and partial labels.

    Args:
      scores: [N, L] probabilities; labels: [N, L] in {+1, -1, 0} (0 = unknown, never a negative).
      ap: optional precomputed `metrics.per_class_ap(scores, labels)`.

    Returns:
      metrics.map_metrics' keys (mAP, mAP_all_classes, mAP_label_weighted, num_valid_classes,
      num_classes), CP/CR/CF1/OP/OR/OF1 at threshold 0.5 ("CP@0.5", ...) and at the top-3 scores of
      every image ("CP@top3", ...; top-L when L < 3), the number of classes those average over
      ("num_classes_evaluated@0.5", ...), num_images and known_ratio (fraction of known entries).
    """
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise EvaluationError(f"compute_metrics: scores and labels must be [N, L] of one shape. "
                              f"Received: scores {scores.shape}, labels {labels.shape}.")
    if scores.shape[0] == 0:
        raise EvaluationError("compute_metrics: the split has no images; nothing to evaluate.")
    result: dict[str, Any] = dict(metrics_lib.map_metrics(scores, labels, ap=ap))
    top_k = min(TOP_K, scores.shape[1])
    for suffix, rule in ((f"@{THRESHOLD}", {"threshold": THRESHOLD}),
                         (f"@top{top_k}", {"top_k": top_k})):
        for name, value in metrics_lib.prf_metrics(scores, labels, **rule).items():
            result[f"{name}{suffix}"] = value
    result["num_images"] = int(scores.shape[0])
    result["known_ratio"] = float(np.mean(labels != 0))
    return result


def training_positive_counts(data_dir: str, split: str = "train") -> np.ndarray:
    """Number of images of `split` with a KNOWN positive, per class: int64 [L].

    Reads only the label lists of the records (no image is decoded).
    """
    info = data.load_dataset_info(data_dir)
    _, classes, _ = _positive_pairs(data_dir, info, split)
    return np.bincount(classes, minlength=info.num_classes).astype(np.int64)


def evaluate_model_dir(model_dir: str, data_dir: str, split: str = "test",
                       output_dir: str | None = None, baseline_model_dir: str | None = None,
                       checkpoint: str = "best", num_groups: int = 10, batch_size: int = 64,
                       train_split: str = "train", output: str | None = None,
                       baseline_name: str | None = None) -> dict[str, Any]:
    """Evaluates a training run (and optionally a baseline run) on `split` and writes the results.

    Args:
      model_dir: the run to evaluate (model_config.json + best.keras / latest.keras).
      data_dir: the dataset folder; its class names must equal the run's.
      split: the split to evaluate on.
      output_dir: where the files go; default `<model_dir>/eval/<split>`.
      baseline_model_dir: another run (typically `--method=logistic`) evaluated the same way; adds
        its metrics, the deltas and the frequency-group files.
      checkpoint: "best" or "latest", for both runs.
      num_groups: frequency groups (fewer when the dataset has fewer classes; metrics.json says so).
      batch_size: images per forward pass.
      train_split: the split whose known positives order the classes into frequency groups (when
        the dataset has no such split the training counts are left out and no groups are made).
      output: which of the run's method outputs to score with (Latent Noise: "relevant" or
        "visual"); None: the one the run saved (its method's first). The baseline keeps its own.
      baseline_name: the baseline's name on the frequency chart, e.g. "Logistic (control)" for a
        baseline trained on for as many steps as the run; None: its method's name.

    Returns:
      The contents of metrics.json: the metrics of `compute_metrics`, what was evaluated
      (model_dir, data_dir, split, checkpoint, output, date), "baseline", "delta" and
      "frequency_groups" with a baseline, and "files" (name -> path of every file written).
    """
    if num_groups < 1:
        raise EvaluationError(f"num_groups must be >= 1. Received: num_groups={num_groups}.")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1. Received: batch_size={batch_size}.")
    dataset_info = _load_dataset_info(data_dir, split)
    class_names = list(dataset_info.class_names)
    output_dir = output_dir or os.path.join(model_dir, "eval", split)

    scores, labels, ids, output = _predict_run(model_dir, checkpoint, data_dir, dataset_info,
                                               split, batch_size, output)
    ap = metrics_lib.per_class_ap(scores, labels)  # [L], NaN without known positive and negative
    result: dict[str, Any] = {
        "model_dir": model_dir, "data_dir": data_dir, "split": split, "checkpoint": checkpoint,
        "output": output, "date": data.utc_now(), **compute_metrics(scores, labels, ap=ap)}

    train_counts = None
    train_pairs = None
    if train_split in dataset_info.splits:
        train_pairs = _positive_pairs(data_dir, dataset_info, train_split)
        train_counts = np.bincount(train_pairs[1], minlength=len(class_names)).astype(np.int64)
    result["train_split"] = train_split if train_counts is not None else None

    baseline_ap = None
    if baseline_model_dir is not None:
        base_scores, base_labels, base_ids, _ = _predict_run(
            baseline_model_dir, checkpoint, data_dir, dataset_info, split, batch_size)
        if not (np.array_equal(base_ids, ids) and np.array_equal(base_labels, labels)):
            raise EvaluationError(f"split {split!r} of {data_dir} was read in a different order "
                                  "for the baseline; the dataset changed during the evaluation.")
        baseline_ap = metrics_lib.per_class_ap(base_scores, base_labels)
        baseline_metrics = compute_metrics(base_scores, base_labels, ap=baseline_ap)
        result["baseline"] = {"model_dir": baseline_model_dir, **baseline_metrics}
        result["delta"] = {key: result[key] - baseline_metrics[key] for key in DELTA_KEYS}

    os.makedirs(output_dir, exist_ok=True)
    files = {}
    files["per_class_ap_csv"] = os.path.join(output_dir, PER_CLASS_AP_CSV)
    _atomic_write_text(files["per_class_ap_csv"],
                       _per_class_csv(class_names, ap, labels, train_counts, baseline_ap))
    if baseline_ap is not None:
        names = metrics_lib.comparison_names(
            models.read_model_info(model_dir).get("method", ""),
            models.read_model_info(baseline_model_dir).get("method", ""))
        if baseline_name:
            names = (names[0], baseline_name)
        result["frequency_groups"] = _frequency_groups(
            ap, baseline_ap, train_counts, train_pairs, train_split, num_groups, output_dir, files,
            names)
    files["metrics_json"] = os.path.join(output_dir, METRICS_JSON)
    result["files"] = files
    _atomic_write_text(files["metrics_json"],
                       json.dumps(_json_ready(result), indent=2, sort_keys=True) + "\n")
    return result


def format_summary(result: dict[str, Any]) -> str:
    """A short text table of `evaluate_model_dir`'s result (values in percent)."""
    baseline = result.get("baseline")
    rows = [
        (f"mAP (classes with known +/-, {result['num_valid_classes']} of "
         f"{result['num_classes']})", "mAP"),
        ("mAP (all classes, official)", "mAP_all_classes"),
        ("mAP (known-label weighted)", "mAP_label_weighted"),
        (f"CF1@{THRESHOLD}", f"CF1@{THRESHOLD}"),
        (f"OF1@{THRESHOLD}", f"OF1@{THRESHOLD}"),
    ]
    header = f"{'metric (%)':<42}{'model':>9}"
    if baseline is not None:
        header += f"{'baseline':>10}{'delta':>9}"
    lines = [f"{result['model_dir']} on split {result['split']!r} of {result['data_dir']}: "
             f"{result['num_images']} images, {result['num_classes']} classes, "
             f"{100 * result['known_ratio']:.1f}% of the labels known", header]
    for title, key in rows:
        line = f"{title:<42}{_percent(result[key]):>9}"
        if baseline is not None:
            line += f"{_percent(baseline[key]):>10}{_percent(result['delta'][key], True):>9}"
        lines.append(line)
    groups = result.get("frequency_groups")
    if groups is not None and groups.get("note"):
        lines.append(f"frequency groups: {groups['note']}")
    lines.append("files:")
    lines.extend(f"  {path}" for path in result["files"].values())
    return "\n".join(lines)


# ---- Helpers ----------------------------------------------------------------------------------


def _load_dataset_info(data_dir: str, split: str) -> data.DatasetInfo:
    if not tf.io.gfile.isdir(data_dir):
        raise EvaluationError(f"--data_dir {data_dir!r} does not exist or is not a folder; give "
                              "the dataset folder written by tfrecords_tools.")
    info = data.load_dataset_info(data_dir)
    if split not in info.splits:
        raise EvaluationError(f"split {split!r} is not in the dataset {data_dir}; it has "
                              f"{sorted(info.splits)}. Choose one with --split.")
    return info


def _predict_run(model_dir: str, checkpoint: str, data_dir: str, dataset_info: data.DatasetInfo,
                 split: str, batch_size: int, output: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Loads a run, checks it against the dataset and predicts the split with `output` (None:
    the saved one); returns scores, labels, ids and the output's name."""
    if not os.path.isdir(model_dir):
        raise EvaluationError(f"model_dir {model_dir!r} does not exist or is not a folder; give "
                              "the --model_dir of a training run.")
    model, info = models.load_model_dir(model_dir, checkpoint)
    _check_class_names(info.get("class_names"), dataset_info.class_names, model_dir, data_dir)
    input_mode = info.get("input_mode", "image")
    if input_mode != dataset_info.mode:
        raise EvaluationError(f"{model_dir} takes {input_mode!r} inputs but {data_dir} is a "
                              f"{dataset_info.mode!r} dataset; evaluate on a dataset of the kind "
                              "the model was trained on.")
    if output is not None:
        if output not in model.method.OUTPUTS:
            raise EvaluationError(f"--output={output!r}: the {model.method_name!r} run in "
                                  f"{model_dir} has the outputs {list(model.method.OUTPUTS)}; "
                                  "choose one of those, or leave --output out.")
        model.with_output(output)
    image_size = info.get("image_size") if input_mode == "image" else None
    return (*predict_split(model, data_dir, split, batch_size=batch_size, image_size=image_size),
            model.output_name)


def _check_class_names(model_names: Sequence[str] | None, dataset_names: Sequence[str],
                       model_dir: str, data_dir: str) -> None:
    if model_names is None:
        raise EvaluationError(f"{model_dir}/{models.MODEL_CONFIG_JSON} has no class_names; it was "
                              "not written by imcl-train.")
    model_names, dataset_names = list(model_names), list(dataset_names)
    if model_names == dataset_names:
        return
    where = f"the model in {model_dir} and the dataset {data_dir}"
    if len(model_names) != len(dataset_names):
        raise EvaluationError(f"class names differ between {where}: the model has "
                              f"{len(model_names)} classes, the dataset {len(dataset_names)}. "
                              "Evaluate the model on the dataset it was trained on.")
    index = next(i for i, (a, b) in enumerate(zip(model_names, dataset_names)) if a != b)
    raise EvaluationError(f"class names differ between {where}: class {index} is "
                          f"{model_names[index]!r} in the model but {dataset_names[index]!r} in "
                          "the dataset. Evaluate the model on the dataset it was trained on.")


_LABEL_BATCH = 4096  # records parsed at once when only their label lists are read


def _positive_pairs(data_dir: str, info: data.DatasetInfo, split: str
                    ) -> tuple[np.ndarray, np.ndarray, int]:
    """(record index, class) of every known positive of a split, read without decoding images.

    Returns rows int64 [P], classes int64 [P] (sorted by record, each pair once) and the number of
    records N. DataError when a class index is outside [0, L) or the record count disagrees with
    dataset.json.
    """
    split_info = info.split(split)
    paths = [os.path.join(data_dir, name) for name in split_info.shards]
    missing = [path for path in paths if not tf.io.gfile.exists(path)]
    if missing:
        raise data.DataError(f"split {split!r}: shard {missing[0]} listed in {data.DATASET_JSON} "
                             "is missing; the dataset is incomplete, rebuild it.")
    spec = {data.POSITIVE_KEY: tf.io.RaggedFeature(tf.int64)}

    def positives_of(serialized):  # [B] records -> ragged [B, (P)]
        return tf.io.parse_example(serialized, spec)[data.POSITIVE_KEY]

    records = tf.data.TFRecordDataset(paths).batch(_LABEL_BATCH).map(positives_of)
    rows, classes = [], []
    num_records = 0
    for positives in records:
        lengths = positives.row_lengths().numpy()
        rows.append(num_records + np.repeat(np.arange(len(lengths), dtype=np.int64), lengths))
        classes.append(positives.flat_values.numpy())
        num_records += len(lengths)
    rows = np.concatenate(rows) if rows else np.zeros([0], np.int64)
    classes = np.concatenate(classes) if classes else np.zeros([0], np.int64)
    if num_records != split_info.num_examples:
        raise data.DataError(f"split {split!r} of {data_dir}: the shards hold {num_records} "
                             f"records but {data.DATASET_JSON} says {split_info.num_examples}; "
                             "rebuild the dataset.")
    bad = np.flatnonzero((classes < 0) | (classes >= info.num_classes))
    if len(bad):
        raise data.DataError(f"split {split!r} of {data_dir}: record {int(rows[bad[0]])} lists "
                             f"positive class {int(classes[bad[0]])}, outside [0, "
                             f"{info.num_classes}); the dataset does not match its class list.")
    # A repeated index inside one record (rejected by parse_example) counts its image once.
    pairs = np.unique(rows * info.num_classes + classes)
    return pairs // info.num_classes, pairs % info.num_classes, num_records


def _frequency_groups(ap, baseline_ap, train_counts, train_pairs, train_split, num_groups,
                      output_dir, files, names) -> dict[str, Any]:
    """Makes the frequency groups, writes their CSV and plot, returns their metrics.json entry.

    names: the chart's (method, baseline) names, `metrics.comparison_names` of the two runs.
    """
    if train_counts is None:
        note = (f"no frequency groups: the dataset has no {train_split!r} split to count "
                "training annotations in.")
        return {"num_groups_requested": num_groups, "num_groups": 0, "note": note, "groups": []}
    num_classes = len(train_counts)
    used = min(num_groups, num_classes)
    note = None
    if used < num_groups:
        note = (f"{num_groups} groups requested but the dataset has only {num_classes} classes; "
                f"using {used} groups of one class.")
    groups = metrics_lib.frequency_groups(train_counts, ap, baseline_ap, used)
    # Training images per group from the (record, class) pairs: an image counts once per group
    # even when it has several positives in it; no [N, L] label matrix is built.
    rows, classes, _ = train_pairs
    group_of_class = np.zeros([num_classes], np.int64)
    for group in groups:
        group_of_class[group.class_indices] = group.group
    image_groups = np.unique(rows * used + group_of_class[classes])  # (record, group) pairs
    images_per_group = np.bincount(image_groups % used, minlength=used)
    for group in groups:
        group.num_images = int(images_per_group[group.group])

    files["frequency_groups_csv"] = os.path.join(output_dir, FREQUENCY_GROUPS_CSV)
    _atomic_write_text(files["frequency_groups_csv"], _groups_csv(groups))
    files["frequency_groups_png"] = metrics_lib.plot_frequency_groups(
        groups, os.path.join(output_dir, FREQUENCY_GROUPS_PNG), method_name=names[0],
        baseline_name=names[1])
    return {"num_groups_requested": num_groups, "num_groups": used, "note": note,
            "count": f"images of split {train_split!r} with a known positive of the class",
            "groups": [group.to_dict() for group in groups]}


def _per_class_csv(class_names, ap, labels, train_counts, baseline_ap) -> str:
    """One row per class; an empty AP means no known positive or no known negative in the split."""
    known_positives = np.sum(labels > 0, axis=0)  # [L]
    known_negatives = np.sum(labels < 0, axis=0)  # [L]
    header = ["class_index", "class_name", "ap", "known_positives", "known_negatives",
              "training_positives"]
    if baseline_ap is not None:
        header += ["baseline_ap", "ap_delta"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for index, name in enumerate(class_names):
        row = [index, name, _csv_number(ap[index]), int(known_positives[index]),
               int(known_negatives[index]),
               "" if train_counts is None else int(train_counts[index])]
        if baseline_ap is not None:
            row += [_csv_number(baseline_ap[index]), _csv_number(ap[index] - baseline_ap[index])]
        writer.writerow(row)
    return buffer.getvalue()


def _groups_csv(groups) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["group", "num_classes", "min_training_positives", "max_training_positives",
                     "training_positives", "training_images", "num_valid_classes",
                     "mean_ap_model", "mean_ap_baseline", "mean_ap_delta"])
    for group in groups:
        writer.writerow([group.group, len(group.class_indices), group.min_count, group.max_count,
                         group.total_count, group.num_images, group.num_valid_classes,
                         _csv_number(group.mean_ap_method), _csv_number(group.mean_ap_baseline),
                         _csv_number(group.mean_delta)])
    return buffer.getvalue()


def _csv_number(value) -> str:
    value = float(value)
    return "" if math.isnan(value) else repr(value)


def _json_ready(value):
    """NaN becomes null (JSON has no NaN); NumPy scalars and arrays become Python values."""
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _atomic_write_text(path: str, text: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


def _percent(value, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


if __name__ == "__main__":  # the command's flags and main are in imcl_tf.evaluate_cli
    from imcl_tf.evaluate_cli import run_cli

    run_cli()

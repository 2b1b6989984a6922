r"""Precomputed features + label matrix (.npy or CSV) -> a features-mode imcl_tf dataset.

    imcl-data arrays --features=X.npy --labels=Y.npy --label_format=partial \
        --class_names=classes.txt --ids=ids.txt --output_dir=data/feats --split=train

--features is an [N, D] matrix, --labels an [N, L] matrix, row i of both describing example i.
Labels are either
  full:    values in {1, 0}: 1 positive, 0 NEGATIVE (every label known), or
  partial: values in {1, -1, 0}: 1 positive, -1 negative, 0 UNKNOWN.
A matrix containing -1 is partial; a matrix of only 0 and 1 is ambiguous (0 could mean negative
or unknown), so it needs --label_format. The format used is recorded in dataset.json
labels.label_format. CSV files hold numbers separated by commas, one row per example; a first row
without any number is a header (for labels, its fields are the class names unless --class_names
is given). --ids gives one id per line (default: the row number); --class_names one class name per
line (default: the labels CSV header, else class_0, class_1, ...).
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any, Sequence

import numpy as np
from absl import flags

from imcl_tf import data
from tfrecords_tools import common

CONVERTER = "tfrecords_tools.arrays"
LABEL_FORMATS = ("full", "partial")
_CHECK_ROWS = 65536  # rows checked at a time, so memory-mapped .npy files are never fully loaded


def convert(features: str, labels: str, *, output_dir: str, label_format: str | None = None,
            ids: str | None = None, class_names: str | None = None,
            **write_options: Any) -> data.SplitInfo:
    """Converts one split of arrays; `write_options` are common.convert_split's (split, ...)."""
    names, records, used_format = read_records(features, labels, label_format=label_format,
                                               ids=ids, class_names=class_names)
    source = {"full": "arrays, full labels: 1 positive, 0 negative",
              "partial": "arrays, partial labels: 1 positive, -1 negative, 0 unknown"}[used_format]
    return common.convert_split(
        records, output_dir=output_dir, class_names=names, converter=CONVERTER, mode="features",
        inputs={"features": features, "labels": labels, "label_format": label_format, "ids": ids,
                "class_names": class_names},
        label_source=source, split_label_info={"label_format": used_format}, **write_options)


def read_records(features: str, labels: str, label_format: str | None = None,
                 ids: str | None = None, class_names: str | None = None
                 ) -> tuple[list[str], list[common.Record], str]:
    """Returns (class names, one Record per row, the label format used)."""
    if label_format not in (None,) + LABEL_FORMATS:
        raise data.DataError(f"--label_format must be one of {LABEL_FORMATS}, got "
                             f"{label_format!r}.")
    feature_matrix, _ = load_matrix(features, "--features")
    label_matrix, label_header = load_matrix(labels, "--labels")
    num_rows, num_classes = label_matrix.shape
    if feature_matrix.shape[0] != num_rows:
        raise data.DataError(f"--features {features} has {feature_matrix.shape[0]} rows but "
                             f"--labels {labels} has {num_rows}; row i of both must describe "
                             "example i.")
    _check_finite(feature_matrix, features)
    used_format = _check_labels(label_matrix, labels, label_format)

    if class_names is not None:
        names = _read_lines(class_names, "--class_names")
    elif label_header is not None:
        names = [n.strip() for n in label_header]
    else:
        names = [f"class_{j}" for j in range(num_classes)]
    if len(names) != num_classes:
        raise data.DataError(f"{class_names or labels}: {len(names)} class names for "
                             f"{num_classes} label columns of {labels}.")
    row_ids = (_read_lines(ids, "--ids") if ids is not None
               else [str(i) for i in range(num_rows)])
    if len(row_ids) != num_rows:
        raise data.DataError(f"--ids {ids} has {len(row_ids)} ids for {num_rows} rows.")

    records = []
    for start in range(0, num_rows, _CHECK_ROWS):
        block = np.asarray(label_matrix[start:start + _CHECK_ROWS])  # [rows, L]
        for offset, row in enumerate(block):
            i = start + offset
            negative_value = 0 if used_format == "full" else -1
            records.append(common.Record(
                image_id=row_ids[i],
                positives=np.flatnonzero(row == 1).tolist(),
                negatives=np.flatnonzero(row == negative_value).tolist(),
                source=f"{labels} row {i} (id {row_ids[i]!r})",
                embedding=feature_matrix[i]))  # a view: memory-mapped rows are read when written
    return names, records, used_format


def load_matrix(path: str, flag: str) -> tuple[np.ndarray, list[str] | None]:
    """Loads a 2-D numeric matrix from .npy (memory-mapped) or CSV; returns (matrix, CSV header)."""
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise data.DataError(f"{flag} {path} not found.")
    if path.lower().endswith(".npy"):
        try:
            if os.path.exists(path):
                matrix = np.load(path, mmap_mode="r", allow_pickle=False)
            else:  # a remote tf.io.gfile path: read it whole
                with tf.io.gfile.GFile(path, "rb") as f:
                    matrix = np.load(io.BytesIO(f.read()), allow_pickle=False)
        except ValueError as e:
            raise data.DataError(f"{flag} {path}: not a numeric .npy array ({e}).") from e
        header = None
        if not (np.issubdtype(matrix.dtype, np.number) or matrix.dtype == np.bool_):
            raise data.DataError(f"{flag} {path}: dtype {matrix.dtype} is not numeric.")
    elif path.lower().endswith(".csv"):
        matrix, header = _load_csv(path, flag)
    else:
        raise data.DataError(f"{flag} {path}: expected a .npy or .csv file.")
    if matrix.ndim != 2 or 0 in matrix.shape:
        raise data.DataError(f"{flag} {path}: expected a non-empty 2-D matrix [rows, columns], got "
                             f"shape {tuple(matrix.shape)}.")
    return matrix, header


def _load_csv(path: str, flag: str) -> tuple[np.ndarray, list[str] | None]:
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "r") as f:
        reader = csv.reader(io.StringIO(f.read()))
        rows = [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    header = None
    if rows and not any(_is_number(c) for c in rows[0][1]):
        header = rows.pop(0)[1]
    width = len(header) if header is not None else (len(rows[0][1]) if rows else 0)
    matrix = np.empty([len(rows), width], np.float64)
    for r, (number, row) in enumerate(rows):
        if len(row) != width:
            raise data.DataError(f"{flag} {path} line {number}: {len(row)} values, expected "
                                 f"{width}.")
        for c, text in enumerate(row):
            try:
                matrix[r, c] = float(text)
            except ValueError:
                raise data.DataError(f"{flag} {path} line {number} column {c + 1}: {text!r} is not "
                                     "a number (only the first row may be a header).") from None
    return matrix, header


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _check_finite(matrix: np.ndarray, path: str) -> None:
    for start in range(0, matrix.shape[0], _CHECK_ROWS):
        block = np.asarray(matrix[start:start + _CHECK_ROWS], np.float32)  # as stored: float32
        bad = np.argwhere(~np.isfinite(block))
        if bad.size:
            row, column = bad[0]
            value = matrix[start + row, column].item()
            raise data.DataError(f"--features {path}: row {start + row} column {column} is "
                                 f"{value!r}, not finite as float32; features must be finite "
                                 f"({len(bad)} non-finite values in rows {start}.."
                                 f"{start + len(block) - 1}).")


def _check_labels(matrix: np.ndarray, path: str, label_format: str | None) -> str:
    """Checks label values and returns the label format ("full" or "partial")."""
    has_minus_one = False
    for start in range(0, matrix.shape[0], _CHECK_ROWS):
        block = np.asarray(matrix[start:start + _CHECK_ROWS])
        bad = np.argwhere((block != 1) & (block != 0) & (block != -1))
        if bad.size:
            row, column = bad[0]
            raise data.DataError(f"--labels {path}: row {start + row} column {column} is "
                                 f"{block[row, column].item()!r}; labels must be 1, 0 or -1.")
        has_minus_one = has_minus_one or bool(np.any(block == -1))
    if label_format == "full" and has_minus_one:
        row, column = np.argwhere(np.asarray(matrix) == -1)[0]
        raise data.DataError(f"--labels {path}: row {row} column {column} is -1, but "
                             "--label_format=full allows only 1 (positive) and 0 (negative); use "
                             "--label_format=partial for 1/-1/0 labels.")
    if label_format is not None:
        return label_format
    if has_minus_one:
        return "partial"
    raise data.DataError(f"--labels {path} holds only 0 and 1, which is ambiguous: pass "
                         "--label_format=full if 0 means negative, or --label_format=partial if 0 "
                         "means unknown (then no label is negative).")


def _read_lines(path: str, flag: str) -> list[str]:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise data.DataError(f"{flag} {path} not found.")
    with tf.io.gfile.GFile(path, "r") as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise data.DataError(f"{flag} {path} line {number} is empty; one value per line.")
    return [line.strip() for line in lines]


# ---- Command line -------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    common.define_flag(flags.DEFINE_string, "features", None,
                       "[N, D] feature matrix (.npy or .csv).", flag_values, required=True)
    common.define_flag(flags.DEFINE_string, "labels", None,
                       "[N, L] label matrix (.npy or .csv), see --label_format.", flag_values,
                       required=True)
    common.define_flag(flags.DEFINE_enum, "label_format", None,
                       "full: 1 positive, 0 negative; partial: 1 positive, -1 negative, 0 unknown. "
                       "Needed when the labels hold only 0 and 1.", flag_values,
                       enum_values=list(LABEL_FORMATS))
    common.define_flag(flags.DEFINE_string, "ids", None,
                       "Optional text file with one unique id per row (default: row numbers).",
                       flag_values)
    common.define_flag(flags.DEFINE_string, "class_names", None,
                       "Optional text file with one class name per label column.", flag_values)
    common.define_common_flags(flag_values)


def convert_from_flags(flag_values: flags.FlagValues) -> data.SplitInfo:
    return convert(flag_values.features, flag_values.labels,
                   label_format=flag_values.label_format, ids=flag_values.ids,
                   class_names=flag_values.class_names, **common.write_options(flag_values))


def run(argv: Sequence[str]) -> data.SplitInfo:
    """Parses argv (argv[0] is the program name) and converts; for tests and scripts."""
    return convert_from_flags(common.parse_flags(define_flags, argv))


def main(argv: Sequence[str]) -> None:
    common.run_main(convert_from_flags, argv)


if __name__ == "__main__":
    from tfrecords_tools import commands

    commands.run_tool("arrays", define_flags, main)

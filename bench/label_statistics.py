"""How much label structure does a dataset have? Frequencies, long tail and pairwise correlation.

For one split of a dataset folder (labels only, images are not read) it reports the label
cardinality, the positives per class (smallest, median, largest and their ratio: the long tail),
the known labels per class, and the Pearson correlation between the presence indicators of every
pair of classes, computed on the images where both classes are known (pairwise complete). A mean
|correlation| near 0 means the classes occur independently and a co-occurrence label graph has
nothing to learn; the demo scenes (outfit templates) have about 0.23.

  python bench/label_statistics.py --data_dir DATA --split train [--out FILE.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pairwise_correlation(rows: np.ndarray) -> np.ndarray:
    """Pearson correlation of the presence of classes l and j on the images where both are known.

    rows: [N, L] in {+1, -1, 0}. Returns float64 [L, L]; NaN where fewer than 2 images know both
    or one of them is constant there. The diagonal is 1 where defined.
    """
    known = (rows != 0).astype(np.float64)
    present = (rows > 0).astype(np.float64)
    both = known.T @ known  # [l, j]: images knowing both
    sum_l = present.T @ known  # [l, j]: sum of x_l over those images
    sum_j = sum_l.T
    sum_lj = present.T @ present
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_l, mean_j = sum_l / both, sum_j / both
        covariance = sum_lj / both - mean_l * mean_j
        variance = (mean_l - mean_l ** 2) * (mean_j - mean_j ** 2)  # x^2 = x for 0/1 values
        correlation = covariance / np.sqrt(variance)
    correlation[(both < 2) | ~(variance > 0)] = np.nan
    return correlation


def statistics(rows: np.ndarray) -> dict[str, float]:
    """The numbers of the report for label rows [N, L] in {+1, -1, 0}."""
    num_images, num_classes = rows.shape
    positives = (rows > 0).sum(0)
    known = (rows != 0).sum(0)
    correlation = pairwise_correlation(rows)
    off_diagonal = correlation[~np.eye(num_classes, dtype=bool)]
    off_diagonal = off_diagonal[np.isfinite(off_diagonal)]
    return {
        "images": num_images,
        "classes": num_classes,
        "known_fraction": float((rows != 0).mean()) if rows.size else 0.0,
        "positives_per_image": float((rows > 0).sum(1).mean()) if num_images else 0.0,
        "positives_per_class_min": int(positives.min()),
        "positives_per_class_median": float(np.median(positives)),
        "positives_per_class_max": int(positives.max()),
        "long_tail_ratio": float(positives.max() / max(positives.min(), 1)),
        "known_per_class_min": int(known.min()),
        "known_per_class_median": float(np.median(known)),
        "mean_abs_correlation": float(np.abs(off_diagonal).mean()) if off_diagonal.size else
        float("nan"),
        "max_abs_correlation": float(np.abs(off_diagonal).max()) if off_diagonal.size else
        float("nan"),
        "pairs_with_abs_correlation_above_0.2": float((np.abs(off_diagonal) > 0.2).mean())
        if off_diagonal.size else float("nan"),
    }


def format_report(stats: dict[str, float], data_dir: str, split: str) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"Labels of split {split!r} of `{os.path.basename(os.path.normpath(data_dir))}`, "
             f"date {now}.", "", "| statistic | value |", "|---|---:|"]
    for key, value in stats.items():
        text = f"{value:.3f}" if isinstance(value, float) and not float(value).is_integer() \
            else f"{value:g}" if isinstance(value, float) else str(value)
        lines.append(f"| {key.replace('_', ' ')} | {text} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True, help="A dataset folder (dataset.json).")
    parser.add_argument("--split", default="train")
    parser.add_argument("--out", default="", help="Markdown file for the table (default: stdout).")
    args = parser.parse_args(argv)
    from imcl_tf import data as data_lib
    from tfrecords_tools import partial

    try:
        rows = partial.read_label_rows(args.data_dir, args.split)
    except (data_lib.DataError, FileNotFoundError, KeyError, ValueError) as error:
        raise SystemExit(f"label_statistics: {error}")
    if not len(rows):
        raise SystemExit(f"label_statistics: split {args.split!r} of {args.data_dir} is empty.")
    text = format_report(statistics(rows), args.data_dir, args.split)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

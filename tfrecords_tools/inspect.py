"""Inspects a dataset folder: verifies every shard and prints counts and label statistics.

    imcl-data inspect DIR [--json] [--check_images] [--max_classes 100]

Prints, per split, the image count, shards, known ratio, label cardinality (mean known positives
per image) and images without a known positive, then per class the known positives and
negatives of every split. Every record of every shard is parsed first (imcl_tf.data.
verify_dataset); a bad dataset exits with status 1 and a message naming the file and record.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence, TextIO

from absl import flags

from imcl_tf import data

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines this tool's flags (in `flag_values`, so tests can use a fresh FlagValues)."""
    flags.DEFINE_boolean("json", False, "Print one JSON object instead of tables.",
                         flag_values=flag_values)
    flags.DEFINE_boolean("check_images", False, "Also decode every image (slower).",
                         flag_values=flag_values)
    flags.DEFINE_integer("max_classes", 100, "Rows of the per-class table (--json lists all).",
                         lower_bound=0, flag_values=flag_values)


def inspect(data_dir: str, *, check_images: bool = False) -> dict[str, Any]:
    """Verifies `data_dir` and returns its summary as a JSON-ready dict.

    Raises:
      DataError naming the file and record of the first problem.
    """
    report = data.verify_dataset(data_dir, check_images=check_images)
    info = report.info
    # Usual splits first, in reading order; any others after them, by name.
    usual = ["train", "val", "validation", "test"]
    split_names = sorted(report.splits, key=lambda n: (usual.index(n) if n in usual else 99, n))
    splits = {}
    for name in split_names:
        stats = report.splits[name]
        splits[name] = {
            "num_examples": stats.num_examples,
            "num_shards": len(info.splits[name].shards),
            "known_ratio": stats.known_ratio,
            "label_cardinality": stats.label_cardinality,
            "images_without_positive": stats.images_without_positive,
            "known_positives": int(stats.positives.sum()),
            "known_negatives": int(stats.negatives.sum()),
            "skipped": len(info.splits[name].skipped),
        }
    classes = []
    for index, class_name in enumerate(info.class_names):
        classes.append({
            "index": index,
            "name": class_name,
            "positives": {n: int(report.splits[n].positives[index]) for n in split_names},
            "negatives": {n: int(report.splits[n].negatives[index]) for n in split_names},
        })
    return {
        "data_dir": data_dir,
        "ok": True,
        "images_checked": bool(check_images and info.mode == "image"),
        "mode": info.mode,
        "num_classes": info.num_classes,
        "image_size": info.image_size,
        "embedding_dim": info.embedding_dim,
        "label_graph": info.label_graph,
        "labels": {k: v for k, v in info.labels.items() if k in ("protocol", "known_ratio", "seed",
                                                                 "source", "source_dataset")},
        "splits": splits,
        "classes": classes,
    }


def format_summary(summary: dict[str, Any], max_classes: int = 100) -> str:
    """The summary as readable text tables."""
    lines = [f"dataset {summary['data_dir']}: {summary['mode']} mode, "
             f"{summary['num_classes']} classes"
             + (f", image size hint {summary['image_size']}" if summary["image_size"] else "")
             + (f", embedding dim {summary['embedding_dim']}" if summary["embedding_dim"] else "")]
    labels = summary["labels"]
    if labels:
        lines.append("labels: " + ", ".join(f"{k}={labels[k]}" for k in sorted(labels)))
    lines.append("all shards parse: OK" + (", every image decodes" if summary["images_checked"]
                                           else ""))
    lines.append("")
    lines.append(f"{'split':<12}{'images':>9}{'shards':>8}{'known':>8}{'pos/img':>9}"
                 f"{'no pos':>8}{'pos':>10}{'neg':>10}{'skipped':>9}")
    for name, s in summary["splits"].items():
        lines.append(f"{name:<12}{s['num_examples']:>9}{s['num_shards']:>8}"
                     f"{s['known_ratio']:>8.3f}{s['label_cardinality']:>9.3f}"
                     f"{s['images_without_positive']:>8}{s['known_positives']:>10}"
                     f"{s['known_negatives']:>10}{s['skipped']:>9}")
    lines.append("")
    split_names = list(summary["splits"])
    name_width = max([len("class")] + [len(c["name"]) for c in summary["classes"][:max_classes]])
    name_width = min(name_width, 32)
    header = f"{'#':>5}  {'class':<{name_width}}"
    for name in split_names:
        header += f"{name + ' +':>14}{name + ' -':>14}"
    lines.append(header)
    for c in summary["classes"][:max_classes]:
        row = f"{c['index']:>5}  {c['name'][:name_width]:<{name_width}}"
        for name in split_names:
            row += f"{c['positives'][name]:>14}{c['negatives'][name]:>14}"
        lines.append(row)
    hidden = len(summary["classes"]) - max_classes
    if hidden > 0:
        lines.append(f"... {hidden} more classes (--max_classes or --json to see them)")
    return "\n".join(lines)


def run(argv: Sequence[str], stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Command-line entry with fresh flags; returns the exit status (0 good, 1 bad dataset)."""
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    try:
        rest = flag_values(list(argv))
    except flags.Error as e:
        print(f"inspect: error: {e}", file=stderr)
        return 2
    return _inspect_command(rest, flag_values, stdout, stderr)


def _inspect_command(rest: Sequence[str], flag_values: flags.FlagValues, stdout: TextIO,
                     stderr: TextIO) -> int:
    if len(rest) != 2:
        print("usage: imcl-data inspect DIR [--json] [--check_images] "
              f"[--max_classes N]; got arguments {list(rest[1:])}", file=stderr)
        return 2
    data_dir = rest[1]
    try:
        summary = inspect(data_dir, check_images=flag_values.check_images)
    except data.DataError as e:
        if flag_values.json:
            print(json.dumps({"data_dir": data_dir, "ok": False, "error": str(e)}), file=stdout)
        print(f"inspect: {data_dir} is not a valid dataset: {e}", file=stderr)
        return 1
    if flag_values.json:
        print(json.dumps(summary, indent=2), file=stdout)
    else:
        print(format_summary(summary, flag_values.max_classes), file=stdout)
    return 0


def main(argv: Sequence[str]) -> None:
    sys.exit(_inspect_command(argv, FLAGS, sys.stdout, sys.stderr))


if __name__ == "__main__":
    from tfrecords_tools import commands

    commands.run_tool("inspect", define_flags, main)

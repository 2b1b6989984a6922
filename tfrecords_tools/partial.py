"""Partial-label simulation: hides labels of a fully (or partly) labelled dataset, reproducibly.

Protocols (applied to the entries that are known in the input; unknown entries stay unknown):
  uniform          each known image-class entry stays known with probability R, independently.
  per_class        the CUB protocol (docs/method.md): per class, keep max(floor(R n_pos), 1)
                   of its n_pos positive images and max(floor(R n_neg), 1) of its n_neg negative
                   ones, sampled without replacement; a class with no positives (or negatives)
                   keeps none.
  single_positive  one known positive per image, drawn uniformly among its positives; no
                   negatives. Images with no positive keep no label at all (they stay in the split,
                   all unknown) and are counted in the report and in dataset.json.
Only the named splits are masked (default: train); the others are copied with their labels.
The protocol, ratio, seed and source dataset go into dataset.json `labels`.

    imcl-data partial --input_dir full --output_dir p10 --protocol per_class \\
        --known_ratio 0.1 --seed 0 --splits train
"""

from __future__ import annotations

import os
import sys
import zlib
from typing import Sequence, TextIO

import numpy as np
from absl import flags

from imcl_tf import data
from tfrecords_tools import common
from tfrecords_tools.common import Progress

PROTOCOLS = ("uniform", "per_class", "single_positive")

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines this tool's flags (in `flag_values`, so tests can use a fresh FlagValues)."""
    flags.DEFINE_string("input_dir", None, "Dataset folder to read.", flag_values=flag_values)
    flags.DEFINE_string("output_dir", None, "Dataset folder to write (must differ from the input).",
                        flag_values=flag_values)
    flags.DEFINE_enum("protocol", None, list(PROTOCOLS), "How labels are hidden.",
                      flag_values=flag_values)
    flags.DEFINE_float("known_ratio", None,
                       "R in (0, 1]: the fraction of labels kept (uniform, per_class). R=1 keeps "
                       "every label. Not used by single_positive.", flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Seed of the masking (recorded in dataset.json).",
                         flag_values=flag_values)
    flags.DEFINE_list("splits", ["train"], "Splits to mask; the others are copied unchanged.",
                      flag_values=flag_values)
    flags.DEFINE_boolean("overwrite", False, "Replace an existing dataset in --output_dir.",
                         flag_values=flag_values)
    for name in ("input_dir", "output_dir", "protocol"):
        flags.mark_flag_as_required(name, flag_values=flag_values)


def simulate(input_dir: str,
             output_dir: str,
             protocol: str,
             known_ratio: float | None = None,
             seed: int = 0,
             splits: Sequence[str] = ("train",),
             overwrite: bool = False,
             stream: TextIO | None = None,
             progress_interval: float = 10.0) -> data.DatasetInfo:
    """Writes a copy of `input_dir` to `output_dir` with the labels of `splits` masked.

    Returns the written DatasetInfo; its `labels` records the protocol, ratio, seed, source and the
    known counts of each masked split.

    Raises:
      ValueError on a bad protocol/ratio combination; DataError on a bad input dataset, an unknown
      split, or an existing output without `overwrite`.
    """
    import tensorflow as tf

    stream = stream if stream is not None else sys.stderr
    known_ratio = _check_options(input_dir, output_dir, protocol, known_ratio, overwrite)
    source = data.load_dataset_info(input_dir)
    unknown = [s for s in splits if s not in source.splits]
    if unknown:
        raise data.DataError(f"--splits names {unknown}, which {input_dir} does not have; its "
                             f"splits are {sorted(source.splits)}.")
    if not splits:
        raise data.DataError("--splits is empty: name at least one split to mask.")
    tf.io.gfile.makedirs(output_dir)

    new_splits: dict[str, data.SplitInfo] = {}
    known: dict[str, dict] = {}
    for split, split_info in source.splits.items():
        if split in splits:
            new_splits[split], known[split] = _mask_split(
                input_dir, output_dir, split, split_info, source.num_classes, protocol,
                known_ratio, seed, stream, progress_interval)
        else:
            new_splits[split] = _copy_split(input_dir, output_dir, split_info)
    if source.label_graph:
        tf.io.gfile.copy(os.path.join(input_dir, source.label_graph),
                         os.path.join(output_dir, source.label_graph), overwrite=True)

    info = data.DatasetInfo(
        class_names=list(source.class_names),
        splits=new_splits,
        mode=source.mode,
        embedding_dim=source.embedding_dim,
        image_size=source.image_size,
        label_graph=source.label_graph,
        labels={
            "protocol": protocol,
            "known_ratio": known_ratio,
            "seed": seed,
            "masked_splits": list(splits),
            "source_dataset": input_dir,
            "source_labels": source.labels,
            "known": known,
        },
        provenance={
            "converter": "tfrecords_tools.partial",
            "date": data.utc_now(),
            "flags": {"input_dir": input_dir, "output_dir": output_dir, "protocol": protocol,
                      "known_ratio": known_ratio, "seed": seed, "splits": list(splits)},
            "source_provenance": source.provenance,
        })
    data.replace_dataset_info(output_dir, info)
    _print_known(known, stream)
    return info


def mask_labels(positive_rows: np.ndarray, positive_classes: np.ndarray,
                negative_rows: np.ndarray, negative_classes: np.ndarray,
                num_classes: int, protocol: str, known_ratio: float | None,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Which known entries stay known: (keep_positive bool [P], keep_negative bool [N]).

    The entries of a split are given as flat (image row, class) pairs: positive_rows[i],
    positive_classes[i] is the i-th known positive entry (same for negatives).
    """
    if protocol == "single_positive":
        keep_positive = np.zeros(len(positive_rows), bool)
        if len(positive_rows):
            # A random key per entry; each image keeps the positive with the smallest key, i.e. one
            # of its positives uniformly at random.
            keys = rng.random(len(positive_rows))
            order = np.lexsort((keys, positive_rows))  # by image, then key
            first = np.ones(len(order), bool)
            first[1:] = positive_rows[order][1:] != positive_rows[order][:-1]
            keep_positive[order[first]] = True
        return keep_positive, np.zeros(len(negative_rows), bool)
    if known_ratio >= 1.0:
        return np.ones(len(positive_rows), bool), np.ones(len(negative_rows), bool)
    if protocol == "uniform":
        return (rng.random(len(positive_rows)) < known_ratio,
                rng.random(len(negative_rows)) < known_ratio)
    if protocol == "per_class":
        return (_keep_per_class(positive_classes, num_classes, known_ratio, rng),
                _keep_per_class(negative_classes, num_classes, known_ratio, rng))
    raise ValueError(f"protocol must be one of {PROTOCOLS}. Received: protocol={protocol!r}.")


def _keep_per_class(classes: np.ndarray, num_classes: int, known_ratio: float,
                    rng: np.random.Generator) -> np.ndarray:
    """CUB rule: per class keep max(floor(R n), 1) of its n entries, without replacement."""
    counts = np.bincount(classes, minlength=num_classes)  # [L]
    quota = np.where(counts > 0, np.maximum(np.floor(known_ratio * counts), 1), 0)  # [L]
    # Rank the entries of each class in a random order; the first `quota` of each class stay.
    keys = rng.random(len(classes))
    order = np.lexsort((keys, classes))
    class_start = np.concatenate([[0], np.cumsum(counts)[:-1]])  # [L]
    rank = np.empty(len(classes), np.int64)
    rank[order] = np.arange(len(classes)) - class_start[classes[order]]
    return rank < quota[classes]


def _check_options(input_dir: str, output_dir: str, protocol: str, known_ratio: float | None,
                   overwrite: bool) -> float | None:
    import tensorflow as tf

    if protocol not in PROTOCOLS:
        raise ValueError(f"--protocol must be one of {PROTOCOLS}. Received: {protocol!r}.")
    if protocol == "single_positive":
        if known_ratio is not None:
            raise ValueError("--known_ratio does not apply to --protocol=single_positive (it keeps "
                             f"one positive per image). Received: known_ratio={known_ratio}.")
    else:
        if known_ratio is None:
            raise ValueError(f"--protocol={protocol} needs --known_ratio in (0, 1].")
        if not 0.0 < known_ratio <= 1.0:
            raise ValueError(f"--known_ratio must be in (0, 1]. Received: {known_ratio}.")
        known_ratio = float(known_ratio)
    if os.path.abspath(input_dir) == os.path.abspath(output_dir):
        raise data.DataError(f"--output_dir must differ from --input_dir ({input_dir}); the "
                             "input dataset is never modified.")
    if tf.io.gfile.exists(os.path.join(output_dir, data.DATASET_JSON)) and not overwrite:
        raise data.DataError(f"{output_dir} already holds a dataset; choose another --output_dir "
                             "or pass --overwrite.")
    return known_ratio


def _split_paths(input_dir: str, split_info: data.SplitInfo) -> list[str]:
    return [os.path.join(input_dir, name) for name in split_info.shards]


def read_label_rows(data_dir: str, split: str) -> np.ndarray:
    """A split's label rows as float32 [N, L] in {+1, -1, 0}, in file order, without the images."""
    info = data.load_dataset_info(data_dir)
    split_info = info.split(split)
    pos_rows, pos_classes, neg_rows, neg_classes = _read_labels(
        _split_paths(data_dir, split_info), split_info.num_examples, split)
    rows = np.zeros([split_info.num_examples, info.num_classes], np.float32)
    rows[neg_rows, neg_classes] = -1.0
    rows[pos_rows, pos_classes] = 1.0
    return rows


def _read_labels(paths: list[str], num_examples: int, split: str
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flat (row, class) pairs of the known positives and negatives, rows in file order."""
    import tensorflow as tf

    spec = {data.POSITIVE_KEY: tf.io.RaggedFeature(tf.int64),
            data.NEGATIVE_KEY: tf.io.RaggedFeature(tf.int64)}
    batches = tf.data.TFRecordDataset(paths).batch(4096).map(
        lambda serialized: tf.io.parse_example(serialized, spec))
    pairs = {key: ([], []) for key in spec}
    row = 0
    try:
        for batch in batches:
            for key in spec:
                ragged = batch[key]
                lengths = ragged.row_lengths().numpy()
                pairs[key][0].append(np.repeat(np.arange(row, row + len(lengths)), lengths))
                pairs[key][1].append(ragged.flat_values.numpy())
            row += len(lengths)
    except tf.errors.OpError as e:
        raise data.DataError(f"split {split!r}: cannot read the labels of {paths} "
                             f"({e.message.splitlines()[0]}); check the input with "
                             "imcl-data inspect.") from e
    if row != num_examples:
        raise data.DataError(f"split {split!r}: the shards hold {row} records but dataset.json "
                             f"says {num_examples}; check the input with "
                             "imcl-data inspect.")
    out = []
    for key in spec:
        rows, classes = pairs[key]
        out += [np.concatenate(rows) if rows else np.zeros([0], np.int64),
                np.concatenate(classes) if classes else np.zeros([0], np.int64)]
    return tuple(out)


def _mask_split(input_dir: str, output_dir: str, split: str, split_info: data.SplitInfo,
                num_classes: int, protocol: str, known_ratio: float | None, seed: int,
                stream: TextIO, progress_interval: float) -> tuple[data.SplitInfo, dict]:
    import tensorflow as tf

    paths = _split_paths(input_dir, split_info)
    num_images = split_info.num_examples
    positive_rows, positive_classes, negative_rows, negative_classes = _read_labels(
        paths, num_images, split)
    out_of_range = [c for c in (positive_classes, negative_classes)
                    if len(c) and (c.min() < 0 or c.max() >= num_classes)]
    if out_of_range:
        raise data.DataError(f"split {split!r} of {input_dir} has class indices outside "
                             f"[0, {num_classes}); check it with "
                             "imcl-data inspect.")
    # Each split has its own stream, so masking another split too does not change this one.
    rng = np.random.default_rng([seed, zlib.crc32(split.encode("utf-8"))])
    keep_positive, keep_negative = mask_labels(
        positive_rows, positive_classes, negative_rows, negative_classes, num_classes, protocol,
        known_ratio, rng)

    # Per image, the kept class lists: split the kept flat entries at row boundaries.
    kept_positive = _per_row(positive_rows[keep_positive], positive_classes[keep_positive],
                             num_images)
    kept_negative = _per_row(negative_rows[keep_negative], negative_classes[keep_negative],
                             num_images)
    progress = Progress(f"partial {split}", total=num_images, interval=progress_interval,
                        stream=stream)
    with data.SplitWriter(output_dir, split, len(split_info.shards)) as writer:
        for row, record in enumerate(tf.data.TFRecordDataset(paths).as_numpy_iterator()):
            example = tf.train.Example.FromString(record)
            features = example.features.feature
            features[data.POSITIVE_KEY].int64_list.value[:] = kept_positive[row]
            features[data.NEGATIVE_KEY].int64_list.value[:] = kept_negative[row]
            writer.write(example)
            progress.update()
    progress.close()
    has_positive = np.zeros(num_images, bool)
    has_positive[positive_rows[keep_positive]] = True
    known = {
        "num_examples": num_images,
        "input_positives": int(len(positive_rows)),
        "input_negatives": int(len(negative_rows)),
        "known_positives": int(keep_positive.sum()),
        "known_negatives": int(keep_negative.sum()),
        "known_ratio": (float(keep_positive.sum() + keep_negative.sum())
                        / (num_images * num_classes) if num_images else 0.0),
        "images_without_positive": int(num_images - has_positive.sum()),
        # Classes that no longer have a known positive cannot be learned from this split.
        "classes_without_positive": int(
            (np.bincount(positive_classes[keep_positive], minlength=num_classes) == 0).sum()),
    }
    return writer.split_info, known


def _per_row(rows: np.ndarray, classes: np.ndarray, num_images: int) -> list[list[int]]:
    """Class lists per image from flat (row, class) pairs, classes sorted."""
    order = np.lexsort((classes, rows))
    bounds = np.searchsorted(rows[order], np.arange(num_images + 1))
    sorted_classes = classes[order].tolist()
    return [sorted_classes[bounds[i]:bounds[i + 1]] for i in range(num_images)]


def _copy_split(input_dir: str, output_dir: str, split_info: data.SplitInfo) -> data.SplitInfo:
    """Copies a split's shards unchanged (same names, same counts)."""
    import tensorflow as tf

    for name in split_info.shards:
        tf.io.gfile.copy(os.path.join(input_dir, name), os.path.join(output_dir, name),
                         overwrite=True)
    return data.SplitInfo(shards=list(split_info.shards), num_examples=split_info.num_examples,
                          skipped=list(split_info.skipped),
                          shard_sizes=list(split_info.shard_sizes))


def _print_known(known: dict[str, dict], stream: TextIO) -> None:
    header = (f"{'split':<12}{'images':>9}{'pos in':>10}{'neg in':>10}{'pos kept':>10}"
              f"{'neg kept':>10}{'known':>8}{'no pos':>8}{'classes no pos':>16}")
    print(header, file=stream)
    for split, k in known.items():
        print(f"{split:<12}{k['num_examples']:>9}{k['input_positives']:>10}"
              f"{k['input_negatives']:>10}{k['known_positives']:>10}{k['known_negatives']:>10}"
              f"{k['known_ratio']:>8.3f}{k['images_without_positive']:>8}"
              f"{k['classes_without_positive']:>16}", file=stream)


def run(argv: Sequence[str]) -> data.DatasetInfo:
    """Parses `argv` (argv[0] = program name) with fresh flags and runs the simulation."""
    return _simulate_from_flags(common.parse_flags(define_flags, argv))


def _simulate_from_flags(flag_values: flags.FlagValues) -> data.DatasetInfo:
    return simulate(flag_values.input_dir, flag_values.output_dir, flag_values.protocol,
                    known_ratio=flag_values.known_ratio, seed=flag_values.seed,
                    splits=flag_values.splits, overwrite=flag_values.overwrite)


def main(argv: Sequence[str]) -> None:
    common.run_main(_simulate_from_flags, argv, program="partial")


if __name__ == "__main__":
    from tfrecords_tools import commands

    commands.run_tool("partial", define_flags, main)

r"""Open Images human-verified labels -> imcl_tf TFRecords (partial labels, as in the paper).

    imcl-data openimages --image_labels=train/annotations-human.csv \
        --classes=class-descriptions.csv --trainable_classes=classes-trainable.txt \
        --images_dir=train_images --output_dir=data/openimages --split=train --num_shards=256

Only human-verified labels are used: rows whose Source is one of HUMAN_SOURCES ("verification",
"crowdsource-verification", "human"). Rows from MACHINE_SOURCES ("machine") are ignored and
counted; any other Source stops the conversion. Confidence 1 -> positive, 0 -> negative; every
class without a verified label is unknown. With --trainable_classes the classes are that list
(in its order) and labels of other classes are ignored and counted; without it the classes are
all of --classes. Images whose every label was ignored are left out and counted (they carry no
known label). If an image has both a positive and a negative verification of one class, that
class is made unknown for the image and counted. Images are read from <images_dir>/<ImageID>.jpg.

Class names are the DisplayNames (display names used twice get " (<MID>)" appended); the MIDs,
in class order, are in dataset.json labels.class_ids.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
import sys
from typing import Any, Sequence

from absl import flags

from imcl_tf import data
from tfrecords_tools import common

CONVERTER = "tfrecords_tools.openimages"
HUMAN_SOURCES = ("verification", "crowdsource-verification", "human")
MACHINE_SOURCES = ("machine",)
LABEL_COLUMNS = ("ImageID", "Source", "LabelName", "Confidence")
LABEL_SOURCE = ("open images human-verified labels (Source in " + ", ".join(HUMAN_SOURCES) +
                "): Confidence 1 positive, 0 negative, unverified unknown; machine labels ignored")


@dataclasses.dataclass
class LabelCounts:
    """What the reader ignored, for the report and dataset.json."""
    machine_rows: int = 0
    untrainable_rows: int = 0
    conflicting_labels: int = 0
    images_without_known_labels: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def convert(image_labels: str, classes: str, images_dir: str, *, output_dir: str,
            trainable_classes: str | None = None, **write_options: Any) -> data.SplitInfo:
    """Converts one Open Images split; `write_options` are common.convert_split's (split, ...)."""
    class_ids, class_names = read_classes(classes, trainable_classes)
    records, counts = read_records(image_labels, class_ids, images_dir,
                                   restrict_to_classes=trainable_classes is not None)
    stream = write_options.get("stream") or sys.stderr
    print(f"{CONVERTER}: ignored {counts.machine_rows} machine-label rows, "
          f"{counts.untrainable_rows} rows of classes outside the class list, "
          f"{counts.conflicting_labels} conflicting labels (set unknown), "
          f"{counts.images_without_known_labels} images left without any known label.",
          file=stream)
    return common.convert_split(
        records, output_dir=output_dir, class_names=class_names, converter=CONVERTER,
        inputs={"image_labels": image_labels, "classes": classes, "images_dir": images_dir,
                "trainable_classes": trainable_classes},
        label_source=LABEL_SOURCE,
        label_info={"class_ids": class_ids},  # the MIDs, so predictions map back to Open Images
        split_label_info={"ignored": counts.as_dict()}, **write_options)


def read_classes(classes: str, trainable_classes: str | None = None
                 ) -> tuple[list[str], list[str]]:
    """Returns (MIDs, unique display names) of the classes, in trainable-list or file order."""
    display = _read_class_descriptions(classes)
    if trainable_classes is None:
        class_ids = list(display)
    else:
        class_ids = []
        seen: dict[str, int] = {}
        for number, mid in _read_lines(trainable_classes):
            if mid in seen:
                raise data.DataError(f"{trainable_classes} line {number}: class {mid!r} already "
                                     f"listed on line {seen[mid]}.")
            if mid not in display:
                raise data.DataError(f"{trainable_classes} line {number}: class {mid!r} is not in "
                                     f"{classes}; use the class descriptions of the same release.")
            seen[mid] = number
            class_ids.append(mid)
        if not class_ids:
            raise data.DataError(f"{trainable_classes} lists no class.")
    uses = collections.Counter(display[mid] for mid in class_ids)
    class_names = [display[mid] if uses[display[mid]] == 1 else f"{display[mid]} ({mid})"
                   for mid in class_ids]
    return class_ids, class_names


def read_records(image_labels: str, class_ids: Sequence[str], images_dir: str,
                 restrict_to_classes: bool) -> tuple[list[common.Record], LabelCounts]:
    """One Record per image with at least one verified label, in order of first appearance.

    `restrict_to_classes`: labels of MIDs outside `class_ids` are ignored and counted (a trainable
    subset); otherwise such a MID is an error (the class descriptions do not match the labels).
    """
    import tensorflow as tf

    class_index = {mid: i for i, mid in enumerate(class_ids)}
    counts = LabelCounts()
    # image id -> class index -> (value, line number of the first row giving it)
    labels: dict[str, dict[int, tuple[int, int]]] = {}
    conflicts: dict[str, set[int]] = collections.defaultdict(set)
    if not tf.io.gfile.exists(image_labels):
        raise data.DataError(f"--image_labels {image_labels} not found.")
    with tf.io.gfile.GFile(image_labels, "r") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:4]] != list(LABEL_COLUMNS):
            raise data.DataError(f"{image_labels} line 1: expected the header "
                                 f"{','.join(LABEL_COLUMNS)}, got {header}.")
        for number, row in enumerate(reader, start=2):
            if not row:
                continue
            where = f"{image_labels} line {number}"
            if len(row) < 4:
                raise data.DataError(f"{where}: expected 4 fields {LABEL_COLUMNS}, got {row}.")
            image_id, source, mid, confidence = (field.strip() for field in row[:4])
            labels.setdefault(image_id, {})
            if source in MACHINE_SOURCES:
                counts.machine_rows += 1
                continue
            if source not in HUMAN_SOURCES:
                raise data.DataError(f"{where}: unknown Source {source!r}; human-verified sources "
                                     f"are {HUMAN_SOURCES}, ignored machine sources are "
                                     f"{MACHINE_SOURCES}.")
            if mid not in class_index:
                if restrict_to_classes:
                    counts.untrainable_rows += 1
                    continue
                raise data.DataError(f"{where}: class {mid!r} is not in the class descriptions; "
                                     "use the class file of the same Open Images release.")
            value = _confidence(confidence, where)
            index = class_index[mid]
            earlier = labels[image_id].get(index)
            if earlier is not None and earlier[0] != value:
                conflicts[image_id].add(index)
            elif earlier is None:
                labels[image_id][index] = (value, number)

    records = []
    for image_id, image_labels_of in labels.items():
        for index in conflicts.get(image_id, ()):
            del image_labels_of[index]
            counts.conflicting_labels += 1
        if not image_labels_of:
            counts.images_without_known_labels += 1
            continue
        positives = sorted(i for i, (value, _) in image_labels_of.items() if value == 1)
        negatives = sorted(i for i, (value, _) in image_labels_of.items() if value == 0)
        first_line = min(line for _, line in image_labels_of.values())
        records.append(common.Record(
            image_id=image_id, positives=positives, negatives=negatives,
            source=f"{image_labels} line {first_line} (ImageID {image_id})",
            image_path=os.path.join(images_dir, f"{image_id}.jpg")))
    return records, counts


def _confidence(text: str, where: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = None
    if value not in (0.0, 1.0):
        raise data.DataError(f"{where}: Confidence {text!r} of a human-verified label must be 0 or "
                             "1.")
    return int(value)


def _read_class_descriptions(path: str) -> dict[str, str]:
    """MID -> DisplayName from a LabelName,DisplayName CSV (with or without that header)."""
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise data.DataError(f"--classes {path} not found.")
    display: dict[str, str] = {}
    with tf.io.gfile.GFile(path, "r") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if not row:
                continue
            if number == 1 and [c.strip() for c in row[:2]] == ["LabelName", "DisplayName"]:
                continue
            if len(row) != 2:
                raise data.DataError(f"{path} line {number}: expected LabelName,DisplayName, got "
                                     f"{row}.")
            mid, name = row[0].strip(), row[1].strip()
            if not mid or not name:
                raise data.DataError(f"{path} line {number}: empty LabelName or DisplayName: "
                                     f"{row}.")
            if mid in display:
                raise data.DataError(f"{path} line {number}: class {mid!r} is listed twice.")
            display[mid] = name
    if not display:
        raise data.DataError(f"{path} lists no class.")
    return display


def _read_lines(path: str) -> list[tuple[int, str]]:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise data.DataError(f"{path} not found.")
    with tf.io.gfile.GFile(path, "r") as f:
        return [(n, line.strip()) for n, line in enumerate(f.read().splitlines(), start=1)
                if line.strip()]


# ---- Command line -------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    common.define_flag(flags.DEFINE_string, "image_labels", None,
                       "Image-level labels CSV with columns ImageID,Source,LabelName,Confidence "
                       "(e.g. annotations-human.csv or *-annotations-human-imagelabels.csv).",
                       flag_values, required=True)
    common.define_flag(flags.DEFINE_string, "classes", None,
                       "Class descriptions CSV: LabelName,DisplayName (header optional).",
                       flag_values, required=True)
    common.define_flag(flags.DEFINE_string, "images_dir", None,
                       "Folder holding <ImageID>.jpg.", flag_values, required=True)
    common.define_flag(flags.DEFINE_string, "trainable_classes", None,
                       "Optional text file with one MID per line (e.g. classes-trainable.txt): "
                       "the classes, in this order; labels of other classes are ignored.",
                       flag_values)
    common.define_common_flags(flag_values)


def convert_from_flags(flag_values: flags.FlagValues) -> data.SplitInfo:
    return convert(flag_values.image_labels, flag_values.classes, flag_values.images_dir,
                   trainable_classes=flag_values.trainable_classes,
                   **common.write_options(flag_values))


def run(argv: Sequence[str]) -> data.SplitInfo:
    """Parses argv (argv[0] is the program name) and converts; for tests and scripts."""
    return convert_from_flags(common.parse_flags(define_flags, argv))


def main(argv: Sequence[str]) -> None:
    common.run_main(convert_from_flags, argv)


if __name__ == "__main__":
    from tfrecords_tools import commands

    commands.run_tool("openimages", define_flags, main)

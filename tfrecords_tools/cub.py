r"""CUB-200-2011 attribute labels -> imcl_tf TFRecords (312 binary attributes, the paper's CUB).

    imcl-data cub --cub_root=CUB_200_2011 --split=train,test \
        --output_dir=data/cub --num_shards=8

Reads images.txt, train_test_split.txt, image_class_labels.txt, classes.txt, the attribute names
(attributes/attributes.txt, or attributes.txt in --cub_root or its parent, where the official
archive puts it) and attributes/image_attribute_labels.txt, whose lines are
`image_id attribute_id is_present certainty_id time` (only the first four fields are used; the
official file has a few lines with an extra field before the time). Every image gets all attributes
labelled: +1 if is_present is 1, -1 otherwise; with --not_visible_unknown an attribute whose
certainty is 1 ("not visible") is unknown instead. `image/class` holds the 0-based species index
(for the paper's class-label augmentation); the species names are in dataset.json
labels.image_class_names. --split takes train, test or train,test (the official split).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from absl import flags

from imcl_tf import data
from tfrecords_tools import common

CONVERTER = "tfrecords_tools.cub"
SPLITS = ("train", "test")
NOT_VISIBLE = 1  # certainty_id of "not visible" in attributes/certainties.txt


def convert(cub_root: str, *, output_dir: str, split: str | Sequence[str] = SPLITS,
            not_visible_unknown: bool = False, **write_options: Any) -> dict[str, data.SplitInfo]:
    """Converts the train and/or test split; `write_options` are common.convert_split's.

    `split` is "train", "test", "train,test" or a sequence of those. Returns split -> SplitInfo.
    """
    splits = parse_splits(split)
    dataset = read_dataset(cub_root, not_visible_unknown=not_visible_unknown)
    label_source = ("cub-200-2011 image attributes: is_present 1 positive, 0 negative" +
                    ("; certainty 'not visible' unknown" if not_visible_unknown else ""))
    written = {}
    for name in splits:
        written[name] = common.convert_split(
            dataset.records[name], output_dir=output_dir, split=name,
            class_names=dataset.attribute_names, converter=CONVERTER,
            inputs={"cub_root": cub_root, "not_visible_unknown": not_visible_unknown},
            label_source=label_source, label_info={"image_class_names": dataset.species_names},
            **write_options)
    return written


def parse_splits(split: str | Sequence[str]) -> list[str]:
    names = [s.strip() for s in split.split(",")] if isinstance(split, str) else list(split)
    if not names or any(name not in SPLITS for name in names) or len(set(names)) != len(names):
        raise data.DataError(f"--split for CUB must be train, test or train,test; got {split!r}.")
    return names


class CubDataset:
    """The parsed CUB files: attribute and species names, and the Records of each split."""

    def __init__(self, attribute_names: list[str], species_names: list[str],
                 records: dict[str, list[common.Record]]):
        self.attribute_names = attribute_names
        self.species_names = species_names
        self.records = records


def read_dataset(cub_root: str, not_visible_unknown: bool = False) -> CubDataset:
    """Parses the CUB text files; DataError naming file and line for any malformed line."""
    images = _read_table(os.path.join(cub_root, "images.txt"), 2)
    is_train = _read_table(os.path.join(cub_root, "train_test_split.txt"), 2)
    image_class = _read_table(os.path.join(cub_root, "image_class_labels.txt"), 2)
    species = _read_table(os.path.join(cub_root, "classes.txt"), 2)
    attributes_path = _attributes_names_path(cub_root)
    attributes = _read_table(attributes_path, 2)
    labels_path = os.path.join(cub_root, "attributes", "image_attribute_labels.txt")

    species_names = _numbered_names(species, os.path.join(cub_root, "classes.txt"))
    attribute_names = _numbered_names(attributes, attributes_path)
    num_attributes = len(attribute_names)

    image_name: dict[str, str] = {}
    for number, (image_id, name) in images:
        if image_id in image_name:
            raise data.DataError(f"{os.path.join(cub_root, 'images.txt')} line {number}: image_id "
                                 f"{image_id!r} is listed twice.")
        image_name[image_id] = name
    image_ids = list(image_name)
    split_of = _image_map(is_train, image_name, os.path.join(cub_root, "train_test_split.txt"),
                          {"1": "train", "0": "test"})
    species_of = _image_map(image_class, image_name,
                            os.path.join(cub_root, "image_class_labels.txt"),
                            {str(i): i - 1 for i in range(1, len(species_names) + 1)})

    # image id -> attribute index -> +1 / -1 / 0 (unknown)
    values: dict[str, dict[int, int]] = {image_id: {} for image_id in image_ids}
    for number, fields in _read_rows(labels_path):
        where = f"{labels_path} line {number}"
        if not 4 <= len(fields) <= 6:
            raise data.DataError(f"{where}: expected 'image_id attribute_id is_present "
                                 f"certainty_id time', got {' '.join(fields)!r}.")
        image_id, attribute_id, is_present, certainty = fields[:4]
        if image_id not in values:
            raise data.DataError(f"{where}: image_id {image_id!r} is not in images.txt.")
        attribute = _int_in(attribute_id, 1, num_attributes, where, "attribute_id") - 1
        present = _int_in(is_present, 0, 1, where, "is_present")
        certainty_id = _int_in(certainty, 1, 4, where, "certainty_id")
        if attribute in values[image_id]:
            raise data.DataError(f"{where}: attribute {attribute + 1} of image {image_id} is "
                                 "labelled twice.")
        if not_visible_unknown and certainty_id == NOT_VISIBLE:
            values[image_id][attribute] = 0
        else:
            values[image_id][attribute] = 1 if present else -1

    records: dict[str, list[common.Record]] = {name: [] for name in SPLITS}
    for image_id in image_ids:
        labelled = values[image_id]
        if len(labelled) != num_attributes:
            missing = sorted(set(range(num_attributes)) - set(labelled))
            raise data.DataError(f"{labels_path}: image {image_id} has no line for attributes "
                                 f"{[m + 1 for m in missing[:10]]} ({len(missing)} missing); "
                                 "every image must list all attributes.")
        records[split_of[image_id]].append(common.Record(
            image_id=image_name[image_id],
            positives=sorted(a for a, v in labelled.items() if v == 1),
            negatives=sorted(a for a, v in labelled.items() if v == -1),
            source=f"image {image_id} ({image_name[image_id]})",
            image_path=os.path.join(cub_root, "images", image_name[image_id]),
            image_class=species_of[image_id]))
    return CubDataset(attribute_names, species_names, records)


def _attributes_names_path(cub_root: str) -> str:
    import tensorflow as tf

    candidates = [os.path.join(cub_root, "attributes", "attributes.txt"),
                  os.path.join(cub_root, "attributes.txt"),
                  os.path.join(os.path.dirname(os.path.normpath(cub_root)), "attributes.txt")]
    for path in candidates:
        if tf.io.gfile.exists(path):
            return path
    raise data.DataError(f"attribute names not found; looked for {candidates}. The official "
                         "archive ships attributes.txt next to CUB_200_2011/: copy it to "
                         f"{candidates[0]}.")


def _read_rows(path: str) -> list[tuple[int, list[str]]]:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise data.DataError(f"{path} not found; is --cub_root the CUB_200_2011 folder?")
    with tf.io.gfile.GFile(path, "r") as f:
        return [(n, line.split()) for n, line in enumerate(f.read().splitlines(), start=1)
                if line.strip()]


def _read_table(path: str, num_fields: int) -> list[tuple[int, list[str]]]:
    rows = _read_rows(path)
    for number, fields in rows:
        if len(fields) != num_fields:
            raise data.DataError(f"{path} line {number}: expected {num_fields} fields separated "
                                 f"by spaces, got {' '.join(fields)!r}.")
    if not rows:
        raise data.DataError(f"{path} is empty.")
    return rows


def _numbered_names(rows: list[tuple[int, list[str]]], path: str) -> list[str]:
    """Names of an `<id> <name>` file whose ids must be 1, 2, ... in order."""
    for position, (number, (number_text, _)) in enumerate(rows, start=1):
        if number_text != str(position):
            raise data.DataError(f"{path} line {number}: expected id {position}, got "
                                 f"{number_text!r}; ids must be 1, 2, ... in order.")
    return [name for _, (_, name) in rows]


def _image_map(rows: list[tuple[int, list[str]]], image_name: dict[str, str], path: str,
               allowed: dict[str, Any]) -> dict[str, Any]:
    """image id -> allowed[value] for an `<image_id> <value>` file covering every image once."""
    mapping: dict[str, Any] = {}
    for number, (image_id, value) in rows:
        where = f"{path} line {number}"
        if image_id not in image_name:
            raise data.DataError(f"{where}: image_id {image_id!r} is not in images.txt.")
        if image_id in mapping:
            raise data.DataError(f"{where}: image_id {image_id!r} is listed twice.")
        if value not in allowed:
            raise data.DataError(f"{where}: value {value!r} is not one of "
                                 f"{sorted(allowed)[:10]}.")
        mapping[image_id] = allowed[value]
    missing = sorted(set(image_name) - set(mapping), key=lambda s: (len(s), s))
    if missing:
        raise data.DataError(f"{path}: no line for images {missing[:10]} ({len(missing)} missing).")
    return mapping


def _int_in(text: str, low: int, high: int, where: str, name: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        raise data.DataError(f"{where}: {name} must be an integer in [{low}, {high}], got "
                             f"{text!r}.")
    return value


# ---- Command line -------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    common.define_flag(flags.DEFINE_string, "cub_root", None,
                       "The CUB_200_2011 folder (images.txt, images/, attributes/, ...).",
                       flag_values, required=True)
    common.define_flag(flags.DEFINE_boolean, "not_visible_unknown", False,
                       "Make attributes whose certainty is 'not visible' (certainty_id 1) unknown "
                       "instead of negative.", flag_values)
    # CUB defines --split itself (a list), before the common flags skip their own definition.
    common.define_flag(flags.DEFINE_string, "split", "train,test",
                       "Official split(s) to convert: train, test or train,test; each is written "
                       "as a split of that name.", flag_values)
    common.define_common_flags(flag_values)


def convert_from_flags(flag_values: flags.FlagValues) -> dict[str, data.SplitInfo]:
    return convert(flag_values.cub_root, not_visible_unknown=flag_values.not_visible_unknown,
                   **common.write_options(flag_values))


def run(argv: Sequence[str]) -> dict[str, data.SplitInfo]:
    """Parses argv (argv[0] is the program name) and converts; for tests and scripts."""
    return convert_from_flags(common.parse_flags(define_flags, argv))


def main(argv: Sequence[str]) -> None:
    common.run_main(convert_from_flags, argv)


if __name__ == "__main__":
    from tfrecords_tools import commands

    commands.run_tool("cub", define_flags, main)

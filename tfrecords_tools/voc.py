r"""PASCAL VOC 2007/2012 classification labels -> imcl_tf TFRecords.

    imcl-data voc --voc_root=VOCdevkit --year=2007 --image_set=trainval \
        --output_dir=data/voc2007 --split=train

--voc_root is the VOCdevkit folder (holding VOC<year>/) or the VOC<year> folder itself. The
images of ImageSets/Main/<image_set>.txt are read with Annotations/<id>.xml and
JPEGImages/<id>.jpg. The 20 classes are in the standard VOC order. Per image a class is positive
when it has at least one non-difficult object, UNKNOWN when all its objects are `difficult`
(the VOC evaluation ignores those), and negative when it has no object.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from typing import Any, Sequence

from absl import flags

from imcl_tf import data
from tfrecords_tools import common

CONVERTER = "tfrecords_tools.voc"
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)
YEARS = ("2007", "2012")
IMAGE_SETS = ("train", "val", "trainval", "test")
LABEL_SOURCE = ("pascal voc objects: class with a non-difficult object positive, only difficult "
                "objects unknown, no object negative")


def convert(voc_root: str, year: str, image_set: str, *, output_dir: str,
            **write_options: Any) -> data.SplitInfo:
    """Converts one VOC image set; `write_options` are common.convert_split's (split, ...)."""
    records = read_records(voc_root, year, image_set)
    return common.convert_split(
        records, output_dir=output_dir, class_names=list(VOC_CLASSES), converter=CONVERTER,
        inputs={"voc_root": voc_root, "year": str(year), "image_set": image_set},
        label_source=LABEL_SOURCE, **write_options)


def read_records(voc_root: str, year: str, image_set: str) -> list[common.Record]:
    """One Record per id of ImageSets/Main/<image_set>.txt, in file order."""
    import tensorflow as tf

    year = str(year)
    if year not in YEARS:
        raise data.DataError(f"--year must be one of {YEARS}, got {year!r}.")
    if image_set not in IMAGE_SETS:
        raise data.DataError(f"--image_set must be one of {IMAGE_SETS}, got {image_set!r}.")
    root = year_folder(voc_root, year)
    list_path = os.path.join(root, "ImageSets", "Main", f"{image_set}.txt")
    if not tf.io.gfile.exists(list_path):
        raise data.DataError(f"{list_path} not found; is --voc_root a VOCdevkit folder with "
                             f"VOC{year}/ImageSets/Main/{image_set}.txt?")
    with tf.io.gfile.GFile(list_path, "r") as f:
        lines = f.read().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1:
            raise data.DataError(f"{list_path} line {number}: expected one image id, got {line!r}.")
        image_id = fields[0]
        xml_path = os.path.join(root, "Annotations", f"{image_id}.xml")
        positives, unknown = parse_annotation(xml_path)
        negatives = sorted(set(range(len(VOC_CLASSES))) - positives - unknown)
        records.append(common.Record(
            image_id=image_id, positives=sorted(positives), negatives=negatives,
            source=f"{list_path} line {number} (id {image_id})",
            image_path=os.path.join(root, "JPEGImages", f"{image_id}.jpg")))
    return records


def year_folder(voc_root: str, year: str) -> str:
    """The VOC<year> folder: `voc_root` itself when it holds ImageSets/, else voc_root/VOC<year>."""
    import tensorflow as tf

    if tf.io.gfile.isdir(os.path.join(voc_root, "ImageSets")):
        return voc_root
    return os.path.join(voc_root, f"VOC{year}")


def parse_annotation(xml_path: str) -> tuple[set[int], set[int]]:
    """Returns (positive class indices, unknown class indices: only difficult objects)."""
    import tensorflow as tf

    if not tf.io.gfile.exists(xml_path):
        raise data.DataError(f"annotation {xml_path} not found (the VOC2012 test set has no public "
                             "annotations; use train, val or trainval).")
    with tf.io.gfile.GFile(xml_path, "rb") as f:
        try:
            tree = ElementTree.fromstring(f.read())
        except ElementTree.ParseError as e:
            raise data.DataError(f"{xml_path}: malformed XML ({e}).") from e
    clear: set[int] = set()
    difficult: set[int] = set()
    for number, obj in enumerate(tree.iter("object"), start=1):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise data.DataError(f"{xml_path}: object {number} has class {name!r}, which is not "
                                 f"one of the 20 VOC classes {list(VOC_CLASSES)}.")
        flag = (obj.findtext("difficult") or "0").strip()
        if flag not in ("0", "1"):
            raise data.DataError(f"{xml_path}: object {number} ({name}) has <difficult>{flag}"
                                 "</difficult>; expected 0 or 1.")
        (difficult if flag == "1" else clear).add(VOC_CLASSES.index(name))
    return clear, difficult - clear


# ---- Command line -------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    common.define_flag(flags.DEFINE_string, "voc_root", None,
                       "VOCdevkit folder (holding VOC<year>/) or the VOC<year> folder itself.",
                       flag_values, required=True)
    common.define_flag(flags.DEFINE_enum, "year", None, "VOC edition.", flag_values,
                       required=True, enum_values=list(YEARS))
    common.define_flag(flags.DEFINE_enum, "image_set", None,
                       "Image list ImageSets/Main/<image_set>.txt to convert.", flag_values,
                       required=True, enum_values=list(IMAGE_SETS))
    common.define_common_flags(flag_values)


def convert_from_flags(flag_values: flags.FlagValues) -> data.SplitInfo:
    return convert(flag_values.voc_root, flag_values.year, flag_values.image_set,
                   **common.write_options(flag_values))


def run(argv: Sequence[str]) -> data.SplitInfo:
    """Parses argv (argv[0] is the program name) and converts; for tests and scripts."""
    return convert_from_flags(common.parse_flags(define_flags, argv))


def main(argv: Sequence[str]) -> None:
    common.run_main(convert_from_flags, argv)


if __name__ == "__main__":
    from tfrecords_tools import commands

    commands.run_tool("voc", define_flags, main)

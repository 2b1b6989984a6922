r"""MS-COCO instances annotations -> imcl_tf TFRecords (one image-level multi-label row per image).

    imcl-data coco --annotations=annotations/instances_train2017.json \
        --images_dir=train2017 --output_dir=data/coco --split=train --num_shards=64

Classes are the json's categories in category-id order (the 80 object categories of COCO 2017),
named by their `name`. COCO labels are exhaustive: every category with at least one annotation in
an image (crowd annotations included) is positive, every other category is a known NEGATIVE.
An image without any annotation (about 1% of COCO) therefore has all classes negative.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

from absl import flags

from imcl_tf import data
from tfrecords_tools import common

CONVERTER = "tfrecords_tools.coco"
LABEL_SOURCE = ("coco instances (exhaustive): annotated categories positive, crowd included; "
                "all other categories negative")


def convert(annotations: str, images_dir: str, *, output_dir: str,
            **write_options: Any) -> data.SplitInfo:
    """Converts one COCO split; `write_options` are common.convert_split's (split, ...)."""
    class_names, records = read_records(annotations, images_dir)
    return common.convert_split(
        records, output_dir=output_dir, class_names=class_names, converter=CONVERTER,
        inputs={"annotations": annotations, "images_dir": images_dir},
        label_source=LABEL_SOURCE, **write_options)


def read_records(annotations: str, images_dir: str) -> tuple[list[str], list[common.Record]]:
    """Parses an instances_*.json into (class names, one Record per image in json order)."""
    coco = _load_json(annotations)
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco.get(key), list):
            raise data.DataError(f"{annotations}: no {key!r} list; expected a COCO "
                                 "instances_*.json (captions and keypoints files are not "
                                 "instance annotations).")
    categories = sorted(coco["categories"], key=lambda c: _field(c, "id", annotations, "category"))
    class_names = [str(_field(c, "name", annotations, "category")) for c in categories]
    class_of_category = {c["id"]: index for index, c in enumerate(categories)}
    if len(class_of_category) != len(categories):
        raise data.DataError(f"{annotations}: repeated category ids in 'categories'.")

    images: dict[Any, dict[str, Any]] = {}
    for image in coco["images"]:
        image_id = _field(image, "id", annotations, "image")
        if image_id in images:
            raise data.DataError(f"{annotations}: image id {image_id} is listed twice in 'images'.")
        _field(image, "file_name", annotations, f"image {image_id}")
        images[image_id] = image

    present: dict[Any, set[int]] = {image_id: set() for image_id in images}
    for number, annotation in enumerate(coco["annotations"]):
        where = f"annotation {annotation.get('id', '#' + str(number))}"
        image_id = _field(annotation, "image_id", annotations, where)
        category_id = _field(annotation, "category_id", annotations, where)
        if image_id not in images:
            raise data.DataError(f"{annotations}: {where} refers to image_id {image_id!r}, "
                                 "which is not in 'images'.")
        if category_id not in class_of_category:
            raise data.DataError(f"{annotations}: {where} has category_id {category_id!r}, "
                                 "which is not in 'categories' (ids "
                                 f"{sorted(class_of_category)[:10]}...).")
        # iscrowd=1 marks a crowd of objects of the category: the category is present.
        present[image_id].add(class_of_category[category_id])

    num_classes = len(class_names)
    records = []
    for image_id, image in images.items():
        positives = sorted(present[image_id])
        negatives = sorted(set(range(num_classes)) - present[image_id])
        records.append(common.Record(
            image_id=str(image_id), positives=positives, negatives=negatives,
            source=f"{annotations} image {image_id} ({image['file_name']})",
            image_path=os.path.join(images_dir, image["file_name"])))
    return class_names, records


def _load_json(path: str) -> dict[str, Any]:
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise data.DataError(f"--annotations {path} not found.")
    with tf.io.gfile.GFile(path, "r") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise data.DataError(f"{path}: not valid JSON ({e}).") from e
    if not isinstance(obj, dict):
        raise data.DataError(f"{path}: expected a JSON object at the top level, got "
                             f"{type(obj).__name__}.")
    return obj


def _field(obj: Any, key: str, path: str, where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise data.DataError(f"{path}: {where} has no {key!r} field: {str(obj)[:200]}")
    return obj[key]


# ---- Command line -------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    common.define_flag(flags.DEFINE_string, "annotations", None,
                       "COCO instances_*.json (e.g. annotations/instances_train2017.json).",
                       flag_values, required=True)
    common.define_flag(flags.DEFINE_string, "images_dir", None,
                       "Folder holding the images named by the json's file_name fields.",
                       flag_values, required=True)
    common.define_common_flags(flag_values)


def convert_from_flags(flag_values: flags.FlagValues) -> data.SplitInfo:
    return convert(flag_values.annotations, flag_values.images_dir,
                   **common.write_options(flag_values))


def run(argv: Sequence[str]) -> data.SplitInfo:
    """Parses argv (argv[0] is the program name) and converts; for tests and scripts."""
    return convert_from_flags(common.parse_flags(define_flags, argv))


def main(argv: Sequence[str]) -> None:
    common.run_main(convert_from_flags, argv)


if __name__ == "__main__":
    from tfrecords_tools import commands

    commands.run_tool("coco", define_flags, main)

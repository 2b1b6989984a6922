r"""A custom image list with partial labels (CSV or JSONL manifest) -> imcl_tf TFRecords.

    imcl-data manifest --manifest=train.csv --images_dir=photos \
        --classes=classes.txt --output_dir=data/mine --split=train

--classes is a text file with one class name per line (blank lines ignored); its order is the
class order. The manifest lists one image per row with the classes known present and known absent;
every class not listed is UNKNOWN.

CSV (header required): columns `image,positives,negatives` and optionally `id`. A label field holds
class names separated by ';' or '|' (so class names cannot contain those characters); spaces
around names are ignored; an empty field means none. Example:
    image,positives,negatives
    cats/001.jpg,cat;sofa,dog
JSONL: one object per line, {"image": "cats/001.jpg", "positives": ["cat"], "negatives": ["dog"],
"id": "optional"}; "positives" and "negatives" may be omitted (no label of that kind).

`image` is a path relative to --images_dir (or absolute). The record id is `id` when given, else
the image path as written in the manifest. The format follows the extension (.csv; .jsonl or
.ndjson) unless --manifest_format says it.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import os
import re
from typing import Any, Iterator, Sequence

from absl import flags

from imcl_tf import data
from tfrecords_tools import common

CONVERTER = "tfrecords_tools.manifest"
FORMATS = ("csv", "jsonl")
NAME_SEPARATORS = re.compile(r"[;|]")
LABEL_SOURCE = "manifest: listed positives and negatives, unlisted classes unknown"


def convert(manifest: str, images_dir: str, classes: str, *, output_dir: str,
            manifest_format: str | None = None, **write_options: Any) -> data.SplitInfo:
    """Converts one manifest; `write_options` are common.convert_split's (split, ...)."""
    class_names = read_class_names(classes)
    records = read_records(manifest, images_dir, class_names, manifest_format)
    return common.convert_split(
        records, output_dir=output_dir, class_names=class_names, converter=CONVERTER,
        inputs={"manifest": manifest, "images_dir": images_dir, "classes": classes,
                "manifest_format": manifest_format},
        label_source=LABEL_SOURCE, **write_options)


def read_class_names(path: str) -> list[str]:
    """Class names, one per line; DataError on a repeated name or a name with ';' or '|'."""
    import tensorflow as tf

    if not tf.io.gfile.exists(path):
        raise data.DataError(f"--classes {path} not found.")
    with tf.io.gfile.GFile(path, "r") as f:
        lines = f.read().splitlines()
    names: list[str] = []
    line_of: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        if NAME_SEPARATORS.search(name):
            raise data.DataError(f"{path} line {number}: class name {name!r} contains ';' or '|', "
                                 "which separate names in manifests; rename the class.")
        if name in line_of:
            raise data.DataError(f"{path} line {number}: class {name!r} already listed on line "
                                 f"{line_of[name]}.")
        line_of[name] = number
        names.append(name)
    if not names:
        raise data.DataError(f"{path} lists no class name.")
    return names


def read_records(manifest: str, images_dir: str, class_names: Sequence[str],
                 manifest_format: str | None = None) -> list[common.Record]:
    """One Record per manifest row, in file order; DataError naming the line for any bad row."""
    import tensorflow as tf

    manifest_format = manifest_format or _format_from_extension(manifest)
    if manifest_format not in FORMATS:
        raise data.DataError(f"--manifest_format must be one of {FORMATS}, got "
                             f"{manifest_format!r}.")
    if not tf.io.gfile.exists(manifest):
        raise data.DataError(f"--manifest {manifest} not found.")
    with tf.io.gfile.GFile(manifest, "r") as f:
        text = f.read().lstrip("\ufeff")  # spreadsheet programs may start CSV files with a BOM
    rows = _csv_rows(text, manifest) if manifest_format == "csv" else _jsonl_rows(text, manifest)
    class_index = {name: i for i, name in enumerate(class_names)}
    records = []
    for number, image, positive_names, negative_names, image_id in rows:
        where = f"{manifest} line {number}"
        if not image:
            raise data.DataError(f"{where}: empty image path.")
        positives = _indices(positive_names, class_index, where, "positives")
        negatives = _indices(negative_names, class_index, where, "negatives")
        both = sorted(set(positives) & set(negatives))
        if both:
            raise data.DataError(f"{where}: {[class_names[i] for i in both]} listed both as "
                                 "positive and negative; a class is present, absent, or unknown "
                                 "(leave it out).")
        records.append(common.Record(
            image_id=image_id or image, positives=positives, negatives=negatives,
            source=f"{where} ({image})", image_path=os.path.join(images_dir, image)))
    return records


def _format_from_extension(path: str) -> str:
    extension = os.path.splitext(path)[1].lower()
    if extension == ".csv":
        return "csv"
    if extension in (".jsonl", ".ndjson"):
        return "jsonl"
    raise data.DataError(f"cannot tell the format of --manifest {path} from its extension "
                         f"{extension!r}; name it .csv or .jsonl, or pass --manifest_format.")


def _csv_rows(text: str, path: str) -> Iterator[tuple[int, str, list[str], list[str], str | None]]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    columns = [c.strip() for c in header or []]
    needed = ["image", "positives", "negatives"]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise data.DataError(f"{path} line 1: header {columns} lacks columns {missing}; the CSV "
                             "manifest needs a header image,positives,negatives[,id].")
    position = {c: columns.index(c) for c in needed + (["id"] if "id" in columns else [])}
    for row in reader:
        number = reader.line_num
        if not any(field.strip() for field in row):
            continue
        if len(row) != len(columns):
            raise data.DataError(f"{path} line {number}: {len(row)} fields for {len(columns)} "
                                 f"columns {columns}: {row}")
        image_id = row[position["id"]].strip() if "id" in position else ""
        yield (number, row[position["image"]].strip(), _split_names(row[position["positives"]]),
               _split_names(row[position["negatives"]]), image_id or None)


def _split_names(field: str) -> list[str]:
    return [name.strip() for name in NAME_SEPARATORS.split(field) if name.strip()]


def _jsonl_rows(text: str, path: str
                ) -> Iterator[tuple[int, str, list[str], list[str], str | None]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise data.DataError(f"{where}: not valid JSON ({e}).") from e
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise data.DataError(f"{where}: expected an object with a string 'image', got "
                                 f"{line[:200]!r}.")
        unexpected = sorted(set(row) - {"image", "positives", "negatives", "id"})
        if unexpected:
            raise data.DataError(f"{where}: unexpected keys {unexpected}; allowed are image, "
                                 "positives, negatives, id.")
        names = {}
        for key in ("positives", "negatives"):
            value = row.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise data.DataError(f"{where}: {key!r} must be a list of class names, got "
                                     f"{value!r}.")
            names[key] = [v.strip() for v in value]
        image_id = row.get("id")
        if image_id is not None and not isinstance(image_id, (str, int)):
            raise data.DataError(f"{where}: 'id' must be a string or integer, got {image_id!r}.")
        yield (number, row["image"].strip(), names["positives"], names["negatives"],
               None if image_id is None else str(image_id))


def _indices(names: Sequence[str], class_index: dict[str, int], where: str,
             column: str) -> list[int]:
    indices = []
    for name in names:
        if name not in class_index:
            close = difflib.get_close_matches(name, list(class_index), n=3)
            hint = f"did you mean {close}? " if close else ""
            raise data.DataError(f"{where}: unknown class {name!r} in {column}; {hint}valid names "
                                 f"include {list(class_index)[:5]} ({len(class_index)} in "
                                 "--classes).")
        indices.append(class_index[name])
    return sorted(set(indices))  # a name given twice in one list is the same label


# ---- Command line -------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    common.define_flag(flags.DEFINE_string, "manifest", None,
                       "CSV (image,positives,negatives[,id]) or JSONL manifest, one image per row.",
                       flag_values, required=True)
    common.define_flag(flags.DEFINE_string, "images_dir", None,
                       "Folder the manifest's image paths are relative to.", flag_values,
                       required=True)
    common.define_flag(flags.DEFINE_string, "classes", None,
                       "Text file with one class name per line (the class order).", flag_values,
                       required=True)
    common.define_flag(flags.DEFINE_enum, "manifest_format", None,
                       "Format of --manifest; by default from its extension (.csv, .jsonl).",
                       flag_values, enum_values=list(FORMATS))
    common.define_common_flags(flag_values)


def convert_from_flags(flag_values: flags.FlagValues) -> data.SplitInfo:
    return convert(flag_values.manifest, flag_values.images_dir, flag_values.classes,
                   manifest_format=flag_values.manifest_format,
                   **common.write_options(flag_values))


def run(argv: Sequence[str]) -> data.SplitInfo:
    """Parses argv (argv[0] is the program name) and converts; for tests and scripts."""
    return convert_from_flags(common.parse_flags(define_flags, argv))


def main(argv: Sequence[str]) -> None:
    common.run_main(convert_from_flags, argv)


if __name__ == "__main__":
    from tfrecords_tools import commands

    commands.run_tool("manifest", define_flags, main)

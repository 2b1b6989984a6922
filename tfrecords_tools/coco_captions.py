r"""MS-COCO captions -> a caption-WORD label dataset (the paper's MS-COCO 1k setting).

    imcl-data coco_captions --captions=annotations/captions_train2014.json \
        --images_dir=train2014 --output_dir=data/coco_words --split=train --num_shards=64
    imcl-data coco_captions --captions=annotations/captions_val2014.json \
        --images_dir=val2014 --output_dir=data/coco_words --split=test --num_shards=32 \
        --vocabulary=data/coco_words --unmentioned=negative

Classes are vocabulary words. By default the vocabulary is the --vocabulary_size (1,000, as in
the paper) most frequent words of the split's captions, counted as token occurrences over all
captions, ties broken alphabetically; --vocabulary gives it instead, as a text file (one word a
line; further tab- or space-separated fields such as a part-of-speech tag are ignored, so the
Fang et al. 1k vocabulary can be used as it is) or as a dataset folder whose class names are
reused (give the training folder when converting val/test, so every split has the same classes).

Tokenisation (`tokenize`): lowercase; a possessive "'s" at the end of a word is dropped
("man's" -> "man"); the other apostrophes are deleted ("don't" -> "dont"); the tokens are the
maximal runs of letters and digits, everything else separates them.

Labels: a vocabulary word is POSITIVE for an image when it occurs in at least --min_captions of
the image's captions (1 by default: mentioned in any caption). Unmentioned words are UNKNOWN by
default (--unmentioned=unknown): a caption not naming a thing is no evidence it is absent, and
IMCL's smoothness term treats them as unknown. The paper's cross-entropy counts them as negatives;
that is a training option, not a dataset property. For an evaluation split give
--unmentioned=negative (the paper's test labels: every unmentioned word is absent), otherwise AP
has no negatives. Images without any caption are left out and counted in dataset.json.
"""

from __future__ import annotations

import collections
import os
import re
from typing import Any, Sequence

from absl import flags

from imcl_tf import data
from tfrecords_tools import common
from tfrecords_tools.coco import _field, _load_json

CONVERTER = "tfrecords_tools.coco_captions"
UNMENTIONED_CHOICES = ("unknown", "negative")
DEFAULT_VOCABULARY_SIZE = 1000
TOKENIZATION = ("lowercase; drop a word-final possessive 's; delete other apostrophes; tokens = "
                "maximal runs of letters and digits")

_POSSESSIVE = re.compile(r"'s\b")
_TOKEN = re.compile(r"[^\W_]+")  # letters and digits (Unicode), not the underscore


def tokenize(caption: str) -> list[str]:
    """The word tokens of one caption (see the module docstring for the rule)."""
    text = _POSSESSIVE.sub("", caption.lower().replace("\u2019", "'")).replace("'", "")
    return _TOKEN.findall(text)


def convert(captions: str, images_dir: str, *, output_dir: str,
            vocabulary: str | None = None,
            vocabulary_size: int = DEFAULT_VOCABULARY_SIZE,
            min_captions: int = 1,
            unmentioned: str = "unknown",
            **write_options: Any) -> data.SplitInfo:
    """Converts one COCO captions split; `write_options` are common.convert_split's (split, ...)."""
    class_names, records, counts, vocabulary_source = read_records(
        captions, images_dir, vocabulary=vocabulary, vocabulary_size=vocabulary_size,
        min_captions=min_captions, unmentioned=unmentioned)
    label_source = (f"coco captions: a vocabulary word is positive when it occurs in >= "
                    f"{min_captions} of the image's captions; unmentioned words are "
                    f"{'negative' if unmentioned == 'negative' else 'unknown'}")
    return common.convert_split(
        records, output_dir=output_dir, class_names=class_names, converter=CONVERTER,
        inputs={"captions": captions, "images_dir": images_dir, "vocabulary": vocabulary or "",
                "vocabulary_size": vocabulary_size, "min_captions": min_captions,
                "unmentioned": unmentioned},
        label_source=label_source,
        label_info={"vocabulary": vocabulary_source, "tokenization": TOKENIZATION},
        split_label_info={**counts, "unmentioned": unmentioned, "min_captions": min_captions},
        **write_options)


def read_records(captions: str, images_dir: str, *, vocabulary: str | None = None,
                 vocabulary_size: int = DEFAULT_VOCABULARY_SIZE, min_captions: int = 1,
                 unmentioned: str = "unknown"
                 ) -> tuple[list[str], list[common.Record], dict[str, int], str]:
    """Parses a captions_*.json into (vocabulary, Records in json order, counts, vocabulary source).

    counts: images_without_captions (left out), images_without_vocabulary_words (kept; no
    positive), num_captions.
    """
    if unmentioned not in UNMENTIONED_CHOICES:
        raise data.DataError(f"--unmentioned must be one of {UNMENTIONED_CHOICES}, got "
                             f"{unmentioned!r}.")
    if min_captions < 1:
        raise data.DataError(f"--min_captions must be >= 1, got {min_captions}.")
    if vocabulary is None and vocabulary_size < 1:
        raise data.DataError(f"--vocabulary_size must be >= 1, got {vocabulary_size}.")
    coco = _load_json(captions)
    for key in ("images", "annotations"):
        if not isinstance(coco.get(key), list):
            raise data.DataError(f"{captions}: no {key!r} list; expected a COCO captions_*.json.")
    images: dict[Any, dict[str, Any]] = {}
    for image in coco["images"]:
        image_id = _field(image, "id", captions, "image")
        if image_id in images:
            raise data.DataError(f"{captions}: image id {image_id} is listed twice in 'images'.")
        _field(image, "file_name", captions, f"image {image_id}")
        images[image_id] = image

    tokens_of: dict[Any, list[set[str]]] = {image_id: [] for image_id in images}
    occurrences: collections.Counter[str] = collections.Counter()
    for number, annotation in enumerate(coco["annotations"]):
        where = f"annotation {annotation.get('id', '#' + str(number))}" \
            if isinstance(annotation, dict) else f"annotation #{number}"
        image_id = _field(annotation, "image_id", captions, where)
        caption = _field(annotation, "caption", captions, where)
        if not isinstance(caption, str):
            raise data.DataError(f"{captions}: {where} has a caption that is not a string: "
                                 f"{str(caption)[:100]!r}. Is this a captions_*.json?")
        if image_id not in images:
            raise data.DataError(f"{captions}: {where} refers to image_id {image_id!r}, which is "
                                 "not in 'images'.")
        tokens = tokenize(caption)
        occurrences.update(tokens)
        tokens_of[image_id].append(set(tokens))

    if vocabulary is None:
        ranked = sorted(occurrences.items(), key=lambda item: (-item[1], item[0]))
        class_names = [word for word, _ in ranked[:vocabulary_size]]
        if not class_names:
            raise data.DataError(f"{captions}: the captions contain no words; nothing to label.")
        vocabulary_source = (f"top {len(class_names)} words by token frequency in {captions}"
                             + (f" (only {len(class_names)} distinct words, fewer than "
                                f"--vocabulary_size={vocabulary_size})"
                                if len(class_names) < vocabulary_size else ""))
    else:
        class_names = read_vocabulary(vocabulary)
        vocabulary_source = f"given: {vocabulary}"
    class_of = {word: index for index, word in enumerate(class_names)}

    counts = {"images_without_captions": 0, "images_without_vocabulary_words": 0,
              "num_captions": sum(len(v) for v in tokens_of.values())}
    records = []
    for image_id, image in images.items():
        caption_tokens = tokens_of[image_id]
        if not caption_tokens:
            counts["images_without_captions"] += 1
            continue
        mentions = collections.Counter(word for tokens in caption_tokens for word in tokens
                                       if word in class_of)
        positives = sorted(class_of[w] for w, n in mentions.items() if n >= min_captions)
        if not positives:
            counts["images_without_vocabulary_words"] += 1
        negatives = (sorted(set(range(len(class_names))) - set(positives))
                     if unmentioned == "negative" else [])
        records.append(common.Record(
            image_id=str(image_id), positives=positives, negatives=negatives,
            source=f"{captions} image {image_id} ({image['file_name']})",
            image_path=os.path.join(images_dir, image["file_name"])))
    if not records:
        raise data.DataError(f"{captions}: no image has a caption; nothing to convert.")
    return class_names, records, counts, vocabulary_source


def read_vocabulary(path: str) -> list[str]:
    """The words of a vocabulary file (first field of every non-empty line) or dataset folder."""
    import tensorflow as tf

    if tf.io.gfile.isdir(path):
        if not tf.io.gfile.exists(os.path.join(path, data.DATASET_JSON)):
            raise data.DataError(f"--vocabulary {path} is a folder without {data.DATASET_JSON}; "
                                 "give a vocabulary file or a dataset folder written by this "
                                 "converter.")
        return list(data.load_dataset_info(path).class_names)
    if not tf.io.gfile.exists(path):
        raise data.DataError(f"--vocabulary {path} not found.")
    with tf.io.gfile.GFile(path, "r") as f:
        lines = f.read().splitlines()
    words, first_line = [], {}
    for number, line in enumerate(lines, start=1):
        fields = line.split()
        if not fields:
            continue
        word = fields[0]
        if tokenize(word) != [word]:
            raise data.DataError(f"{path} line {number}: {word!r} is not a single lowercase "
                                 f"token, so no caption can contain it (tokenisation: "
                                 f"{TOKENIZATION}); it would tokenise as {tokenize(word)}.")
        if word in first_line:
            raise data.DataError(f"{path} line {number}: {word!r} is repeated (first on line "
                                 f"{first_line[word]}); every word is one class.")
        first_line[word] = number
        words.append(word)
    if not words:
        raise data.DataError(f"--vocabulary {path} has no words.")
    return words


# ---- Command line -------------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    common.define_flag(flags.DEFINE_string, "captions", None,
                       "COCO captions_*.json (e.g. annotations/captions_train2014.json).",
                       flag_values, required=True)
    common.define_flag(flags.DEFINE_string, "images_dir", None,
                       "Folder holding the images named by the json's file_name fields.",
                       flag_values, required=True)
    common.define_flag(flags.DEFINE_string, "vocabulary", None,
                       "Vocabulary file (one word a line; extra fields ignored) or a dataset "
                       "folder whose class names to reuse. Default: the --vocabulary_size most "
                       "frequent caption words of this split.", flag_values)
    common.define_flag(flags.DEFINE_integer, "vocabulary_size", DEFAULT_VOCABULARY_SIZE,
                       "Number of most frequent words kept when --vocabulary is not given.",
                       flag_values, lower_bound=1)
    common.define_flag(flags.DEFINE_integer, "min_captions", 1,
                       "A word is positive when it occurs in at least this many of the image's "
                       "captions.", flag_values, lower_bound=1)
    common.define_flag(flags.DEFINE_enum, "unmentioned", "unknown",
                       "What an unmentioned vocabulary word is: unknown (training splits) or "
                       "negative (evaluation splits, the paper's test labels).", flag_values,
                       enum_values=list(UNMENTIONED_CHOICES))
    common.define_common_flags(flag_values)


def convert_from_flags(flag_values: flags.FlagValues) -> data.SplitInfo:
    return convert(flag_values.captions, flag_values.images_dir,
                   vocabulary=flag_values.vocabulary,
                   vocabulary_size=flag_values.vocabulary_size,
                   min_captions=flag_values.min_captions,
                   unmentioned=flag_values.unmentioned,
                   **common.write_options(flag_values))


def run(argv: Sequence[str]) -> data.SplitInfo:
    """Parses argv (argv[0] is the program name) and converts; for tests and scripts."""
    return convert_from_flags(common.parse_flags(define_flags, argv))


def main(argv: Sequence[str]) -> None:
    common.run_main(convert_from_flags, argv)


if __name__ == "__main__":
    from tfrecords_tools import commands

    commands.run_tool("coco_captions", define_flags, main)

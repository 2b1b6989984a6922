"""tfrecords_tools.coco_captions: caption words as labels, on a tiny made-up captions json."""

import collections
import json
import os
import subprocess
import sys

import pytest

from imcl_tf import data
from test_converters import labels_of, quiet, read_split, write_image
from tfrecords_tools import coco_captions

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CAPTIONS = {
    1: ["A man riding a horse.", "A man's horse on the beach", "Man with his horse"],
    2: ["Two dogs play on the beach", "A dog and a ball"],
    3: ["A red bus on a street", "The bus doesn't stop."],
    4: [],  # no caption: left out
}


def write_captions(tmp_path, captions=CAPTIONS, extra_annotations=()):
    images_dir = tmp_path / "train2014"
    images, annotations = [], []
    for image_id, texts in captions.items():
        name = f"COCO_train2014_{image_id:012d}.jpg"
        images.append({"id": image_id, "file_name": name})
        write_image(str(images_dir / name), image_id)
        for text in texts:
            annotations.append({"id": 100 + len(annotations), "image_id": image_id,
                                "caption": text})
    path = tmp_path / "captions_train2014.json"
    path.write_text(json.dumps({"images": images,
                                "annotations": annotations + list(extra_annotations)}))
    return str(path), str(images_dir)


def reference_labels(captions, vocabulary, min_captions, unmentioned):
    """Per image: the vocabulary words mentioned in >= min_captions captions, by a plain loop."""
    expected = {}
    for image_id, texts in captions.items():
        if not texts:
            continue
        positives = []
        for index, word in enumerate(vocabulary):
            mentioned = sum(1 for t in texts if word in coco_captions.tokenize(t))
            if mentioned >= min_captions:
                positives.append(index)
        negatives = ([i for i in range(len(vocabulary)) if i not in positives]
                     if unmentioned == "negative" else [])
        expected[str(image_id)] = (positives, negatives)
    return expected


def test_tokenize_follows_the_written_rule():
    assert coco_captions.tokenize("A man's horse, on the BEACH!") == [
        "a", "man", "horse", "on", "the", "beach"]
    assert coco_captions.tokenize("The bus doesn't stop.") == ["the", "bus", "doesnt", "stop"]
    assert coco_captions.tokenize("two-way 3 cats_and\tdogs") == [
        "two", "way", "3", "cats", "and", "dogs"]
    assert coco_captions.tokenize("  ") == []


def test_top_n_vocabulary_by_token_frequency_ties_alphabetical(tmp_path):
    captions, images_dir = write_captions(tmp_path)
    out = str(tmp_path / "out")
    coco_captions.convert(captions, images_dir, output_dir=out, vocabulary_size=5,
                          num_shards=2, stream=quiet())
    tokens = collections.Counter(w for texts in CAPTIONS.values() for t in texts
                                 for w in coco_captions.tokenize(t))
    expected_vocabulary = [w for w, _ in sorted(tokens.items(), key=lambda i: (-i[1], i[0]))][:5]
    info = data.load_dataset_info(out)
    assert info.class_names == expected_vocabulary
    assert info.class_names[:3] == ["a", "horse", "man"]  # 7, 3, 3 occurrences
    # Unmentioned words are unknown: only positives are written.
    assert labels_of(read_split(out, "train")) == reference_labels(
        CAPTIONS, expected_vocabulary, 1, "unknown")
    counts = info.labels["splits"]["train"]
    assert counts["images_without_captions"] == 1 and counts["num_captions"] == 7
    assert counts["unmentioned"] == "unknown"
    assert info.labels["tokenization"] == coco_captions.TOKENIZATION
    assert info.provenance["converter"] == "tfrecords_tools.coco_captions"


@pytest.mark.parametrize("min_captions, unmentioned", [(1, "negative"), (2, "unknown"),
                                                        (3, "negative")])
def test_given_vocabulary_file_min_captions_and_negatives(tmp_path, min_captions, unmentioned):
    captions, images_dir = write_captions(tmp_path)
    vocabulary_file = tmp_path / "vocab.txt"
    # Extra fields (a POS tag) are ignored; blank lines skipped; "zebra" is never mentioned.
    vocabulary_file.write_text("horse\tNN\nbeach NN\n\nbus\ndog\nzebra\nman\n")
    vocabulary = ["horse", "beach", "bus", "dog", "zebra", "man"]
    out = str(tmp_path / "out")
    coco_captions.convert(captions, images_dir, output_dir=out, vocabulary=str(vocabulary_file),
                          min_captions=min_captions, unmentioned=unmentioned, stream=quiet())
    assert data.load_dataset_info(out).class_names == vocabulary
    assert labels_of(read_split(out, "train")) == reference_labels(
        CAPTIONS, vocabulary, min_captions, unmentioned)


def test_a_dataset_folder_gives_the_vocabulary_of_another_split(tmp_path):
    captions, images_dir = write_captions(tmp_path)
    out = str(tmp_path / "out")
    coco_captions.convert(captions, images_dir, output_dir=out, vocabulary_size=4,
                          stream=quiet())
    train_words = data.load_dataset_info(out).class_names
    other = {7: ["A horse and a bus"], 8: ["Nothing we know of here"]}
    other_dir = tmp_path / "val"
    os.makedirs(other_dir)
    val_captions, val_images = write_captions(other_dir, other)
    coco_captions.convert(val_captions, val_images, output_dir=out, split="test",
                          vocabulary=out, unmentioned="negative", stream=quiet())
    info = data.load_dataset_info(out)
    assert info.class_names == train_words and set(info.splits) == {"train", "test"}
    assert labels_of(read_split(out, "test")) == reference_labels(
        other, train_words, 1, "negative")
    assert train_words == ["a", "horse", "man", "on"]  # "on" wins the tie of 3 with "the"
    assert info.labels["splits"]["test"]["images_without_vocabulary_words"] == 1  # image 8


@pytest.mark.parametrize("vocabulary_text, message", [
    ("horse\nHorse\n", "not a single lowercase token"),
    ("horse\nice cream\nhorse\n", "'horse' is repeated \\(first on line 1\\)"),
    ("\n\n", "has no words"),
])
def test_bad_vocabulary_files_name_the_line(tmp_path, vocabulary_text, message):
    captions, images_dir = write_captions(tmp_path)
    path = tmp_path / "vocab.txt"
    path.write_text(vocabulary_text)
    with pytest.raises(data.DataError, match=message):
        coco_captions.convert(captions, images_dir, output_dir=str(tmp_path / "o"),
                              vocabulary=str(path), stream=quiet())


def test_bad_captions_files_name_the_annotation(tmp_path):
    captions, images_dir = write_captions(
        tmp_path, extra_annotations=[{"id": 9, "image_id": 77, "caption": "a cat"}])
    with pytest.raises(data.DataError, match="annotation 9 refers to image_id 77"):
        coco_captions.convert(captions, images_dir, output_dir=str(tmp_path / "o"),
                              stream=quiet())
    captions, images_dir = write_captions(
        tmp_path, extra_annotations=[{"id": 9, "image_id": 1, "caption": ["a", "cat"]}])
    with pytest.raises(data.DataError, match="annotation 9 has a caption that is not a string"):
        coco_captions.convert(captions, images_dir, output_dir=str(tmp_path / "o"),
                              stream=quiet())
    instances = tmp_path / "instances.json"
    instances.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(data.DataError, match="no 'annotations' list"):
        coco_captions.convert(str(instances), images_dir, output_dir=str(tmp_path / "o"),
                              stream=quiet())


def test_command_line_without_traceback(tmp_path):
    captions, images_dir = write_captions(tmp_path)
    out = str(tmp_path / "out")
    info = coco_captions.run(["coco_captions", f"--captions={captions}",
                              f"--images_dir={images_dir}", f"--output_dir={out}",
                              "--vocabulary_size=3", "--unmentioned=negative"])
    assert info.num_examples == 3
    assert data.load_dataset_info(out).class_names == ["a", "horse", "man"]
    done = subprocess.run([sys.executable, "-m", "tfrecords_tools.coco_captions",
                           f"--captions={captions}", f"--images_dir={images_dir}",
                           f"--output_dir={out}", f"--vocabulary={tmp_path / 'missing.txt'}"],
                          cwd=REPO_ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert done.returncode == 1 and "missing.txt not found" in done.stderr
    assert "Traceback" not in done.stderr

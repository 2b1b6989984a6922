"""Tests of tfrecords_tools: the shared split runner and every converter, on tiny fixtures.

Each converter must write exactly the labels its input gives (read back from the shards with
tf.io.parse_single_example and the schema keys), describe the split in dataset.json, and stop on
bad input with a message naming the file or record.
"""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from PIL import Image

from imcl_tf import data
from tfrecords_tools import arrays, coco, coco_captions, common, cub, manifest, openimages, voc

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- helpers -------------------------------------------------------------------------------------


def image_bytes(seed, image_format="JPEG", size=(10, 8), mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, image_format)
    return buffer.getvalue()


def write_image(path, seed, image_format="JPEG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(image_bytes(seed, image_format))
    return path


def read_split(output_dir, split):
    """{id: record dict} of a written split, in shard order, parsed with the schema keys."""
    info = data.load_dataset_info(output_dir)
    spec = {
        data.IMAGE_ID_KEY: tf.io.FixedLenFeature([], tf.string),
        data.POSITIVE_KEY: tf.io.VarLenFeature(tf.int64),
        data.NEGATIVE_KEY: tf.io.VarLenFeature(tf.int64),
        data.IMAGE_ENCODED_KEY: tf.io.FixedLenFeature([], tf.string, default_value=""),
        data.EMBEDDING_KEY: tf.io.VarLenFeature(tf.float32),
        data.IMAGE_CLASS_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1),
    }
    records = {}
    paths = [os.path.join(output_dir, name) for name in info.splits[split].shards]
    for serialized in tf.data.TFRecordDataset(paths):
        parsed = tf.io.parse_single_example(serialized, spec)
        image_id = parsed[data.IMAGE_ID_KEY].numpy().decode()
        assert image_id not in records
        records[image_id] = {
            "positives": parsed[data.POSITIVE_KEY].values.numpy().tolist(),
            "negatives": parsed[data.NEGATIVE_KEY].values.numpy().tolist(),
            "image": parsed[data.IMAGE_ENCODED_KEY].numpy(),
            "embedding": parsed[data.EMBEDDING_KEY].values.numpy(),
            "image_class": int(parsed[data.IMAGE_CLASS_KEY].numpy()),
        }
    assert len(records) == info.splits[split].num_examples
    return records


def labels_of(records):
    return {i: (r["positives"], r["negatives"]) for i, r in records.items()}


def quiet():
    return io.StringIO()


# ---- common: images, progress, flags -------------------------------------------------------------


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_check_image_returns_the_same_bytes_and_format(image_format):
    encoded = image_bytes(0, image_format)
    checked, kind = common.check_image(encoded, "x")
    assert checked is encoded
    assert kind == image_format.lower()
    grey = image_bytes(1, image_format, mode="L")
    assert common.check_image(grey, "x")[0] is grey


@pytest.mark.parametrize("case, kind", [
    ("empty", "truncated"), ("truncated_jpeg", "truncated"), ("truncated_png", "truncated"),
    ("gif", "unsupported"), ("garbage_jpeg", "undecodable")])
def test_check_image_rejects_bad_bytes_naming_the_source(case, kind):
    jpeg, png = image_bytes(0, "JPEG", size=(40, 40)), image_bytes(0, "PNG", size=(40, 40))
    encoded = {
        "empty": b"",
        "truncated_jpeg": jpeg[:len(jpeg) // 2],
        "truncated_png": png[:-20],
        "gif": image_bytes(0, "GIF"),
        "garbage_jpeg": jpeg[:3] + bytes(200) + b"\xff\xd9",
    }[case]
    with pytest.raises(common.ImageError, match="photos/a.jpg") as error:
        common.check_image(encoded, "photos/a.jpg")
    assert error.value.kind == kind
    assert "--skip_corrupt" in str(error.value)


def test_read_image_missing_file_names_it(tmp_path):
    path = str(tmp_path / "nope.jpg")
    with pytest.raises(common.ImageError, match="nope.jpg.*not found") as error:
        common.read_image(path, "row 3")
    assert error.value.kind == "missing"
    assert "row 3" in str(error.value)


def test_progress_lines_count_rate_and_eta():
    now = [100.0]
    stream = io.StringIO()
    progress = common.Progress("coco train", total=100, interval=10.0, stream=stream,
                               clock=lambda: now[0])
    now[0] = 105.0
    progress.update(25)  # 5 s < interval: nothing printed yet
    assert stream.getvalue() == ""
    assert progress.line() == "coco train: 25/100 (25.0%) 5.0/s ETA 0:00:15"
    now[0] = 110.0
    progress.update(25)  # 50 in 10 s
    assert stream.getvalue() == "coco train: 50/100 (50.0%) 5.0/s ETA 0:00:10\n"
    now[0] = 120.0
    progress.update(50)
    progress.close()
    last_line = stream.getvalue().splitlines()[-1]
    assert last_line == "coco train: 100/100 (100.0%) 5.0/s done in 0:00:20"


def test_every_converter_defines_its_flags_once_in_one_process():
    flag_values = flags.FlagValues()
    for module in (coco, coco_captions, voc, openimages, cub, manifest, arrays):
        module.define_flags(flag_values)
        module.define_flags(flag_values)  # a second call must not raise DuplicateFlagError
    for name in ("output_dir", "split", "num_shards", "num_workers", "seed", "shuffle",
                 "skip_corrupt", "annotations", "voc_root", "image_labels", "cub_root",
                 "manifest", "features", "captions", "vocabulary", "unmentioned"):
        assert name in flag_values


def test_parse_flags_reports_missing_required_flag():
    with pytest.raises(data.DataError, match="annotations"):
        common.parse_flags(coco.define_flags, ["coco", "--images_dir=x", "--output_dir=y"])


def test_run_main_prints_data_errors_and_exits_1(capsys):
    def failing(flag_values):
        raise data.DataError("labels.csv line 3: unknown class 'dgo'")

    with pytest.raises(SystemExit) as exit_info:
        common.run_main(failing, ["prog"])
    assert exit_info.value.code == 1
    assert "labels.csv line 3: unknown class 'dgo'" in capsys.readouterr().err


# ---- common: the split runner --------------------------------------------------------------------


def records_with_images(tmp_path, count, num_classes, rng):
    """Random partial labels and one JPEG or PNG file per record; returns (records, labels)."""
    records, expected = [], {}
    for i in range(count):
        states = rng.integers(-1, 2, num_classes)  # +1 present, -1 absent, 0 unknown
        positives = np.flatnonzero(states == 1).tolist()
        negatives = np.flatnonzero(states == -1).tolist()
        image_format = "PNG" if i % 2 else "JPEG"
        path = write_image(str(tmp_path / "images" / f"img{i}.{image_format.lower()}"), i,
                           image_format)
        records.append(common.Record(f"img{i}", positives, negatives, source=f"row {i}",
                                     image_path=path))
        expected[f"img{i}"] = (positives, negatives)
    return records, expected


def test_convert_split_round_trips_labels_and_image_bytes(tmp_path, rng):
    records, expected = records_with_images(tmp_path, 9, 5, rng)
    out = str(tmp_path / "out")
    split_info = common.convert_split(records, output_dir=out, split="train",
                                      class_names=list("abcde"), converter="test", num_shards=3,
                                      stream=quiet())
    assert split_info.num_examples == 9
    written = read_split(out, "train")
    assert labels_of(written) == expected
    for record in records:  # stored as-is, no re-encoding
        with open(record.image_path, "rb") as f:
            assert written[record.image_id]["image"] == f.read()
    info = data.load_dataset_info(out)
    assert info.class_names == list("abcde") and info.mode == "image"
    assert sorted(os.listdir(out)) == ["dataset.json"] + data.shard_names("train", 3)
    label_count = sum(len(p) + len(n) for p, n in expected.values())
    assert info.labels["splits"]["train"]["known_ratio"] == pytest.approx(label_count / 45)
    run = info.provenance["splits"]["train"]
    assert run["converter"] == "test" and run["flags"]["num_shards"] == 3
    assert run["date"].endswith("Z")
    # The training side reads it back: schema, counts per shard, ids, every image decodes.
    stats = data.verify_dataset(out, check_images=True).splits["train"]
    assert stats.num_examples == 9
    assert stats.positives.tolist() == [sum(c in p for p, _ in expected.values()) for c in range(5)]


def test_convert_split_output_does_not_depend_on_num_workers(tmp_path, rng):
    records, _ = records_with_images(tmp_path, 12, 4, rng)
    shards = {}
    for workers in (1, 4):
        out = str(tmp_path / f"out{workers}")
        common.convert_split(records, output_dir=out, split="train", class_names=list("abcd"),
                             converter="test", num_shards=2, num_workers=workers, seed=7,
                             stream=quiet())
        shards[workers] = [open(os.path.join(out, n), "rb").read()
                           for n in data.shard_names("train", 2)]
    assert shards[1] == shards[4]


def test_convert_split_shuffle_is_a_seeded_permutation(tmp_path, rng):
    records, expected = records_with_images(tmp_path, 10, 3, rng)
    orders = []
    for seed in (1, 1, 2):
        out = str(tmp_path / f"out{len(orders)}")
        common.convert_split(records, output_dir=out, split="train", class_names=list("abc"),
                             converter="test", seed=seed, stream=quiet())
        orders.append(list(read_split(out, "train")))
    assert orders[0] == orders[1] != orders[2]
    assert sorted(orders[0]) == sorted(expected)
    out = str(tmp_path / "ordered")
    common.convert_split(records, output_dir=out, split="train", class_names=list("abc"),
                         converter="test", shuffle=False, stream=quiet())
    assert list(read_split(out, "train")) == [r.image_id for r in records]


@pytest.mark.parametrize("case, message", [
    ("out_of_range", r"row 1: positive class indices \[3\] are outside \[0, 3\)"),
    ("both", r"row 1: classes \[2\] are both positive and negative"),
    ("duplicate_id", r"duplicate image id 'img0' in row 1 and row 0"),
])
def test_convert_split_rejects_bad_labels_and_ids_before_reading_images(tmp_path, case, message):
    path = write_image(str(tmp_path / "a.jpg"), 0)
    second = {
        "out_of_range": common.Record("img1", [3], [], source="row 1", image_path=path),
        "both": common.Record("img1", [2], [0, 2], source="row 1", image_path=path),
        "duplicate_id": common.Record("img0", [0], [], source="row 1", image_path=path),
    }[case]
    records = [common.Record("img0", [0], [1], source="row 0", image_path=path), second]
    out = str(tmp_path / "out")
    for skip_corrupt in (False, True):  # annotation errors are never skipped
        with pytest.raises(data.DataError, match=message):
            common.convert_split(records, output_dir=out, split="train", class_names=list("abc"),
                                 converter="test", skip_corrupt=skip_corrupt, stream=quiet())
    assert not os.path.exists(out) or os.listdir(out) == []


def bad_image_records(tmp_path):
    good = write_image(str(tmp_path / "good.jpg"), 0)
    undecodable = tmp_path / "undecodable.jpg"
    undecodable.write_bytes(b"\xff\xd8\xff" + bytes(100) + b"\xff\xd9")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(image_bytes(1, "PNG", size=(30, 30))[:-40])
    return [
        common.Record("good", [0], [1], source="row 0", image_path=good),
        common.Record("missing", [1], [], source="row 1", image_path=str(tmp_path / "gone.jpg")),
        common.Record("undecodable", [], [0], source="row 2", image_path=str(undecodable)),
        common.Record("truncated", [0], [], source="row 3", image_path=str(truncated)),
        common.Record("good2", [1], [0], source="row 4", image_bytes=image_bytes(5, "PNG")),
    ]


def test_convert_split_stops_at_the_first_bad_image_naming_it(tmp_path):
    records = bad_image_records(tmp_path)
    out = str(tmp_path / "out")
    with pytest.raises(data.DataError, match=r"gone\.jpg \(row 1\): not found.*--skip_corrupt"):
        common.convert_split(records, output_dir=out, split="train", class_names=["a", "b"],
                             converter="test", shuffle=False, num_workers=3, stream=quiet())
    assert os.listdir(out) == []  # temporary shards removed, no dataset.json


def test_convert_split_skip_corrupt_goes_on_and_reports(tmp_path):
    records = bad_image_records(tmp_path)
    out = str(tmp_path / "out")
    stream = io.StringIO()
    split_info = common.convert_split(records, output_dir=out, split="train",
                                      class_names=["a", "b"], converter="test", num_workers=2,
                                      skip_corrupt=True, stream=stream)
    assert split_info.num_examples == 2
    assert labels_of(read_split(out, "train")) == {"good": ([0], [1]), "good2": ([1], [0])}
    report = stream.getvalue()
    assert "skipped 3 of 5 inputs (missing: 1, truncated: 1, undecodable: 1)" in report
    for name in ("gone.jpg", "undecodable.jpg", "truncated.png"):
        assert name in report
    info = data.load_dataset_info(out)
    skipped = {os.path.basename(e["source"].split(" ")[2]): e["reason"]
               for e in info.splits["train"].skipped}
    assert sorted(skipped) == ["gone.jpg", "truncated.png", "undecodable.jpg"]
    assert skipped["gone.jpg"] == "not found"
    assert skipped["truncated.png"].startswith("truncated PNG")
    assert info.provenance["splits"]["train"]["skipped_by_kind"] == {
        "missing": 1, "truncated": 1, "undecodable": 1}


def test_convert_split_merges_splits_and_refuses_other_classes(tmp_path, rng):
    records, _ = records_with_images(tmp_path, 6, 3, rng)
    out = str(tmp_path / "out")
    kwargs = dict(output_dir=out, converter="test", stream=quiet())
    common.convert_split(records[:4], split="train", class_names=list("abc"), num_shards=3,
                         **kwargs)
    common.convert_split(records[4:], split="validation", class_names=list("abc"), **kwargs)
    info = data.load_dataset_info(out)
    assert {s: v.num_examples for s, v in info.splits.items()} == {"train": 4, "validation": 2}
    assert set(info.provenance["splits"]) == {"train", "validation"}
    # Rewriting a split with fewer shards removes its stale shards and keeps the other split.
    common.convert_split(records[:4], split="train", class_names=list("abc"), num_shards=1,
                         **kwargs)
    assert sorted(os.listdir(out)) == ["dataset.json", "train-00000-of-00001.tfrecord",
                                       "validation-00000-of-00001.tfrecord"]
    with pytest.raises(data.DataError, match="differ.*index 1"):
        common.convert_split(records[4:], split="test", class_names=["a", "x", "c"], **kwargs)
    with pytest.raises(data.DataError, match="--split"):
        common.convert_split(records, split="../evil", class_names=list("abc"), **kwargs)


# ---- COCO ----------------------------------------------------------------------------------------


def write_coco(tmp_path, annotations=None):
    images_dir = tmp_path / "train2017"
    coco_json = {
        "images": [{"id": 42, "file_name": "000042.jpg"}, {"id": 7, "file_name": "000007.jpg"},
                   {"id": 9, "file_name": "000009.png"}],
        # Not in id order: classes must follow the category ids.
        "categories": [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"},
                       {"id": 3, "name": "car"}],
        "annotations": annotations if annotations is not None else [
            {"id": 1, "image_id": 42, "category_id": 18, "iscrowd": 0},
            {"id": 2, "image_id": 42, "category_id": 18, "iscrowd": 0},
            {"id": 3, "image_id": 42, "category_id": 1, "iscrowd": 1},  # crowd: present
            {"id": 4, "image_id": 7, "category_id": 3, "iscrowd": 0},
        ],  # image 9 has no annotation: every class negative
    }
    path = tmp_path / "instances_train2017.json"
    path.write_text(json.dumps(coco_json))
    write_image(str(images_dir / "000042.jpg"), 1)
    write_image(str(images_dir / "000007.jpg"), 2)
    write_image(str(images_dir / "000009.png"), 3, "PNG")
    return str(path), str(images_dir)


def test_coco_exhaustive_labels_in_category_id_order(tmp_path):
    annotations, images_dir = write_coco(tmp_path)
    out = str(tmp_path / "out")
    coco.convert(annotations, images_dir, output_dir=out, split="train", num_shards=2,
                 stream=quiet())
    info = data.load_dataset_info(out)
    assert info.class_names == ["person", "car", "dog"]
    assert labels_of(read_split(out, "train")) == {
        "42": ([0, 2], [1]), "7": ([1], [0, 2]), "9": ([], [0, 1, 2])}
    assert info.provenance["converter"] == "tfrecords_tools.coco"
    assert info.provenance["splits"]["train"]["flags"]["annotations"] == annotations
    assert "exhaustive" in info.labels["source"]


def test_coco_bad_inputs_name_the_annotation_or_file(tmp_path):
    annotations, images_dir = write_coco(
        tmp_path, [{"id": 5, "image_id": 42, "category_id": 99, "iscrowd": 0}])
    with pytest.raises(data.DataError, match="annotation 5 has category_id 99"):
        coco.convert(annotations, images_dir, output_dir=str(tmp_path / "o"), stream=quiet())
    annotations, images_dir = write_coco(tmp_path)
    os.remove(os.path.join(images_dir, "000007.jpg"))
    with pytest.raises(data.DataError, match=r"000007\.jpg.*image 7.*not found"):
        coco.convert(annotations, images_dir, output_dir=str(tmp_path / "o"), stream=quiet())


# ---- VOC -----------------------------------------------------------------------------------------


def voc_xml(objects):
    body = "".join(f"<object><name>{name}</name><difficult>{int(difficult)}</difficult></object>"
                   for name, difficult in objects)
    return f"<annotation><filename>x.jpg</filename>{body}</annotation>"


def write_voc(tmp_path, annotations):
    root = tmp_path / "VOCdevkit" / "VOC2007"
    (root / "ImageSets" / "Main").mkdir(parents=True)
    (root / "Annotations").mkdir()
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(annotations) + "\n")
    for seed, (image_id, objects) in enumerate(annotations.items()):
        (root / "Annotations" / f"{image_id}.xml").write_text(voc_xml(objects))
        write_image(str(root / "JPEGImages" / f"{image_id}.jpg"), seed)
    return str(tmp_path / "VOCdevkit"), str(root)


def test_voc_difficult_only_classes_are_unknown(tmp_path):
    voc_root, year_root = write_voc(tmp_path, {
        "000005": [("chair", False), ("chair", True), ("sofa", True)],  # sofa only difficult
        "000007": [("car", False)],
        "000009": [("person", True), ("horse", False), ("person", True)],
    })
    chair, sofa, car, person, horse = (voc.VOC_CLASSES.index(c)
                                       for c in ("chair", "sofa", "car", "person", "horse"))
    others = lambda *known: sorted(set(range(20)) - set(known))  # noqa: E731
    expected = {
        "000005": ([chair], others(chair, sofa)),
        "000007": ([car], others(car)),
        "000009": ([horse], others(horse, person)),
    }
    for root in (voc_root, year_root):  # VOCdevkit or VOC2007 itself
        out = str(tmp_path / ("out" + str(len(root))))
        voc.convert(root, "2007", "trainval", output_dir=out, stream=quiet())
        assert labels_of(read_split(out, "train")) == expected
        assert data.load_dataset_info(out).class_names == list(voc.VOC_CLASSES)


def test_voc_unknown_class_names_the_xml(tmp_path):
    voc_root, _ = write_voc(tmp_path, {"000005": [("chair", False), ("unicorn", False)]})
    with pytest.raises(data.DataError, match=r"000005\.xml: object 2 has class 'unicorn'"):
        voc.convert(voc_root, "2007", "trainval", output_dir=str(tmp_path / "o"), stream=quiet())
    with pytest.raises(data.DataError, match="val.txt not found"):
        voc.convert(voc_root, "2007", "val", output_dir=str(tmp_path / "o"), stream=quiet())


# ---- Open Images ---------------------------------------------------------------------------------


def write_openimages(tmp_path, label_rows):
    images_dir = tmp_path / "images"
    labels = tmp_path / "annotations-human.csv"
    labels.write_text("ImageID,Source,LabelName,Confidence\n" +
                      "".join(",".join(row) + "\n" for row in label_rows))
    classes = tmp_path / "class-descriptions.csv"  # no header, as in the release files
    classes.write_text("/m/a,Apple\n/m/b,Ball\n/m/c,Ball\n/m/d,Dog\n/m/e,Egg\n")
    trainable = tmp_path / "classes-trainable.txt"
    trainable.write_text("/m/d\n/m/b\n/m/c\n/m/a\n")
    for seed, image_id in enumerate(sorted({row[0] for row in label_rows})):
        write_image(str(images_dir / f"{image_id}.jpg"), seed)
    return str(labels), str(classes), str(trainable), str(images_dir)


def test_openimages_human_labels_only_with_trainable_classes(tmp_path):
    rows = [
        ("img1", "verification", "/m/d", "1"),
        ("img1", "crowdsource-verification", "/m/a", "0"),
        ("img1", "machine", "/m/b", "0.7"),  # ignored
        ("img1", "verification", "/m/e", "1"),  # not trainable: ignored
        ("img2", "human", "/m/b", "0"),
        ("img2", "verification", "/m/c", "1"),
        ("img2", "verification", "/m/a", "1"),
        ("img2", "crowdsource-verification", "/m/a", "0"),  # conflicts: unknown
        ("img3", "machine", "/m/d", "1"),  # no verified label left: image left out
        ("img4", "verification", "/m/a", "1.0"),
        ("img4", "crowdsource-verification", "/m/a", "1"),  # agrees: one label
    ]
    labels, classes, trainable, images_dir = write_openimages(tmp_path, rows)
    out = str(tmp_path / "out")
    openimages.convert(labels, classes, images_dir, output_dir=out, trainable_classes=trainable,
                       split="train", stream=quiet())
    info = data.load_dataset_info(out)
    # Trainable order d, b, c, a; "Ball" is used twice, so both get their MID.
    assert info.class_names == ["Dog", "Ball (/m/b)", "Ball (/m/c)", "Apple"]
    assert info.labels["class_ids"] == ["/m/d", "/m/b", "/m/c", "/m/a"]
    assert labels_of(read_split(out, "train")) == {
        "img1": ([0], [3]), "img2": ([2], [1]), "img4": ([3], [])}
    assert info.labels["splits"]["train"]["ignored"] == {
        "machine_rows": 2, "untrainable_rows": 1, "conflicting_labels": 1,
        "images_without_known_labels": 1}


def test_openimages_without_trainable_list_uses_all_classes(tmp_path):
    labels, classes, _, images_dir = write_openimages(
        tmp_path, [("img1", "verification", "/m/e", "1"), ("img1", "verification", "/m/a", "0")])
    out = str(tmp_path / "out")
    openimages.convert(labels, classes, images_dir, output_dir=out, stream=quiet())
    assert data.load_dataset_info(out).class_names == [
        "Apple", "Ball (/m/b)", "Ball (/m/c)", "Dog", "Egg"]
    assert labels_of(read_split(out, "train")) == {"img1": ([4], [0])}


@pytest.mark.parametrize("row, message", [
    (("img1", "guess", "/m/a", "1"), "line 3: unknown Source 'guess'"),
    (("img1", "verification", "/m/a", "0.5"), "line 3: Confidence '0.5'"),
    (("img1", "verification", "/m/zz", "1"), "line 3: class '/m/zz'"),
])
def test_openimages_bad_rows_name_the_line(tmp_path, row, message):
    labels, classes, _, images_dir = write_openimages(
        tmp_path, [("img1", "verification", "/m/a", "1"), row])
    with pytest.raises(data.DataError, match=message):
        openimages.convert(labels, classes, images_dir, output_dir=str(tmp_path / "o"),
                           stream=quiet())


# ---- CUB -----------------------------------------------------------------------------------------


def write_cub(tmp_path, label_lines=None, attributes_next_to_root=False):
    root = tmp_path / "CUB_200_2011"
    (root / "attributes").mkdir(parents=True)
    names = ["001.Albatross/a_1.jpg", "001.Albatross/a_2.jpg", "002.Auklet/b_1.jpg",
             "003.Blackbird/c_1.jpg"]
    (root / "images.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(names, 1)))
    (root / "train_test_split.txt").write_text("1 1\n2 0\n3 1\n4 0\n")
    (root / "image_class_labels.txt").write_text("1 1\n2 1\n3 2\n4 3\n")
    (root / "classes.txt").write_text("1 001.Albatross\n2 002.Auklet\n3 003.Blackbird\n")
    attribute_names = "1 has_bill_shape::hooked\n2 has_wing_color::blue\n3 has_size::small\n"
    attributes_path = (tmp_path / "attributes.txt" if attributes_next_to_root
                       else root / "attributes" / "attributes.txt")
    attributes_path.write_text(attribute_names)
    if label_lines is None:
        # image attribute is_present certainty [extra] time
        table = {1: [(1, 4), (0, 3), (1, 1)], 2: [(0, 1), (1, 2), (0, 4)],
                 3: [(1, 3), (1, 4), (0, 1)], 4: [(0, 2), (0, 2), (1, 1)]}
        label_lines = [f"{image} {attribute} {present} {certainty} 12.5"
                       for image, values in table.items()
                       for attribute, (present, certainty) in enumerate(values, 1)]
        label_lines[4] = "2 2 1 2 0 7.25"  # the official file has a few lines with an extra field
    (root / "attributes" / "image_attribute_labels.txt").write_text("\n".join(label_lines) + "\n")
    for seed, name in enumerate(names):
        write_image(str(root / "images" / name), seed)
    return str(root)


@pytest.mark.parametrize("not_visible_unknown", [False, True])
def test_cub_attributes_species_and_official_split(tmp_path, not_visible_unknown):
    root = write_cub(tmp_path, attributes_next_to_root=not_visible_unknown)
    out = str(tmp_path / "out")
    written = cub.convert(root, output_dir=out, split="train,test",
                          not_visible_unknown=not_visible_unknown, stream=quiet())
    assert {s: v.num_examples for s, v in written.items()} == {"train": 2, "test": 2}
    info = data.load_dataset_info(out)
    assert info.class_names == ["has_bill_shape::hooked", "has_wing_color::blue",
                                "has_size::small"]
    assert info.labels["image_class_names"] == ["001.Albatross", "002.Auklet", "003.Blackbird"]
    train, test = read_split(out, "train"), read_split(out, "test")
    if not_visible_unknown:  # certainty 1 ("not visible") -> unknown
        assert labels_of(train) == {"001.Albatross/a_1.jpg": ([0], [1]),
                                    "002.Auklet/b_1.jpg": ([0, 1], [])}
        assert labels_of(test) == {"001.Albatross/a_2.jpg": ([1], [2]),
                                   "003.Blackbird/c_1.jpg": ([], [0, 1])}
    else:
        assert labels_of(train) == {"001.Albatross/a_1.jpg": ([0, 2], [1]),
                                    "002.Auklet/b_1.jpg": ([0, 1], [2])}
        assert labels_of(test) == {"001.Albatross/a_2.jpg": ([1], [0, 2]),
                                   "003.Blackbird/c_1.jpg": ([2], [0, 1])}
    species = {i: r["image_class"] for i, r in {**train, **test}.items()}
    assert species == {"001.Albatross/a_1.jpg": 0, "001.Albatross/a_2.jpg": 0,
                       "002.Auklet/b_1.jpg": 1, "003.Blackbird/c_1.jpg": 2}


@pytest.mark.parametrize("bad_line, message", [
    ("2 2 1", "line 5: expected 'image_id attribute_id"),
    ("2 2 yes 3 1.0", "line 5: is_present must be an integer in"),
    ("2 9 1 3 1.0", r"line 5: attribute_id must be an integer in \[1, 3\]"),
    ("99 2 1 3 1.0", "line 5: image_id '99' is not in images.txt"),
])
def test_cub_malformed_lines_name_file_and_line(tmp_path, bad_line, message):
    lines = [f"{image} {attribute} 1 3 1.0" for image in range(1, 5) for attribute in range(1, 4)]
    lines[4] = bad_line
    root = write_cub(tmp_path, label_lines=lines)
    with pytest.raises(data.DataError, match="image_attribute_labels.txt " + message):
        cub.convert(root, output_dir=str(tmp_path / "o"), split="train", stream=quiet())


def test_cub_missing_attribute_line_and_bad_split(tmp_path):
    lines = [f"{image} {attribute} 1 3 1.0" for image in range(1, 5) for attribute in range(1, 4)]
    root = write_cub(tmp_path, label_lines=lines[:-1])
    with pytest.raises(data.DataError, match=r"image 4 has no line for attributes \[3\]"):
        cub.convert(root, output_dir=str(tmp_path / "o"), stream=quiet())
    with pytest.raises(data.DataError, match="train, test or train,test"):
        cub.convert(root, output_dir=str(tmp_path / "o"), split="val", stream=quiet())


# ---- manifest ------------------------------------------------------------------------------------


def write_manifest_inputs(tmp_path):
    images_dir = tmp_path / "photos"
    for seed, name in enumerate(["a.jpg", "b.png", "sub/c.jpg"]):
        write_image(str(images_dir / name), seed, "PNG" if name.endswith("png") else "JPEG")
    classes = tmp_path / "classes.txt"
    classes.write_text("cat\ndog\n\nsofa\nred car\n")
    return str(images_dir), str(classes)


def test_manifest_csv_and_jsonl_round_trip(tmp_path):
    images_dir, classes = write_manifest_inputs(tmp_path)
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("image,positives,negatives,id\n"
                        "a.jpg,cat; red car,dog,first\n"
                        "b.png,,cat|dog|sofa,\n"
                        "sub/c.jpg,dog|cat,,\n")
    jsonl_path = tmp_path / "train.jsonl"
    jsonl_path.write_text(
        json.dumps({"image": "a.jpg", "positives": ["cat", "red car"], "negatives": ["dog"],
                    "id": "first"}) + "\n\n" +
        json.dumps({"image": "b.png", "negatives": ["cat", "dog", "sofa"]}) + "\n" +
        json.dumps({"image": "sub/c.jpg", "positives": ["dog", "cat"], "negatives": []}) + "\n")
    expected = {"first": ([0, 3], [1]), "b.png": ([], [0, 1, 2]), "sub/c.jpg": ([0, 1], [])}
    for path in (csv_path, jsonl_path):
        out = str(tmp_path / ("out_" + path.suffix[1:]))
        manifest.convert(str(path), images_dir, classes, output_dir=out, stream=quiet())
        assert labels_of(read_split(out, "train")) == expected
        assert data.load_dataset_info(out).class_names == ["cat", "dog", "sofa", "red car"]


def test_manifest_run_parses_the_command_line(tmp_path):
    images_dir, classes = write_manifest_inputs(tmp_path)
    path = tmp_path / "list.txt"  # extension says nothing: --manifest_format does
    path.write_text("image,positives,negatives\na.jpg,sofa,cat\n")
    out = str(tmp_path / "out")
    split_info = manifest.run(["manifest", f"--manifest={path}", f"--images_dir={images_dir}",
                               f"--classes={classes}", "--manifest_format=csv",
                               f"--output_dir={out}", "--split=validation", "--num_shards=2",
                               "--num_workers=2", "--seed=3"])
    assert split_info.num_examples == 1
    assert labels_of(read_split(out, "validation")) == {"a.jpg": ([2], [0])}
    run = data.load_dataset_info(out).provenance["splits"]["validation"]
    assert run["flags"]["seed"] == 3 and run["flags"]["manifest_format"] == "csv"


@pytest.mark.parametrize("rows, message", [
    ("a.jpg,cat;dgo,\n", r"train.csv line 2: unknown class 'dgo' in positives; did you mean "
                         r"\['dog'\]\? valid names include \['cat', 'dog', 'sofa', 'red car'\]"),
    ("a.jpg,sofa,\nb.png,cat,dog|cat\n", r"train.csv line 3: \['cat'\] listed both as positive "
                                         "and negative"),
    ("a.jpg,cat,\na.jpg,dog,\n", "duplicate image id 'a.jpg' in .*line 3.* and .*line 2"),
    ("a.jpg,cat\n", "train.csv line 2: 2 fields for 3 columns"),
])
def test_manifest_bad_rows_name_the_line(tmp_path, rows, message):
    images_dir, classes = write_manifest_inputs(tmp_path)
    path = tmp_path / "train.csv"
    path.write_text("image,positives,negatives\n" + rows)
    with pytest.raises(data.DataError, match=message):
        manifest.convert(str(path), images_dir, classes, output_dir=str(tmp_path / "o"),
                         stream=quiet())


def test_manifest_missing_image_and_skip_corrupt(tmp_path):
    images_dir, classes = write_manifest_inputs(tmp_path)
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"image": "a.jpg", "positives": ["cat"]}) + "\n" +
                    json.dumps({"image": "lost.jpg", "positives": ["dog"]}) + "\n")
    out = str(tmp_path / "out")
    with pytest.raises(data.DataError, match=r"lost\.jpg \(.*train\.jsonl line 2.*\): not found"):
        manifest.convert(str(path), images_dir, classes, output_dir=out, stream=quiet())
    manifest.convert(str(path), images_dir, classes, output_dir=out, skip_corrupt=True,
                     stream=quiet())
    assert labels_of(read_split(out, "train")) == {"a.jpg": ([0], [])}
    assert data.load_dataset_info(out).splits["train"].skipped[0]["reason"] == "not found"


# ---- arrays --------------------------------------------------------------------------------------


def test_arrays_partial_npy_round_trip(tmp_path, rng):
    features = rng.normal(size=(7, 5)).astype(np.float32)
    labels = rng.integers(-1, 2, size=(7, 4)).astype(np.int8)
    labels[0, 0] = -1  # makes the format detectable
    np.save(tmp_path / "x.npy", features)
    np.save(tmp_path / "y.npy", labels)
    (tmp_path / "ids.txt").write_text("".join(f"item-{i}\n" for i in range(7)))
    out = str(tmp_path / "out")
    arrays.convert(str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), output_dir=out,
                   ids=str(tmp_path / "ids.txt"), num_shards=2, stream=quiet())
    info = data.load_dataset_info(out)
    assert info.mode == "features" and info.embedding_dim == 5
    assert info.class_names == ["class_0", "class_1", "class_2", "class_3"]
    assert info.labels["splits"]["train"]["label_format"] == "partial"
    written = read_split(out, "train")
    for i in range(7):
        record = written[f"item-{i}"]
        row = data.label_row(record["positives"], record["negatives"], 4)
        np.testing.assert_array_equal(row, labels[i])
        np.testing.assert_array_equal(record["embedding"], features[i])
        assert record["image"] == b""
    assert data.verify_dataset(out).splits["train"].num_examples == 7


def test_arrays_full_csv_with_header_class_names(tmp_path, rng):
    features = rng.normal(size=(4, 3))
    labels = rng.integers(0, 2, size=(4, 2))
    np.savetxt(tmp_path / "x.csv", features, delimiter=",", fmt="%.17g")
    (tmp_path / "y.csv").write_text("cat,dog\n" + "".join(f"{a},{b}\n" for a, b in labels))
    out = str(tmp_path / "out")
    with pytest.raises(data.DataError, match="only 0 and 1, which is ambiguous"):
        arrays.convert(str(tmp_path / "x.csv"), str(tmp_path / "y.csv"), output_dir=out,
                       stream=quiet())
    arrays.convert(str(tmp_path / "x.csv"), str(tmp_path / "y.csv"), output_dir=out,
                   label_format="full", stream=quiet())
    info = data.load_dataset_info(out)
    assert info.class_names == ["cat", "dog"]
    written = read_split(out, "train")
    for i in range(4):
        row = data.label_row(written[str(i)]["positives"], written[str(i)]["negatives"], 2)
        np.testing.assert_array_equal(row, np.where(labels[i] == 1, 1.0, -1.0))  # 0 = negative
        np.testing.assert_allclose(written[str(i)]["embedding"], features[i].astype(np.float32))


@pytest.mark.parametrize("case, message", [
    ("nan", r"x.npy: row 2 column 1 is nan"),
    ("bad_label", r"y.npy: row 1 column 0 is 2"),
    ("rows", "has 4 rows but --labels .* has 3"),
    ("full_with_minus_one", "row 0 column 1 is -1, but --label_format=full"),
    ("class_count", "3 class names for 2 label columns"),
    ("ids_count", "2 ids for 3 rows"),
    ("duplicate_ids", "duplicate image id 'a'"),
])
def test_arrays_bad_inputs_give_the_location(tmp_path, case, message):
    features = np.ones((3, 2), np.float32)
    labels = np.array([[1, -1], [0, 1], [1, 0]], np.int64)
    label_format = "full" if case == "full_with_minus_one" else None
    if case == "nan":
        features[2, 1] = np.nan
    elif case == "bad_label":
        labels[1, 0] = 2
    elif case == "rows":
        features = np.ones((4, 2), np.float32)
    np.save(tmp_path / "x.npy", features)
    np.save(tmp_path / "y.npy", labels)
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    (tmp_path / "ids.txt").write_text("a\nb\n" if case == "ids_count" else "a\nb\na\n")
    with pytest.raises(data.DataError, match=message):
        arrays.convert(str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
                       output_dir=str(tmp_path / "o"), label_format=label_format,
                       class_names=str(tmp_path / "names.txt") if case == "class_count" else None,
                       ids=(str(tmp_path / "ids.txt")
                            if case in ("ids_count", "duplicate_ids") else None),
                       stream=quiet())


# ---- one real command line -----------------------------------------------------------------------


@pytest.mark.slow  # a fresh interpreter imports TensorFlow: ~10-25 s on a busy 2-core machine
def test_voc_command_line_in_a_subprocess(tmp_path):
    voc_root, _ = write_voc(tmp_path, {"000001": [("dog", False)], "000002": [("cat", True)]})
    out = str(tmp_path / "out")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-m", "tfrecords_tools.voc", f"--voc_root={voc_root}", "--year=2007",
         "--image_set=trainval", f"--output_dir={out}", "--split=train", "--num_shards=2"],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "wrote 2 examples in 2 shard(s)" in result.stderr
    dog, cat = voc.VOC_CLASSES.index("dog"), voc.VOC_CLASSES.index("cat")
    written = labels_of(read_split(out, "train"))
    assert written["000001"][0] == [dog] and written["000002"][0] == []
    assert cat not in written["000002"][1] and len(written["000002"][1]) == 19

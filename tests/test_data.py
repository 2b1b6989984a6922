"""Tests of imcl_tf.data: parsing, decoding, the tf.data pipeline and dataset verification.

Every fixture is a tiny dataset written by the test itself (a few 8-24 pixel images).
"""

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from imcl_tf import data

NUM_CLASSES = 5


# ---- fixture helpers ---------------------------------------------------------------------------


def random_labels(rng, num_classes=NUM_CLASSES):
    """Random disjoint positive / negative lists (some classes left unknown)."""
    states = rng.integers(-1, 2, size=num_classes)  # -1 absent, 0 unknown, +1 present
    return list(np.flatnonzero(states == 1)), list(np.flatnonzero(states == -1))


def png_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image, quality=95):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_image_dataset(out_dir, rng, num_examples=10, num_shards=3, size=8, split="train",
                        info_overrides=None):
    """Writes a PNG dataset; returns {id: (image uint8 [size, size, 3], label row)}."""
    expected = {}
    with data.SplitWriter(str(out_dir), split, num_shards) as writer:
        for i in range(num_examples):
            image = rng.integers(0, 256, size=[size, size, 3], dtype=np.uint8)
            positives, negatives = random_labels(rng)
            image_id = f"img-{i:03d}"
            writer.write(data.make_example(image_id, positives, negatives, NUM_CLASSES,
                                           encoded_image=png_bytes(image)))
            expected[image_id] = (image, data.label_row(positives, negatives, NUM_CLASSES))
    info = data.DatasetInfo(class_names=[f"c{i}" for i in range(NUM_CLASSES)],
                            splits={split: writer.split_info}, image_size=size,
                            **(info_overrides or {}))
    data.save_dataset_info(str(out_dir), info)
    return expected


def write_raw_dataset(out_dir, shards, mode="image", embedding_dim=None, image_size=8,
                      counts=None, split="train"):
    """Writes shards of raw serialized records (bypassing make_example's checks)."""
    names = data.shard_names(split, len(shards))
    for name, records in zip(names, shards):
        with tf.io.TFRecordWriter(os.path.join(str(out_dir), name)) as writer:
            for record in records:
                writer.write(record)
    total = sum(len(s) for s in shards) if counts is None else counts
    info = data.DatasetInfo(class_names=[f"c{i}" for i in range(NUM_CLASSES)],
                            splits={split: data.SplitInfo(shards=names, num_examples=total)},
                            mode=mode, embedding_dim=embedding_dim, image_size=image_size)
    data.save_dataset_info(str(out_dir), info)


def raw_example(image_id, positives, negatives, encoded=None, embedding=None):
    feature = {
        data.IMAGE_ID_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_id])),
        data.POSITIVE_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=positives)),
        data.NEGATIVE_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=negatives)),
    }
    if encoded is not None:
        feature[data.IMAGE_ENCODED_KEY] = tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[encoded]))
    if embedding is not None:
        feature[data.EMBEDDING_KEY] = tf.train.Feature(
            float_list=tf.train.FloatList(value=embedding))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def collect(dataset):
    inputs, labels, ids = [], [], []
    for x, y, i in dataset:
        inputs.append(x.numpy())
        labels.append(y.numpy())
        ids.append(i.numpy())
    return np.concatenate(inputs), np.concatenate(labels), np.concatenate(ids)


def hash_of(image_id):
    return int(data.id_hash(tf.constant(image_id)).numpy())


# ---- round trips -------------------------------------------------------------------------------


def test_round_trip_image_mode_gives_exact_labels_pixels_and_ids(tmp_path, rng):
    expected = write_image_dataset(tmp_path, rng, num_examples=11, num_shards=3)
    inputs, labels, ids = collect(data.make_dataset(str(tmp_path), "train", batch_size=4))
    assert inputs.shape == (11, 8, 8, 3) and inputs.dtype == np.float32
    assert labels.shape == (11, NUM_CLASSES)
    by_hash = {hash_of(k): v for k, v in expected.items()}
    assert sorted(ids.tolist()) == sorted(by_hash)
    for x, y, i in zip(inputs, labels, ids):
        image, row = by_hash[int(i)]
        np.testing.assert_array_equal(y, row)
        # PNG is lossless and the image is already S x S: pixels come back exactly.
        np.testing.assert_array_equal(x, image.astype(np.float32))


def test_round_trip_features_mode(tmp_path, rng):
    dim = 6
    expected = {}
    with data.SplitWriter(str(tmp_path), "train", 2) as writer:
        for i in range(7):
            embedding = rng.normal(size=dim).astype(np.float32)
            positives, negatives = random_labels(rng)
            writer.write(data.make_example(f"f{i}", positives, negatives, NUM_CLASSES,
                                           embedding=embedding))
            expected[hash_of(f"f{i}")] = (embedding, data.label_row(positives, negatives,
                                                                     NUM_CLASSES))
    data.save_dataset_info(str(tmp_path), data.DatasetInfo(
        class_names=list("abcde"), splits={"train": writer.split_info}, mode="features",
        embedding_dim=dim))
    inputs, labels, ids = collect(data.make_dataset(str(tmp_path), "train", batch_size=3))
    assert inputs.shape == (7, dim)
    assert sorted(ids.tolist()) == sorted(expected)
    for x, y, i in zip(inputs, labels, ids):
        np.testing.assert_array_equal(x, expected[int(i)][0])
        np.testing.assert_array_equal(y, expected[int(i)][1])
    arrays = data.load_split_arrays(str(tmp_path), "train")
    assert arrays[0].shape == (7, dim)


def test_parse_example_builds_dense_rows_like_label_row(rng):
    for _ in range(5):
        positives, negatives = random_labels(rng)
        record = data.make_example("x", positives, negatives, NUM_CLASSES, encoded_image=b"\x89")
        parsed = data.parse_example(tf.constant(record.SerializeToString()), NUM_CLASSES)
        expected = np.zeros(NUM_CLASSES, np.float32)
        for c in positives:
            expected[c] = 1.0
        for c in negatives:
            expected[c] = -1.0
        np.testing.assert_array_equal(parsed["labels"].numpy(), expected)
        assert parsed["id"].numpy() == b"x"
        assert int(parsed["image_class"].numpy()) == -1


def test_load_split_arrays_matches_write_order_and_limit(tmp_path, rng):
    expected = write_image_dataset(tmp_path, rng, num_examples=7, num_shards=3)
    inputs, labels, ids = data.load_split_arrays(str(tmp_path), "train", string_ids=True)
    # SplitWriter writes round-robin and reading interleaves the shards the same way.
    assert [i.decode() for i in ids] == sorted(expected)
    for x, y, i in zip(inputs, labels, ids):
        np.testing.assert_array_equal(x, expected[i.decode()][0])
        np.testing.assert_array_equal(y, expected[i.decode()][1])
    _, _, hashed = data.load_split_arrays(str(tmp_path), "train", limit=3)
    assert hashed.dtype == np.int64
    assert hashed.tolist() == [hash_of(f"img-{i:03d}") for i in range(3)]


def test_id_hash_is_nonnegative_distinct_and_repeatable():
    ids = tf.constant([f"id-{i}" for i in range(1000)])
    first = data.id_hash(ids).numpy()
    assert first.dtype == np.int64 and (first >= 0).all()
    assert len(set(first.tolist())) == 1000
    np.testing.assert_array_equal(first, data.id_hash(ids).numpy())


# ---- decoding ----------------------------------------------------------------------------------


def numpy_central_square(image):
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return image[top:top + side, left:left + side]


@pytest.mark.parametrize("shape", [(12, 20), (20, 12), (15, 15)])
def test_decode_png_crops_the_centre_exactly(rng, shape):
    image = rng.integers(0, 256, size=shape + (3,), dtype=np.uint8)
    side = min(shape)
    out = data.decode_image(tf.constant(png_bytes(image)), side).numpy()
    assert out.dtype == np.float32 and out.shape == (side, side, 3)
    np.testing.assert_array_equal(out, numpy_central_square(image).astype(np.float32))


def test_decode_resizes_the_short_side_then_crops(rng):
    image = rng.integers(0, 256, size=(30, 50, 3), dtype=np.uint8)
    out = data.decode_image(tf.constant(png_bytes(image)), 10).numpy()
    assert out.shape == (10, 10, 3)
    assert out.min() >= 0.0 and out.max() <= 255.0
    reference = tf.image.resize(numpy_central_square(image), [10, 10], antialias=True).numpy()
    np.testing.assert_allclose(out, np.clip(reference, 0, 255), atol=1e-3)
    # A constant image stays constant through the resize.
    flat = np.full((30, 50, 3), 77, np.uint8)
    np.testing.assert_allclose(data.decode_image(tf.constant(png_bytes(flat)), 10).numpy(), 77.0,
                               atol=1e-3)


def test_decode_jpeg_is_close_to_the_original():
    gradient = np.linspace(0, 255, 24, dtype=np.float32)
    image = np.stack(np.broadcast_arrays(gradient[None, :], gradient[:, None],
                                         np.full((24, 24), 128.0)), axis=-1).astype(np.uint8)
    out = data.decode_image(tf.constant(jpeg_bytes(image)), 24).numpy()
    assert out.shape == (24, 24, 3)
    assert np.abs(out - image).mean() < 3.0


def test_decode_grayscale_becomes_rgb(rng):
    gray = rng.integers(0, 256, size=(9, 9), dtype=np.uint8)
    out = data.decode_image(tf.constant(png_bytes(gray)), 9).numpy()
    assert out.shape == (9, 9, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[:, :, channel], gray.astype(np.float32))


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated_png", "truncated_jpeg"])
def test_bad_image_bytes_name_the_image(rng, kind):
    image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    encoded = {"garbage": b"this is not an image at all",
               "empty": b"",
               "truncated_png": png_bytes(image)[:200],
               "truncated_jpeg": jpeg_bytes(image)[:300]}[kind]
    with pytest.raises(tf.errors.InvalidArgumentError, match="bad-image-7"):
        data.decode_image(tf.constant(encoded), 16, tf.constant("bad-image-7"))


@pytest.mark.parametrize("encode", [png_bytes, jpeg_bytes])
def test_valid_images_with_trailing_data_still_decode(rng, encode):
    # Camera trailers and padding after the end marker are valid; the decoder accepts them.
    image = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
    plain = data.decode_image(tf.constant(encode(image)), 12).numpy()
    trailed = data.decode_image(tf.constant(encode(image) + b"\x00trailer" * 40), 12).numpy()
    np.testing.assert_array_equal(trailed, plain)


def test_corrupt_image_in_the_pipeline_names_the_record(tmp_path, rng):
    good = png_bytes(rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))
    write_raw_dataset(tmp_path, [[raw_example(b"ok-1", [0], [1], good),
                                  raw_example(b"broken-2", [0], [1], good[:50])]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="broken-2.*truncated PNG"):
        collect(data.make_dataset(str(tmp_path), "train", batch_size=2))
    with pytest.raises(data.DataError, match=r"record 1 \(id 'broken-2'\)"):
        data.verify_dataset(str(tmp_path), check_images=True)
    data.verify_dataset(str(tmp_path))  # without decoding, the labels and ids are fine


# ---- bad labels, ids and shards ------------------------------------------------------------------


@pytest.mark.parametrize("positives,negatives,message", [
    ([0, NUM_CLASSES], [1], "outside"),
    ([0], [-1], "outside"),
    ([2], [2, 3], "both positive and negative"),
])
def test_bad_labels_fail_naming_the_record(tmp_path, positives, negatives, message):
    encoded = png_bytes(np.zeros((8, 8, 3), np.uint8))
    write_raw_dataset(tmp_path, [[raw_example(b"fine", [0], [1], encoded),
                                  raw_example(b"wrong-labels", positives, negatives, encoded)]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="wrong-labels"):
        collect(data.make_dataset(str(tmp_path), "train", batch_size=1))
    with pytest.raises(data.DataError, match=f"record 1 \\(id 'wrong-labels'\\).*{message}"):
        data.verify_dataset(str(tmp_path))


def test_embedding_of_the_wrong_length_fails(tmp_path):
    write_raw_dataset(tmp_path, [[raw_example(b"e0", [0], [], embedding=[1.0, 2.0, 3.0]),
                                  raw_example(b"e1", [0], [], embedding=[1.0, 2.0])]],
                      mode="features", embedding_dim=3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="e1"):
        collect(data.make_dataset(str(tmp_path), "train", batch_size=2))
    with pytest.raises(data.DataError, match="record 1.*embedding_dim=3"):
        data.verify_dataset(str(tmp_path))


def test_duplicate_ids_across_shards_are_named(tmp_path):
    encoded = png_bytes(np.zeros((8, 8, 3), np.uint8))
    write_raw_dataset(tmp_path, [[raw_example(b"a", [0], [], encoded),
                                  raw_example(b"twin", [1], [], encoded)],
                                 [raw_example(b"b", [0], [], encoded),
                                  raw_example(b"twin", [2], [], encoded)]])
    with pytest.raises(data.DataError, match="duplicate image id 'twin'.*record 1.*record 1"):
        data.verify_dataset(str(tmp_path))


@pytest.mark.parametrize("damage", ["cut", "flip"])
def test_truncated_or_corrupt_shard_is_named(tmp_path, rng, damage):
    write_image_dataset(tmp_path, rng, num_examples=6, num_shards=2)
    shard = tmp_path / "train-00001-of-00002.tfrecord"
    content = bytearray(shard.read_bytes())
    if damage == "cut":
        content = content[:-40]  # the last of the shard's 3 records loses its tail
    else:
        content[-40] ^= 0xFF  # a flipped byte in the last record: its CRC no longer matches
    shard.write_bytes(bytes(content))
    with pytest.raises(data.DataError, match="train-00001-of-00002.tfrecord: the shard is "
                                             "truncated or corrupt after record 1 "):
        data.verify_dataset(str(tmp_path))
    with pytest.raises(tf.errors.DataLossError):
        collect(data.make_dataset(str(tmp_path), "train", batch_size=2))


def test_dataset_json_count_that_disagrees_with_the_shards(tmp_path, rng):
    write_image_dataset(tmp_path, rng, num_examples=5, num_shards=1)
    path = tmp_path / data.DATASET_JSON
    obj = json.loads(path.read_text())
    obj["splits"]["train"]["num_examples"] = 7
    obj["splits"]["train"]["shard_sizes"] = []
    path.write_text(json.dumps(obj))
    with pytest.raises(data.DataError, match="hold 5 records but dataset.json says num_examples=7"):
        data.verify_dataset(str(tmp_path))
    # The pipeline's cardinality assertion catches it too, instead of miscounting steps.
    with pytest.raises(tf.errors.FailedPreconditionError, match="7"):
        collect(data.make_dataset(str(tmp_path), "train", batch_size=2))


def test_shard_size_that_disagrees_is_named(tmp_path, rng):
    write_image_dataset(tmp_path, rng, num_examples=6, num_shards=2)
    path = tmp_path / data.DATASET_JSON
    obj = json.loads(path.read_text())
    obj["splits"]["train"]["shard_sizes"] = [4, 2]
    path.write_text(json.dumps(obj))
    with pytest.raises(data.DataError, match="train-00000-of-00002.tfrecord: holds 3 records"):
        data.verify_dataset(str(tmp_path))


def test_missing_shard(tmp_path, rng):
    write_image_dataset(tmp_path, rng, num_examples=6, num_shards=3)
    os.remove(tmp_path / "train-00002-of-00003.tfrecord")
    with pytest.raises(data.DataError, match="missing"):
        data.make_dataset(str(tmp_path), "train", batch_size=2)
    with pytest.raises(data.DataError, match="train-00002-of-00003.tfrecord.*missing"):
        data.verify_dataset(str(tmp_path))


def test_verify_dataset_counts_known_labels(tmp_path, rng):
    expected = write_image_dataset(tmp_path, rng, num_examples=12, num_shards=2)
    report = data.verify_dataset(str(tmp_path))
    rows = np.stack([row for _, row in expected.values()])  # [N, L]
    stats = report.splits["train"]
    assert stats.num_examples == 12
    np.testing.assert_array_equal(stats.positives, (rows == 1).sum(axis=0))
    np.testing.assert_array_equal(stats.negatives, (rows == -1).sum(axis=0))
    assert stats.images_without_positive == int(((rows == 1).sum(axis=1) == 0).sum())
    assert stats.known_ratio == pytest.approx((rows != 0).mean())
    assert stats.label_cardinality == pytest.approx((rows == 1).sum(axis=1).mean())


# ---- pipeline behaviour ------------------------------------------------------------------------


@pytest.mark.parametrize("drop_remainder,expected", [(False, 4), (True, 3)])
def test_cardinality_is_asserted_from_dataset_json(tmp_path, rng, drop_remainder, expected):
    write_image_dataset(tmp_path, rng, num_examples=11, num_shards=2)
    dataset = data.make_dataset(str(tmp_path), "train", batch_size=3, training=True, seed=1,
                                drop_remainder=drop_remainder)
    assert int(dataset.cardinality()) == expected
    assert sum(1 for _ in dataset) == expected
    repeated = data.make_dataset(str(tmp_path), "train", batch_size=3, repeat=True)
    assert int(repeated.cardinality()) == tf.data.INFINITE_CARDINALITY


def test_deterministic_training_order_depends_only_on_the_seed(tmp_path, rng):
    write_image_dataset(tmp_path, rng, num_examples=20, num_shards=4)

    def order(seed):
        dataset = data.make_dataset(str(tmp_path), "train", batch_size=5, training=True,
                                    augment=True, seed=seed, deterministic=True, shuffle_buffer=20)
        inputs, _, ids = collect(dataset)
        return inputs, ids

    first_inputs, first_ids = order(3)
    again_inputs, again_ids = order(3)
    _, other_ids = order(4)
    np.testing.assert_array_equal(first_ids, again_ids)
    np.testing.assert_array_equal(first_inputs, again_inputs)
    assert sorted(first_ids.tolist()) == sorted(other_ids.tolist())
    assert first_ids.tolist() != other_ids.tolist()


def test_augmentation_keeps_labels_shapes_and_range(tmp_path, rng):
    expected = write_image_dataset(tmp_path, rng, num_examples=8, num_shards=2, size=16)
    dataset = data.make_dataset(str(tmp_path), "train", batch_size=4, image_size=12,
                                training=True, augment=True, seed=0, deterministic=True)
    inputs, labels, ids = collect(dataset)
    assert inputs.shape == (8, 12, 12, 3)
    assert inputs.min() >= 0.0 and inputs.max() <= 255.0
    by_hash = {hash_of(k): v[1] for k, v in expected.items()}
    for y, i in zip(labels, ids):
        np.testing.assert_array_equal(y, by_hash[int(i)])


def test_sharding_by_file_with_an_input_context(tmp_path, rng):
    expected = write_image_dataset(tmp_path, rng, num_examples=13, num_shards=4)
    seen = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline,
                                             num_replicas_in_sync=2)
        dataset = data.make_dataset(str(tmp_path), "train", batch_size=4, input_context=context)
        # Shards 0 and 2 hold 4 + 3 records, shards 1 and 3 hold 3 + 3; per-replica batch is 2.
        count = {0: 7, 1: 6}[pipeline]
        assert int(dataset.cardinality()) == -(-count // 2)
        _, _, ids = collect(dataset)
        assert len(ids) == count
        seen.append(set(ids.tolist()))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {hash_of(k) for k in expected}


def test_fewer_shards_than_workers_is_a_clear_error(tmp_path, rng):
    write_image_dataset(tmp_path, rng, num_examples=4, num_shards=2)
    context = tf.distribute.InputContext(num_input_pipelines=3, input_pipeline_id=0,
                                         num_replicas_in_sync=3)
    with pytest.raises(data.DataError, match="2 shard files but there are 3 input pipelines"):
        data.make_dataset(str(tmp_path), "train", batch_size=3, input_context=context)


def test_bad_arguments_are_rejected(tmp_path, rng):
    write_image_dataset(tmp_path, rng, num_examples=2, num_shards=1)
    with pytest.raises(ValueError, match="augment=True needs training=True"):
        data.make_dataset(str(tmp_path), "train", batch_size=2, augment=True)
    with pytest.raises(data.DataError, match="split 'val' is not in this dataset"):
        data.make_dataset(str(tmp_path), "val", batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        data.make_dataset(str(tmp_path), "train", batch_size=0)

"""Image dataset -> `feature/embedding` dataset of a fixed backbone's features (--backbone=features).

The fixed-feature mode of the paper (Open Images: offline pool5 features of a pretrained
ResNet) trains only a linear adapter, the head and the graph on precomputed embeddings. This tool
writes such a dataset from an image-mode one: every record keeps its id, its known positives and
negatives and its image class, and gets the pooled features of `--backbone` (with
--backbone_weights: a Keras weights file such as tfrecords_tools.fashion_pretrain writes, or
imagenet for the keras.applications backbones) in place of its image. Images are decoded with the
evaluation view (`imcl_tf.data.decode_image`), preprocessed as the training application does for
that backbone, and the backbone runs in inference mode (BatchNorm moving statistics). Every split
keeps its shard count and record order.

    imcl-data extract_features --input_dir=data/scenes --output_dir=data/feats \\
        --backbone=small_cnn --backbone_weights=pretrained/small_cnn.weights.h5
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np
from absl import flags

from imcl_tf import data
from tfrecords_tools import common
from tfrecords_tools.common import Progress

CONVERTER = "tfrecords_tools.extract_features"

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string("input_dir", None, "Image-mode dataset folder.", flag_values=flag_values)
    flags.DEFINE_string("output_dir", None, "Features-mode dataset folder to write.",
                        flag_values=flag_values)
    flags.DEFINE_string("backbone", "small_cnn", "Backbone (imcl_tf.models.BACKBONES, not "
                        "features).", flag_values=flag_values)
    flags.DEFINE_string("backbone_weights", None, "Keras weights file of the backbone, or "
                        "imagenet.", flag_values=flag_values)
    flags.DEFINE_list("splits", [], "Splits to convert (default: all).", flag_values=flag_values)
    flags.DEFINE_integer("image_size", 0, "Input size (default: dataset.json's image_size).",
                         lower_bound=0, flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 128, "Images per forward pass.", lower_bound=1,
                         flag_values=flag_values)
    flags.mark_flags_as_required(["input_dir", "output_dir", "backbone_weights"],
                                 flag_values=flag_values)


def extract(input_dir: str, output_dir: str, *, backbone: str = "small_cnn",
            backbone_weights: str, splits: Sequence[str] = (), image_size: int | None = None,
            batch_size: int = 128, progress_interval: float = 10.0,
            stream=None) -> data.DatasetInfo:
    """Writes the features dataset of `input_dir` into `output_dir`; returns its info."""
    stream = stream if stream is not None else sys.stderr
    if os.path.abspath(input_dir) == os.path.abspath(output_dir):
        raise data.DataError("--output_dir must differ from --input_dir (the input is never "
                             "overwritten).")
    info = data.load_dataset_info(input_dir)
    if info.mode != "image":
        raise data.DataError(f"{input_dir} is a {info.mode!r}-mode dataset; feature extraction "
                             "needs images.")
    names = list(splits) or list(info.splits)
    for name in names:
        info.split(name)  # a clear error naming the available splits
    image_size = int(image_size or info.image_size or 0)
    if image_size < 1:
        raise data.DataError(f"{input_dir}/{data.DATASET_JSON} has no image_size; pass "
                             "--image_size.")
    import tensorflow as tf
    from imcl_tf import models

    if backbone == "features" or backbone not in models.BACKBONES:
        raise data.DataError(f"--backbone must be an image backbone of {models.BACKBONES[:-1]}, "
                             f"got {backbone!r}.")
    if backbone_weights != "imagenet" and not os.path.exists(backbone_weights):
        raise data.DataError(f"--backbone_weights {backbone_weights!r}: no such file.")
    # The training application's own model: the same preprocessing and the same weight loading.
    model = models.IMCLModel(num_classes=max(info.num_classes, 1),
                             input_shape_=(image_size, image_size, 3), backbone=backbone,
                             backbone_weights=backbone_weights, method="logistic")

    @tf.function
    def features_of(images):
        return model.extract_features(images, training=False)

    spec = {data.IMAGE_ID_KEY: tf.io.FixedLenFeature([], tf.string),
            data.IMAGE_ENCODED_KEY: tf.io.FixedLenFeature([], tf.string),
            data.POSITIVE_KEY: tf.io.VarLenFeature(tf.int64),
            data.NEGATIVE_KEY: tf.io.VarLenFeature(tf.int64),
            data.IMAGE_CLASS_KEY: tf.io.FixedLenFeature([], tf.int64, default_value=-1)}

    def parse(serialized):
        parsed = tf.io.parse_single_example(serialized, spec)
        image = data.decode_image(parsed[data.IMAGE_ENCODED_KEY], image_size,
                                  parsed[data.IMAGE_ID_KEY])
        return (image, parsed[data.IMAGE_ID_KEY], tf.sparse.to_dense(parsed[data.POSITIVE_KEY]),
                tf.sparse.to_dense(parsed[data.NEGATIVE_KEY]), parsed[data.IMAGE_CLASS_KEY])

    out_splits, embedding_dim = {}, model.feature_dim
    for name in names:
        split_info = info.split(name)
        paths = [os.path.join(input_dir, shard) for shard in split_info.shards]
        # Record by record across the shards: the write order of SplitWriter, so the output
        # shards hold the same records in the same order.
        records = tf.data.Dataset.from_tensor_slices(paths).interleave(
            tf.data.TFRecordDataset, cycle_length=len(paths), block_length=1)
        batches = records.map(parse, num_parallel_calls=tf.data.AUTOTUNE,
                              deterministic=True).ragged_batch(batch_size)
        progress = Progress(f"extract_features {name}", total=split_info.num_examples,
                            interval=progress_interval, stream=stream)
        with data.SplitWriter(output_dir, name, len(split_info.shards)) as writer:
            try:
                for images, ids, positives, negatives, classes in batches:
                    embeddings = features_of(images).numpy()
                    for row in range(len(embeddings)):
                        writer.write(data.make_example(
                            ids[row].numpy(), _indices(positives[row]), _indices(negatives[row]),
                            info.num_classes, embedding=embeddings[row],
                            image_class=int(classes[row]) if int(classes[row]) >= 0 else None))
                        progress.update()
            except tf.errors.OpError as error:
                raise data.DataError(f"{input_dir} split {name!r}: cannot read a record "
                                     f"({error.message.splitlines()[0]}); check it with "
                                     "imcl-data inspect.") from error
        progress.close()
        out_splits[name] = writer.split_info
    out = data.DatasetInfo(
        class_names=list(info.class_names), splits=out_splits, mode="features",
        embedding_dim=int(embedding_dim),
        labels={**info.labels, "features_of": input_dir},
        provenance={"converter": CONVERTER, "date": data.utc_now(),
                    "flags": {"input_dir": input_dir, "output_dir": output_dir,
                              "backbone": backbone, "backbone_weights": backbone_weights,
                              "image_size": image_size, "splits": names},
                    "source_provenance": info.provenance})
    data.replace_dataset_info(output_dir, out)
    print(f"extract_features: wrote {', '.join(f'{s} {i.num_examples}' for s, i in out_splits.items())}"
          f" records of {embedding_dim}-d features to {output_dir}", file=stream)
    return out


def _indices(row) -> list[int]:
    """The class indices of one row of a ragged batch."""
    return [int(v) for v in row.numpy()]


def run(argv: Sequence[str]) -> data.DatasetInfo:
    return _from_flags(common.parse_flags(define_flags, argv))


def _from_flags(flag_values: flags.FlagValues) -> data.DatasetInfo:
    return extract(flag_values.input_dir, flag_values.output_dir, backbone=flag_values.backbone,
                   backbone_weights=flag_values.backbone_weights, splits=flag_values.splits,
                   image_size=flag_values.image_size or None,
                   batch_size=flag_values.batch_size)


def main(argv: Sequence[str]) -> None:
    common.run_main(_from_flags, argv, program="extract_features")


if __name__ == "__main__":
    from tfrecords_tools import commands

    commands.run_tool("extract_features", define_flags, main)

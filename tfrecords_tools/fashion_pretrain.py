"""Pretrains the demo CNN on single Fashion-MNIST items no scene uses: the transfer regime's backbone.

Every one of the paper's runs starts from a backbone pretrained on a large labelled collection.
This tool makes the small-scale equivalent for the Fashion-MNIST scenes: it renders each item of
`fashion_scenes.PRETRAIN_SOURCE` (train[40000:50000], which scenes built with
--reserve_pretrain_items never use) alone on a scene background, tinted with one of the named
tints and placed at random, exactly as the scenes draw them, and trains `small_cnn` (the package's
demo backbone, with the preprocessing the training application gives it) with three softmax
heads: the item class (10), the tint (4) and the half of the image holding the item (2), the
attributes of the item_tint_position label space. The last 1,000 items of the range are held out
for the accuracies it reports. Only the backbone is saved, as a Keras weights file that
`imcl-train --backbone=small_cnn --backbone_weights=FILE` loads; a JSON report
(FILE + ".json") records the items, steps and held-out accuracies.

    imcl-data fashion_pretrain --output=pretrained/small_cnn.weights.h5
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Sequence

import numpy as np
from absl import flags

from imcl_tf import data
from tfrecords_tools import common, fashion_scenes

HELD_OUT_ITEMS = 1000
HEADS = ("item", "tint", "half")

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    flags.DEFINE_string("output", None, "Weights file to write (must end in .weights.h5).",
                        flag_values=flag_values)
    flags.DEFINE_string("fashion_mnist_dir", fashion_scenes.DEFAULT_FASHION_MNIST_DIR,
                        "Folder with the Fashion-MNIST .gz files.", flag_values=flag_values)
    flags.DEFINE_integer("image_size", 64, "Side of the rendered images (the scenes' size).",
                         lower_bound=32, flag_values=flag_values)
    flags.DEFINE_integer("steps", 600, "Training steps.", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 64, "Batch size.", lower_bound=1, flag_values=flag_values)
    flags.DEFINE_float("learning_rate", 2e-3, "Adam learning rate.", flag_values=flag_values)
    flags.DEFINE_integer("num_items", 0, "Use only the first N training items of the range "
                         "(0: all 9,000); for quick runs.", lower_bound=0,
                         flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Seed of the rendering, the weights and the batch order.",
                         flag_values=flag_values)
    flags.mark_flag_as_required("output", flag_values=flag_values)


def render_items(images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                 rng: np.random.Generator, image_size: int = 64
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Each item alone on a scene background: uint8 [N, S, S, 3] and its item/tint/half labels."""
    tint_weights = np.full(len(fashion_scenes.TINT_NAMES), 1.0 / len(fashion_scenes.TINT_NAMES))
    out = np.zeros([len(indices), image_size, image_size, 3], np.uint8)
    targets = {name: np.zeros([len(indices)], np.int64) for name in HEADS}
    for row, index in enumerate(indices):
        canvas = fashion_scenes._background(rng, image_size)
        tint = int(rng.choice(len(tint_weights), p=tint_weights))
        rgb = np.asarray(fashion_scenes.TINT_RGB[tint], np.float32) + rng.uniform(
            -fashion_scenes.TINT_JITTER, fashion_scenes.TINT_JITTER, size=3).astype(np.float32)
        boxes: list[tuple[int, int, int]] = []
        fashion_scenes._paste_item(canvas, images[index], rng, boxes, tint=rgb)
        _, left, side = boxes[-1]
        out[row] = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        targets["item"][row] = int(labels[index])
        targets["tint"][row] = tint
        targets["half"][row] = int(left + side / 2.0 >= image_size / 2.0)
    return out, targets


def pretrain(output: str, *, fashion_mnist_dir: str = fashion_scenes.DEFAULT_FASHION_MNIST_DIR,
             image_size: int = 64, steps: int = 600, batch_size: int = 64,
             learning_rate: float = 2e-3, num_items: int = 0, seed: int = 0,
             stream=None) -> dict:
    """Trains the backbone, writes `output` and `output + '.json'`; returns the report."""
    stream = stream if stream is not None else sys.stderr
    if not output.endswith(".weights.h5"):
        raise data.DataError(f"--output {output!r} must end in '.weights.h5' (the Keras weights "
                             "format --backbone_weights loads).")
    import keras
    import tensorflow as tf
    from imcl_tf import models

    source = fashion_scenes.PRETRAIN_SOURCE
    images, labels = fashion_scenes.load_fashion_mnist(fashion_mnist_dir, source.file)
    indices = np.arange(source.start, source.stop)
    train_indices, held_out = indices[:-HELD_OUT_ITEMS], indices[-HELD_OUT_ITEMS:]
    if num_items:
        train_indices = train_indices[:num_items]
    rng = np.random.default_rng([seed, 7])
    started = time.time()
    train_x, train_y = render_items(images, labels, train_indices, rng, image_size)
    test_x, test_y = render_items(images, labels, held_out, rng, image_size)

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((image_size, image_size, 3), name="images")
    # The same preprocessing IMCLModel applies in front of this backbone.
    probe = models.IMCLModel(num_classes=1, input_shape_=(image_size, image_size, 3),
                             backbone="small_cnn", method="logistic")
    preprocess_mode = probe.preprocess.mode
    del probe
    backbone = models.build_backbone("small_cnn", (image_size, image_size, 3))
    features = backbone(models.Preprocess(preprocess_mode, name="preprocess")(inputs))
    outputs = {name: keras.layers.Dense(size, name=name)(features) for name, size in
               zip(HEADS, (len(fashion_scenes.CLASS_NAMES), len(fashion_scenes.TINT_NAMES),
                           len(fashion_scenes.POSITION_NAMES)))}
    classifier = keras.Model(inputs, outputs)
    classifier.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss={name: keras.losses.SparseCategoricalCrossentropy(from_logits=True)
              for name in HEADS},
        metrics={name: ["accuracy"] for name in HEADS})
    dataset = (tf.data.Dataset.from_tensor_slices((train_x.astype(np.float32), train_y))
               .shuffle(len(train_x), seed=seed).repeat().batch(batch_size))
    steps_per_epoch = min(steps, 100)
    epochs = -(-steps // steps_per_epoch)
    classifier.fit(dataset, steps_per_epoch=steps_per_epoch, epochs=epochs, verbose=0,
                   shuffle=False, callbacks=[_Progress(stream, steps_per_epoch * epochs)])
    # The moving statistics of BatchNorm are what inference mode (and frozen fine-tuning) uses.
    scores = classifier.evaluate(test_x.astype(np.float32), test_y, batch_size=256, verbose=0,
                                 return_dict=True)
    accuracy = {name: float(scores[f"{name}_accuracy"]) for name in HEADS}
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    backbone.save_weights(output)
    report = {
        "tool": "tfrecords_tools.fashion_pretrain",
        "date": data.utc_now(),
        "backbone": "small_cnn",
        "image_size": image_size,
        "item_source": dataclasses.asdict(source),
        "train_items": [int(train_indices[0]), int(train_indices[-1]) + 1],
        "held_out_items": [int(held_out[0]), int(held_out[-1]) + 1],
        "tasks": {"item": list(fashion_scenes.CLASS_NAMES),
                  "tint": list(fashion_scenes.TINT_NAMES),
                  "half": list(fashion_scenes.POSITION_NAMES)},
        "steps": steps_per_epoch * epochs, "batch_size": batch_size,
        "learning_rate": learning_rate, "seed": seed,
        "held_out_accuracy": accuracy,
        "seconds": round(time.time() - started, 1),
    }
    with open(output + ".json", "w") as f:
        json.dump(report, f, indent=2)
    print(f"fashion_pretrain: wrote {output} (held-out accuracy "
          f"{', '.join(f'{k} {v:.3f}' for k, v in accuracy.items())})", file=stream)
    return report


class _Progress:
    """A Keras callback printing a line every epoch (of at most 100 steps)."""

    def __new__(cls, stream, total):
        import keras

        class Callback(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                done = (epoch + 1) * self.params["steps"]
                print(f"fashion_pretrain: step {done}/{total}, loss {logs['loss']:.3f}",
                      file=stream)

        return Callback()


def run(argv: Sequence[str]) -> dict:
    return _from_flags(common.parse_flags(define_flags, argv))


def _from_flags(flag_values: flags.FlagValues) -> dict:
    return pretrain(flag_values.output, fashion_mnist_dir=flag_values.fashion_mnist_dir,
                    image_size=flag_values.image_size, steps=flag_values.steps,
                    batch_size=flag_values.batch_size, learning_rate=flag_values.learning_rate,
                    num_items=flag_values.num_items, seed=flag_values.seed)


def main(argv: Sequence[str]) -> None:
    common.run_main(_from_flags, argv, program="fashion_pretrain")


if __name__ == "__main__":
    from tfrecords_tools import commands

    commands.run_tool("fashion_pretrain", define_flags, main)

"""Input pipeline speed: can imcl_tf.data.make_dataset feed the demo model's training step?

Measures, in one run on the demo dataset (Fashion-MNIST scenes, 64x64 PNG):
  1. the TRAINING input pipeline alone (read shards, parse, decode, resize, shuffle, batch;
     training=True), without and with augmentation, in images/s;
  2. the training step alone: IMCLModel(small_cnn, method=imcl, k=3, per-class dictionary of 10)
     fed from batches already in memory, in images/s;
  3. both together: the same training step fed by the real augmented pipeline.
The pipeline keeps up when (1) is well above (2) and (3) is close to (2).

    python bench/input_bench.py --out bench/results/input.md
    python bench/input_bench.py --data_dir DIR --skip_train_step   # the pipeline alone

Without --data_dir the default demo dataset is built into bench/out/fashion_scenes (timed).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from imcl_tf import data  # noqa: E402

DEFAULT_DATA_DIR = os.path.join(REPO, "bench", "out", "fashion_scenes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None,
                        help="dataset folder (default: build the demo into bench/out)")
    parser.add_argument("--batch_size", type=int, default=32, help="the demo config's batch size")
    parser.add_argument("--pipeline_batches", type=int, default=150,
                        help="timed batches of each pipeline measurement")
    parser.add_argument("--train_steps", type=int, default=60, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=10, help="untimed batches/steps first")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of every measurement; the median is reported")
    parser.add_argument("--skip_train_step", action="store_true",
                        help="measure the input pipeline only (no model)")
    parser.add_argument("--out", default=None, help="write the results as Markdown here")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]

    results = {}
    data_dir = args.data_dir
    if data_dir is None:
        data_dir = DEFAULT_DATA_DIR
        if not os.path.exists(os.path.join(data_dir, data.DATASET_JSON)):
            from tfrecords_tools import fashion_scenes
            start = time.perf_counter()
            fashion_scenes.build(data_dir)
            results["demo build (default flags), s"] = time.perf_counter() - start
    info = data.load_dataset_info(data_dir)
    train_size = info.split("train").num_examples

    # Every measurement is repeated in alternating rounds and the median kept, so a burst of load
    # from other jobs on the shared machine does not favour one side of a ratio.
    rounds: dict[str, list[float]] = {}
    datasets = {augment: data.make_dataset(data_dir, "train", batch_size=args.batch_size,
                                           training=True, augment=augment, seed=0, repeat=True,
                                           drop_remainder=True)
                for augment in (False, True)}
    trainer = None if args.skip_train_step else Trainer(data_dir, info, args)
    for _ in range(args.rounds):
        for augment, dataset in datasets.items():
            rounds.setdefault(f"pipeline alone, augment={augment}, images/s", []).append(
                pipeline_rate(dataset, args.batch_size, args.pipeline_batches, args.warmup))
        if trainer is not None:
            rounds.setdefault("training step alone (in-memory batches), images/s", []).append(
                trainer.in_memory_rate())
            rounds.setdefault("training step fed by the pipeline (augment=True), images/s",
                              []).append(trainer.pipeline_rate())
    spreads = {}
    for name, values in rounds.items():
        results[name] = float(np.median(values))
        spreads[name] = (min(values), max(values))
    if trainer is not None:
        step_rate = results["training step alone (in-memory batches), images/s"]
        results["pipeline (augment=True) / training step"] = (
            results["pipeline alone, augment=True, images/s"] / step_rate)
        results["fed by pipeline / in-memory"] = (
            results["training step fed by the pipeline (augment=True), images/s"] / step_rate)

    report = format_report(args, data_dir, train_size, results, spreads, load_at_start)
    print(report)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(report + "\n")


def pipeline_rate(dataset: tf.data.Dataset, batch_size: int, batches: int, warmup: int) -> float:
    """Images per second delivered by iterating `dataset` (after `warmup` batches)."""
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


class Trainer:
    """The demo model's training step, timed on in-memory batches or on the real pipeline."""

    def __init__(self, data_dir: str, info: data.DatasetInfo, args):
        import keras  # imported here so --skip_train_step works without a model

        from imcl_tf import memory, models

        keras.utils.set_random_seed(0)
        inputs, labels, ids = data.load_split_arrays(data_dir, "train", limit=4096)
        bank = memory.select_dictionary(labels, per_class=10, seed=0)
        self.model = models.IMCLModel(num_classes=info.num_classes,
                                      input_shape_=(info.image_size, info.image_size, 3),
                                      backbone="small_cnn", method="imcl",
                                      dictionary_size=len(bank), k=3)
        self.model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
        self.model.method.fill_bank(inputs[bank], labels[bank], ids[bank])
        self.args = args
        self.in_memory = (tf.data.Dataset.from_tensor_slices((inputs, labels, ids))
                          .batch(args.batch_size, drop_remainder=True).cache().repeat()
                          .prefetch(tf.data.AUTOTUNE))
        self.pipeline = data.make_dataset(data_dir, "train", batch_size=args.batch_size,
                                          training=True, augment=True, seed=1, repeat=True,
                                          drop_remainder=True)

    def in_memory_rate(self) -> float:
        return fit_rate(self.model, self.in_memory, self.args.batch_size, self.args.train_steps,
                        self.args.warmup)

    def pipeline_rate(self) -> float:
        return fit_rate(self.model, self.pipeline, self.args.batch_size, self.args.train_steps,
                        self.args.warmup)


def fit_rate(model, dataset: tf.data.Dataset, batch_size: int, steps: int, warmup: int) -> float:
    """Images/s of model.fit between the end of step `warmup` and the end of the last step.

    Timing inside one fit call leaves out tracing and the iterator start (shuffle buffer fill).
    """
    import keras

    class BatchTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.ends = []

        def on_train_batch_end(self, batch, logs=None):
            self.ends.append(time.perf_counter())

    timer = BatchTimer()
    model.fit(dataset, steps_per_epoch=warmup + steps, epochs=1, verbose=0, shuffle=False,
              callbacks=[timer])
    return steps * batch_size / (timer.ends[-1] - timer.ends[warmup - 1])


def format_report(args, data_dir: str, train_size: int, results: dict[str, float],
                  spreads: dict[str, tuple[float, float]], load_at_start: float) -> str:
    command = "python bench/input_bench.py " + " ".join(sys.argv[1:])
    lines = [
        "# Input pipeline benchmark",
        "",
        f"- command: `{command.strip()}`",
        "- machine: 2-core CPU VM, no GPU, shared with other jobs (1-minute load average "
        f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- TensorFlow {tf.__version__}, Python {platform.python_version()}",
        f"- dataset: {os.path.relpath(data_dir, REPO) if data_dir.startswith(REPO) else 'given'}"
        f", train split {train_size} images, batch size {args.batch_size}",
        f"- pipeline: {args.pipeline_batches} timed batches after {args.warmup}; training: "
        f"{args.train_steps} timed steps after {args.warmup} untimed ones in the same fit call; "
        f"median of {args.rounds} alternating rounds",
        "",
        "| measurement | median | min - max over rounds |",
        "|---|---|---|",
    ]

    def number(value):
        return f"{value:,.2f}" if value < 10 else f"{value:,.0f}"

    for name, value in results.items():
        spread = spreads.get(name)
        spread_text = f"{number(spread[0])} - {number(spread[1])}" if spread else ""
        lines.append(f"| {name} | {number(value)} | {spread_text} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

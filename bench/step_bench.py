"""Time per training step of IMCL against the logistic baseline: same backbone, batch and data.

Every configuration is an `imcl_tf.models.IMCLModel` compiled as `imcl_tf.train` compiles it, and
each step is Keras' own train function (the one `fit` runs) on batches already in memory, so the
input pipeline is not measured. Configurations (all in ONE run):
  demo       small_cnn, 64x64, batch 32, 10 classes, bank of 10 images per class (100 atoms):
             logistic, IMCL with cached neighbours
  mobilenet  MobileNetV2 (weights=None), 224x224, batch 32, 20 classes, bank of 200 atoms:
             logistic, IMCL cached, IMCL forward (neighbours re-run through the backbone)
After warm-up steps (tracing) the variants are timed in alternating rounds, so that load from
other processes on a shared machine hits them alike; medians over rounds are reported, and the
ratio of each IMCL variant to the logistic step of the same backbone.

With --profile the parts IMCL adds to a cached step are timed alone on the same shapes: the
bank-head evaluation (atom label states through the current classifier and graph), the OMP, and
the whole smoothness computation without gradient.

  python bench/step_bench.py --out bench/results/step.md
  python bench/step_bench.py --quick          # tiny sizes, a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from imcl_tf import losses, models  # noqa: E402
from imcl_tf.omp import joint_nonnegative_omp  # noqa: E402

SUITES = {
    # name: backbone, image size, classes, bank atoms, variants
    "demo": ("small_cnn", 64, 10, 100, ("logistic", "cached")),
    "mobilenet": ("mobilenet_v2", 224, 20, 200, ("logistic", "cached", "forward")),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suites", default="demo,mobilenet", help="comma-separated: "
                        + ", ".join(SUITES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="alternating timed rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--profile", action="store_true", help="also time IMCL's parts alone")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--out", help="write the Markdown report here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.suites = [name.strip() for name in args.suites.split(",") if name.strip()]
    unknown = [name for name in args.suites if name not in SUITES]
    if unknown:
        parser.error(f"--suites: unknown {unknown}; choose from {sorted(SUITES)}.")
    if args.quick:
        args.rounds, args.steps, args.warmup, args.batch = 2, 1, 1, 4
    return args


class Variant:
    """One model and its Keras train function, fed the same in-memory batch every step."""

    def __init__(self, suite, name, args, rng):
        backbone, size, num_classes, bank_size, _ = SUITES[suite]
        if args.quick:
            size, bank_size = (32 if backbone == "mobilenet_v2" else 16), 2 * num_classes
        self.suite, self.name = suite, name
        keras.utils.set_random_seed(args.seed)
        method = "logistic" if name == "logistic" else "imcl"
        options = ({"dictionary_size": bank_size, "k": args.k, "balance": "none",
                    "neighbour_mode": "forward" if name == "forward" else "cached"}
                   if method == "imcl" else {})
        self.model = models.IMCLModel(num_classes, (size, size, 3), backbone=backbone,
                                      method=method, method_options=options)
        self.model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
        self.model.optimizer.build(self.model.trainable_variables)
        images = rng.integers(0, 256, [args.batch, size, size, 3]).astype(np.float32)
        labels = partial_labels(rng, args.batch, num_classes)
        ids = np.arange(args.batch, dtype=np.int64)
        if method == "imcl":
            # Half of the batch is in the bank, as when the bank holds training images.
            bank_images = rng.integers(0, 256, [bank_size, size, size, 3]).astype(np.uint8)
            bank_ids = np.arange(bank_size, dtype=np.int64) + args.batch // 2
            self.model.method.fill_bank(bank_images, partial_labels(rng, bank_size, num_classes),
                                 bank_ids)
        self.batch = (tf.constant(images), tf.constant(labels), tf.constant(ids))
        self.model.make_train_function()
        self.iterator = iter(tf.data.Dataset.from_tensors(self.batch).repeat())
        self.times: list[float] = []  # seconds per step, one entry per round

    def step(self):
        logs = self.model.train_function(self.iterator)
        return float(np.asarray(logs["loss"]))  # waits for the step to finish

    def timed(self, steps):
        started = time.perf_counter()
        for _ in range(steps):
            loss = self.step()
        self.times.append((time.perf_counter() - started) / steps)
        if not np.isfinite(loss):
            raise FloatingPointError(f"{self.suite}/{self.name}: loss {loss}")


def partial_labels(rng, rows, num_classes):
    """Rows in {+1, -1, 0}: 30 % of the entries known, a third of those positive."""
    labels = np.where(rng.random([rows, num_classes]) < 1 / 3, 1.0, -1.0)
    labels[rng.random([rows, num_classes]) > 0.3] = 0.0
    return labels.astype(np.float32)


def profile_parts(variant, logistic, args, rounds):
    """Median seconds of the parts of a cached IMCL step, each alone on the step's shapes.

    The logistic and the cached IMCL steps are timed again in the same rounds, so the parts can be
    compared with steps measured under the same load.
    """
    model = variant.model
    inputs, labels, ids = variant.batch

    @tf.function
    def backbone_forward_backward():
        with tf.GradientTape() as tape:
            logits = model(inputs, training=True)
            loss = losses.masked_bce(labels, logits)
        return tape.gradient(loss, model.trainable_variables)[0]

    @tf.function
    def bank_head():
        # What the step does: chunk by chunk, no gradient; row blocks, as the OMP reads them.
        return model.method.selection_atom_state_blocks()

    features = model.extract_features(inputs)
    logits = model.head(features)
    query_y = losses.query_label_states(logits, labels, model.method.asym_c)
    query_f = tf.concat([features, tf.ones_like(features[:, :1])], axis=1)
    atoms_y = bank_head()
    atoms_f = tf.concat([model.method.bank.features, tf.ones_like(model.method.bank.features[:, :1])], axis=1)
    exclude = model.method.bank.exclusion_mask(ids)

    @tf.function
    def omp():  # as the step runs it: XLA-compiled unless the model says otherwise
        return joint_nonnegative_omp(query_y, query_f, atoms_y, atoms_f, model.method.k,
                                     lambda_y=1.0, lambda_f=0.5, exclude=exclude,
                                     jit_compile=model.method.omp_jit_compile).coef_y

    @tf.function
    def smoothness_no_gradient():
        return model.method._smoothness_terms(inputs, features, logits, labels, ids, False,
                                       model.method.lambda_y, model.method.lambda_f)["loss_y"]

    parts = {"logistic step (reference)": logistic.step,
             "cached IMCL step": variant.step,
             "backbone forward+backward (masked BCE)": backbone_forward_backward,
             "bank head evaluation (M atoms through head and graph)": bank_head,
             "joint nonnegative OMP": omp,
             "smoothness terms without gradient (states, OMP, residuals)": smoothness_no_gradient}
    times = {name: [] for name in parts}
    for fn in parts.values():
        np.asarray(fn())  # trace
    for _ in range(rounds):
        for name, fn in parts.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                np.asarray(fn())
            times[name].append((time.perf_counter() - started) / args.steps)
    return {name: statistics.median(values) for name, values in times.items()}


def main():
    args = parse_args()
    rng = np.random.default_rng(args.seed)
    load_start = os.getloadavg()[0]
    started = time.time()
    variants = []
    for suite in args.suites:
        for name in SUITES[suite][4]:
            print(f"building {suite}/{name}", flush=True)
            variants.append(Variant(suite, name, args, rng))
    for variant in variants:
        print(f"warming up {variant.suite}/{variant.name}", flush=True)
        for _ in range(args.warmup):
            variant.step()
    for round_index in range(args.rounds):
        for variant in variants:
            variant.timed(args.steps)
        print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
            f"{v.suite}/{v.name} {v.times[-1]:.3f} s" for v in variants), flush=True)
    profiles = {}
    if args.profile:
        logistic = {v.suite: v for v in variants if v.name == "logistic"}
        for variant in variants:
            if variant.name == "cached":
                print(f"profiling {variant.suite}/cached", flush=True)
                profiles[variant.suite] = profile_parts(variant, logistic[variant.suite], args,
                                                        args.rounds)
    report = format_report(args, variants, profiles, load_start, os.getloadavg()[0],
                           time.time() - started)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(report)


def format_report(args, variants, profiles, load_start, load_end, seconds):
    date = subprocess.run(["date", "-u", "+%Y-%m-%d %H:%M UTC"], capture_output=True,
                          text=True).stdout.strip()
    command = "python bench/step_bench.py " + " ".join(sys.argv[1:])
    lines = [
        "# Training step time: IMCL against the logistic baseline", "",
        f"- command: `{command.strip()}`",
        f"- machine: 2-core CPU VM, no GPU, shared with other jobs (1-minute load average "
        f"{load_start:.1f} at the start, {load_end:.1f} at the end)",
        f"- date: {date}",
        f"- TensorFlow {tf.__version__}, Keras {keras.__version__}, Python "
        f"{platform.python_version()}",
        f"- batch {args.batch}, k = {args.k}; {args.warmup} untimed steps per variant, then "
        f"{args.rounds} alternating rounds of {args.steps} steps; median over rounds; whole run "
        f"{seconds / 60:.1f} min",
        "- x logistic: ratio of the medians; per round: median (range) of the ratios to the "
        "logistic step timed in the same round",
        "- step = Keras' train function (what `fit` runs) on one batch already in memory: "
        "forward, loss, gradient, Adam update; IMCL adds the label states, the OMP against the "
        "bank, the smoothness residuals and (forward mode) the neighbours' forward and backward",
        "",
        "| backbone | input | classes | bank atoms | variant | step (s) | min - max (s) | "
        "images/s | x logistic | x logistic, per round |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    logistic = {v.suite: v for v in variants if v.name == "logistic"}
    for v in variants:
        backbone, size, num_classes, bank_size, _ = SUITES[v.suite]
        if args.quick:
            size = 32 if backbone == "mobilenet_v2" else 16
        median = statistics.median(v.times)
        base = logistic[v.suite].times
        ratio = median / statistics.median(base)
        # The same round's logistic time: load that drifts between rounds cancels out.
        paired = [mine / theirs for mine, theirs in zip(v.times, base)]
        bank = "-" if v.name == "logistic" else str(v.model.method.dictionary_size)
        lines.append(f"| {backbone} | {size}x{size} | {num_classes} | {bank} | {v.name} | "
                     f"{median:.3f} | {min(v.times):.3f} - {max(v.times):.3f} | "
                     f"{args.batch / median:.1f} | {ratio:.2f} | median "
                     f"{statistics.median(paired):.2f} ({min(paired):.2f} - {max(paired):.2f}) |")
    for suite, parts in profiles.items():
        reference = parts["logistic step (reference)"]
        lines += ["", f"Parts of a cached IMCL step on {suite}, each timed alone in alternating "
                  f"rounds with the two full steps (median s of {args.rounds} rounds of "
                  f"{args.steps}):", "",
                  "| part | s | / logistic step |", "|---|---|---|"]
        for name, value in parts.items():
            lines.append(f"| {name} | {value:.4f} | {value / reference:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""IMCL at the paper's sizes: step time and peak memory against logistic and against a floor.

Features mode (`--backbone=features`, synthetic embeddings), batch 32, k = 3, cached neighbours,
a learnable sparse label graph with 5 related labels per class (the paper's COCO graph keeps 5),
at (labels L, bank M, feature D) = (80, 8192, 2048), (1000, 10000, 4096), (5000, 10000, 2048) and
(5000, 50000, 2048) (issue 10). For every size, in ONE process and in alternating rounds:
  logistic  the baseline's Keras train step (what `fit` runs)
  imcl      IMCL's train step, label states refreshed every step (exact)
  floor     what any IMCL step must compute, timed alone: one forward pass of the classifier
            over the bank's M features ([M, D] x [D, L]) plus the OMP's k chained matrix
            products ([B, L] x [L, M] and [B, D] x [D, M] per step)
Peak memory (VmHWM, the process's resident high-water mark) is measured for logistic and IMCL
each in a fresh subprocess that builds the model, fills the bank and runs two steps.

  python bench/scale_bench.py --out bench/results/scale.md
  python bench/scale_bench.py --quick                  # tiny sizes, a smoke run
  python bench/scale_bench.py --image_mode             # COCO-size image bank (see below)

--image_mode: a bank of 10,000 224 x 224 images (synthetic JPEG-free uint8 pixels) with
MobileNetV2 (weights=None) and 1,000 labels is filled chunk by chunk and trains a few steps in
cached and in forward mode, each in its own subprocess; reported: peak memory, the peak during
the fill above the model alone, and the sizes of a saved .keras model and of a training
checkpoint against the model's weights plus the bank's features.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = ((80, 8192, 2048), (1000, 10000, 4096), (5000, 10000, 2048), (5000, 50000, 2048))
QUICK_SIZES = ((6, 40, 8), (12, 64, 16))
VARIANTS = ("logistic", "imcl", "floor")
GRAPH_NEIGHBOURS = 5
GiB = 1024 ** 3


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="", help="semicolon-separated L,M,D triples "
                        "(default: the four of issue 10)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--label_state_refresh_every", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--image_mode", action="store_true", help="the COCO-size image check")
    parser.add_argument("--image_atoms", type=int, default=10000)
    parser.add_argument("--image_classes", type=int, default=1000)
    parser.add_argument("--out", help="write the Markdown report here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.sizes:
        try:
            args.sizes = [tuple(int(x) for x in part.split(",")) for part in
                          args.sizes.split(";") if part.strip()]
        except ValueError:
            parser.error(f"--sizes: expected L,M,D triples separated by ';', received "
                         f"{args.sizes!r}.")
        if not args.sizes or any(len(s) != 3 or min(s) < 1 for s in args.sizes):
            parser.error("--sizes: every entry must be three positive integers L,M,D.")
    else:
        args.sizes = list(QUICK_SIZES if args.quick else SIZES)
    if args.quick:
        args.rounds, args.steps, args.warmup, args.batch = 2, 1, 1, 4
        args.image_atoms, args.image_classes = 12, 5
    for name in ("batch", "k", "rounds", "steps", "label_state_refresh_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, received {getattr(args, name)}.")
    return args


# ---- measurements (run in worker subprocesses) ----------------------------------------------------


def peak_memory_bytes() -> int:
    """The process's resident high-water mark (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # not Linux: ru_maxrss is in kilobytes there too on most systems
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def sparse_graph(num_classes, rng):
    """A normalised graph with GRAPH_NEIGHBOURS random related labels per column, float32."""
    import numpy as np
    graph = np.zeros([num_classes, num_classes], np.float32)
    for _ in range(min(GRAPH_NEIGHBOURS, num_classes - 1)):
        graph[rng.integers(0, num_classes, num_classes), np.arange(num_classes)] = 0.5
    np.fill_diagonal(graph, 1.0)
    graph /= graph.sum(axis=0, keepdims=True)
    return graph


def partial_labels(rng, rows, num_classes):
    """Rows in {+1, -1, 0}: 30 % of the entries known, a third of those positive."""
    import numpy as np
    labels = np.where(rng.random([rows, num_classes]) < 1 / 3, 1, -1).astype(np.int8)
    labels[rng.random([rows, num_classes]) > 0.3] = 0
    return labels


class FeatureVariant:
    """One features-mode model (logistic or IMCL) and its Keras train function."""

    def __init__(self, method, size, args, rng):
        import keras
        import numpy as np
        import tensorflow as tf
        from imcl_tf import models
        num_classes, bank_size, dim = size
        self.name = method
        keras.utils.set_random_seed(args.seed)
        graph = sparse_graph(num_classes, rng) if method == "imcl" else None
        options = ({"dictionary_size": bank_size, "k": args.k, "balance": "none",
                    "label_graph_init": graph,
                    "label_state_refresh_every": args.label_state_refresh_every}
                   if method == "imcl" else {})
        self.model = models.IMCLModel(num_classes, (dim,), backbone="features", method=method,
                                      method_options=options)
        del options
        del graph
        self.model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
        self.model.optimizer.build(self.model.trainable_variables)
        features = rng.normal(size=[args.batch, dim]).astype(np.float32)
        labels = partial_labels(rng, args.batch, num_classes).astype(np.float32)
        ids = np.arange(args.batch, dtype=np.int64)
        if method == "imcl":
            # Half of the batch is in the bank, as when the bank holds training images.
            def chunks(chunk=2048):
                for start in range(0, bank_size, chunk):
                    count = min(chunk, bank_size - start)
                    yield (rng.normal(size=[count, dim]).astype(np.float32),
                           partial_labels(rng, count, num_classes),
                           np.arange(start, start + count, dtype=np.int64) + args.batch // 2)
            self.model.method.fill_bank(chunks())
        self.batch = (tf.constant(features), tf.constant(labels), tf.constant(ids))
        self.model.make_train_function()
        self.iterator = iter(tf.data.Dataset.from_tensors(self.batch).repeat())

    def step(self):
        import numpy as np
        logs = self.model.train_function(self.iterator)
        loss = float(np.asarray(logs["loss"]))  # waits for the step to finish
        if not np.isfinite(loss):
            raise FloatingPointError(f"{self.name}: loss {loss}")


def make_floor(imcl, args):
    """The floor of an IMCL step on the IMCL model's own shapes: the head over the bank (as
    TensorFlow runs it) plus the OMP's k chained GEMMs (XLA-compiled, as in the step)."""
    import tensorflow as tf
    model = imcl.model
    features, labels, _ = imcl.batch
    bank = model.method.bank.features
    atoms_y = model.method._atom_states.value[0]  # the row blocks of [M, L] the OMP reads
    query_y = tf.stop_gradient(model(features))
    query_f = features

    @tf.function
    def head_over_bank():  # one forward pass of the classifier over the bank, [M, D] x [D, L]
        return tf.reduce_sum(model.head(bank)[:, 0])

    @tf.function(jit_compile=True)  # compiled, as the OMP is inside the step
    def chained_products(residual_y, residual_f):
        for _ in range(args.k):  # the OMP's k chained GEMMs
            corr = (tf.concat([tf.matmul(residual_y, block, transpose_b=True)
                               for block in atoms_y], axis=1) +
                    tf.matmul(residual_f, bank, transpose_b=True))  # [B, M]
            top = 1e-9 * tf.reduce_max(corr, axis=1, keepdims=True)
            residual_y, residual_f = residual_y - top, residual_f - top
        return tf.reduce_sum(residual_y) + tf.reduce_sum(residual_f)

    def floor():
        return head_over_bank() + chained_products(query_y, query_f)

    return floor


def time_worker(size, args):
    """Times logistic, IMCL and the floor in alternating rounds; returns seconds per step."""
    import numpy as np
    rng = np.random.default_rng(args.seed)
    built = {}
    for method in ("logistic", "imcl"):
        print(f"  building {method} {size}", flush=True)
        built[method] = FeatureVariant(method, size, args, rng)
    floor = make_floor(built["imcl"], args)
    steps = {"logistic": built["logistic"].step, "imcl": built["imcl"].step,
             "floor": lambda: float(np.asarray(floor()))}
    for name, step in steps.items():
        started = time.perf_counter()
        for _ in range(args.warmup):
            step()
        print(f"  warm-up {name}: {time.perf_counter() - started:.1f} s", flush=True)
    times = {name: [] for name in steps}
    for round_index in range(args.rounds):
        order = list(steps) if round_index % 2 == 0 else list(steps)[::-1]
        for name in order:
            started = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            times[name].append((time.perf_counter() - started) / args.steps)
        print(f"  round {round_index + 1}: " + ", ".join(
            f"{name} {values[-1]:.3f} s" for name, values in times.items()), flush=True)
    return {"times": times}


def memory_worker(method, size, args):
    """Builds one model, fills its bank, runs two steps; the process's peak memory."""
    import numpy as np
    import tensorflow as tf  # noqa: F401  (imported first: its own footprint is reported)
    from imcl_tf import models  # noqa: F401
    after_import = peak_memory_bytes()
    variant = FeatureVariant(method, size, args, np.random.default_rng(args.seed))
    built = peak_memory_bytes()
    for _ in range(2):
        variant.step()
    return {"peak": peak_memory_bytes(), "after_import": after_import, "after_build": built}


def image_worker(mode, args):
    """The COCO-size image bank: fill, a few steps, save; memory and file sizes."""
    import keras
    import numpy as np
    import tensorflow as tf
    from imcl_tf import models
    size = 64 if args.quick else 224
    atoms, classes = args.image_atoms, args.image_classes
    rng = np.random.default_rng(args.seed)
    after_import = peak_memory_bytes()
    keras.utils.set_random_seed(args.seed)
    method = "logistic" if mode == "model_only" else "imcl"
    options = ({"dictionary_size": atoms, "k": args.k, "balance": "none",
                "neighbour_mode": mode} if method == "imcl" else {})
    model = models.IMCLModel(classes, (size, size, 3), backbone="mobilenet_v2", method=method,
                             method_options=options)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=False)
    model.optimizer.build(model.trainable_variables)
    batch = 4 if args.quick else 8
    images = rng.integers(0, 256, [batch, size, size, 3]).astype(np.float32)
    labels = partial_labels(rng, batch, classes).astype(np.float32)
    data = tf.data.Dataset.from_tensors((tf.constant(images), tf.constant(labels),
                                         tf.constant(np.arange(batch, dtype=np.int64)))).repeat()
    model.make_train_function()
    iterator = iter(data)
    if method == "logistic":  # the model alone, trained one step: the reference peak
        model.train_function(iterator)
    model_peak = peak_memory_bytes()  # IMCL: built, bank empty (compare the model_only row)
    result = {"after_import": after_import, "model_peak": model_peak}
    if method == "imcl":
        def chunks(chunk=256):  # decoded images arrive as float32 0..255, chunk by chunk
            for start in range(0, atoms, chunk):
                count = min(chunk, atoms - start)
                yield (rng.integers(0, 256, [count, size, size, 3]).astype(np.float32),
                       partial_labels(rng, count, classes),
                       np.arange(start, start + count, dtype=np.int64) + batch // 2)
        started = time.perf_counter()
        model.method.fill_bank(chunks())
        result["fill_seconds"] = time.perf_counter() - started
        result["fill_peak"] = peak_memory_bytes()
        model.make_train_function(force=True)
        iterator = iter(data)
    steps = 2
    started = time.perf_counter()
    for _ in range(steps):
        logs = model.train_function(iterator)
    result["step_seconds"] = (time.perf_counter() - started) / steps
    result["loss"] = float(np.asarray(logs["loss"]))
    result["peak"] = peak_memory_bytes()
    weights = sum(int(np.prod(v.shape)) * v.dtype.itemsize if hasattr(v.dtype, "itemsize")
                  else int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights)
    result["weights_bytes"] = weights
    bank = getattr(model.method, "bank", None)  # logistic has none
    bank_features = 0 if bank is None else int(np.prod(bank.features.shape)) * 4
    result["bank_feature_bytes"] = bank_features
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        model.save(path)
        result["keras_file_bytes"] = os.path.getsize(path)
        prefix = tf.train.Checkpoint(model=model, optimizer=model.optimizer).write(
            os.path.join(folder, "ckpt"))
        result["checkpoint_bytes"] = sum(
            os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)
            if name.startswith(os.path.basename(prefix)))
        optimizer_bytes = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize
                              for v in model.optimizer.variables)
        result["optimizer_bytes"] = optimizer_bytes
    return result


# ---- the driver ------------------------------------------------------------------------------------


def run_worker(kind, args, size=None):
    """Runs one measurement in a fresh Python process; returns its JSON result."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind,
               "--batch", str(args.batch), "--k", str(args.k), "--rounds", str(args.rounds),
               "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--label_state_refresh_every", str(args.label_state_refresh_every),
               "--image_atoms", str(args.image_atoms), "--image_classes", str(args.image_classes),
               "--seed", str(args.seed)]
    if size is not None:
        command += ["--sizes", ",".join(str(x) for x in size)]
    if args.quick:
        command.append("--quick")
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        env = {**os.environ, "SCALE_BENCH_RESULT": out.name}
        completed = subprocess.run(command, env=env)
        if completed.returncode != 0:
            raise SystemExit(f"scale_bench: the {kind} worker for {size} failed "
                             f"(exit {completed.returncode}); see its output above.")
        return json.load(open(out.name))


def worker_main(args):
    kind = args.worker
    if kind == "time":
        result = time_worker(args.sizes[0], args)
    elif kind.startswith("memory-"):
        result = memory_worker(kind[len("memory-"):], args.sizes[0], args)
    elif kind.startswith("image-"):
        result = image_worker(kind[len("image-"):], args)
    else:
        raise SystemExit(f"scale_bench: unknown worker {kind!r}.")
    with open(os.environ["SCALE_BENCH_RESULT"], "w") as f:
        json.dump(result, f)


def header(args, load_start, load_end, seconds, title):
    import keras
    import tensorflow as tf
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "python bench/scale_bench.py " + " ".join(sys.argv[1:])
    return [
        f"# {title}", "",
        f"- command: `{command.strip()}`",
        f"- machine: 2-core CPU VM, 24 GiB, no GPU, shared with other jobs (`uptime` 1-minute "
        f"load average {load_start:.1f} at the start, {load_end:.1f} at the end)",
        f"- date: {date}; whole run {seconds / 60:.1f} min",
        f"- TensorFlow {tf.__version__}, Keras {keras.__version__}, Python "
        f"{platform.python_version()}",
    ]


def features_report(args, results, load_start, load_end, seconds):
    lines = header(args, load_start, load_end, seconds,
                   "IMCL at scale: features mode, step time and peak memory")
    lines += [
        f"- features mode, synthetic embeddings, batch {args.batch}, k = {args.k}, cached "
        f"neighbours, learnable sparse label graph ({GRAPH_NEIGHBOURS} related labels per class, "
        f"clipped), label states refreshed every {args.label_state_refresh_every} step(s); "
        f"{args.warmup} untimed step(s) per variant, then {args.rounds} alternating rounds of "
        f"{args.steps} step(s); median over rounds",
        "- step: Keras' train function (what `fit` runs) on one batch in memory; floor: the "
        "classifier over the bank ([M, D] x [D, L]) plus the OMP's k chained [B, L+D] x "
        "[L+D, M] products (XLA-compiled, as the step's OMP is), timed alone in the same rounds",
        "- peak: VmHWM of a fresh process that builds the model, fills the bank and runs two "
        "steps (TensorFlow alone, after import, is given for reference)", "",
        "| L | M | D | logistic step (s) | IMCL step (s) | floor (s) | IMCL / floor | "
        "IMCL / logistic | peak logistic (GiB) | peak IMCL (GiB) | after import (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, result in results:
        times = {name: statistics.median(values) for name, values in
                 result["time"]["times"].items()}
        lines.append(
            f"| {size[0]} | {size[1]} | {size[2]} | {times['logistic']:.3f} | "
            f"{times['imcl']:.3f} | {times['floor']:.3f} | "
            f"{times['imcl'] / times['floor']:.2f} | {times['imcl'] / times['logistic']:.1f} | "
            f"{result['memory-logistic']['peak'] / GiB:.2f} | "
            f"{result['memory-imcl']['peak'] / GiB:.2f} | "
            f"{result['memory-imcl']['after_import'] / GiB:.2f} |")
    return "\n".join(lines) + "\n"


def image_report(args, results, load_start, load_end, seconds):
    lines = header(args, load_start, load_end, seconds,
                   "IMCL at scale: a COCO-size image bank")
    size = 64 if args.quick else 224
    lines += [
        f"- MobileNetV2 (weights=None), {size} x {size} images, {args.image_classes} labels, "
        f"bank of {args.image_atoms} images (synthetic uint8 pixels, delivered to the bank as "
        "float32 chunks of 256 as the dataset reader decodes them), k = 3; each row a fresh "
        "process: build, one step of the model alone (its peak = model peak), fill the bank, "
        "two steps (batch 8); sizes of a .keras file and of a tf.train checkpoint (model + optimizer)",
        "",
        "| mode | model peak (GiB) | fill peak (GiB) | fill above model (GiB) | fill (s) | "
        "peak (GiB) | step (s) | weights (MB) | bank features (MB) | optimizer (MB) | "
        ".keras (MB) | checkpoint (MB) | .keras / (weights) | checkpoint / (weights + "
        "optimizer) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    mb = 1e6
    for mode, r in results:
        fill_peak = r.get("fill_peak")
        fill = "-" if fill_peak is None else f"{fill_peak / GiB:.2f}"
        above = "-" if fill_peak is None else f"{(fill_peak - r['model_peak']) / GiB:.2f}"
        seconds_fill = "-" if fill_peak is None else f"{r['fill_seconds']:.0f}"
        weights = r["weights_bytes"]
        lines.append(
            f"| {mode} | {r['model_peak'] / GiB:.2f} | {fill} | {above} | {seconds_fill} | "
            f"{r['peak'] / GiB:.2f} | {r['step_seconds']:.2f} | {weights / mb:.1f} | "
            f"{r['bank_feature_bytes'] / mb:.1f} | {r['optimizer_bytes'] / mb:.1f} | "
            f"{r['keras_file_bytes'] / mb:.1f} | {r['checkpoint_bytes'] / mb:.1f} | "
            f"{r['keras_file_bytes'] / weights:.3f} | "
            f"{r['checkpoint_bytes'] / (weights + r['optimizer_bytes']):.3f} |")
    lines += ["", "weights = every weight of the model, the bank's features, label rows and "
              "ids included (its images are not weights); the bank's features are part of it."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    load_start = os.getloadavg()[0]
    started = time.time()
    if args.image_mode:
        results = []
        for mode in ("model_only", "cached", "forward"):
            print(f"image mode: {mode}", flush=True)
            results.append((mode, run_worker(f"image-{mode}", args)))
        report = image_report(args, results, load_start, os.getloadavg()[0],
                              time.time() - started)
    else:
        results = []
        for size in args.sizes:
            result = {}
            for kind in ("time", "memory-logistic", "memory-imcl"):
                print(f"{size}: {kind}", flush=True)
                result[kind] = run_worker(kind, args, size)
            results.append((size, result))
        report = features_report(args, results, load_start, os.getloadavg()[0],
                                 time.time() - started)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())

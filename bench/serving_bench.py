"""Serving overhead: the gRPC server (own process, loopback) vs the same signature in-process.

Measures p50/p99 latency at batch 1 and 32 (sequential requests) and throughput at concurrency 1
and 8 (threads sending batch-1 requests), for `serving_default` (JPEG bytes in, decoding inside the
graph) of the demo's model: imcl_tf.models.IMCLModel with the small_cnn backbone on 64x64
images, randomly initialised (speed does not depend on the weights).

    python bench/serving_bench.py --out bench/results/serving.md

Targets: at most 2 ms added to p50 at batch 1; at concurrency 8 at least 70% of the in-process
throughput.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from imcl_tf import export  # noqa: E402
from serving.client import PredictionClient  # noqa: E402

IMAGE_SIZE = 64
NUM_CLASSES = 10
MODEL_NAME = "bench"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300,
                        help="requests per latency series at batch 1 (a fifth of it at batch 32)")
    parser.add_argument("--throughput_seconds", type=float, default=8.0,
                        help="duration of each throughput run")
    parser.add_argument("--out", default=None, help="write the results as Markdown here")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]  # other jobs share the machine: say how busy it was
    with tempfile.TemporaryDirectory() as export_base:
        version_dir = export.export_model(build_demo_model(), export_base, MODEL_NAME,
                                          class_names=[f"class_{i}" for i in range(NUM_CLASSES)],
                                          input_mode="image", image_size=IMAGE_SIZE)
        images = demo_jpegs(32)
        server, port = start_server_process(os.path.join(export_base, MODEL_NAME))
        try:
            client = PredictionClient(f"127.0.0.1:{port}", MODEL_NAME)
            signature = tf.saved_model.load(version_dir).signatures[export.SERVING_DEFAULT]

            def local(batch):
                return signature(image_bytes=tf.constant(batch))

            def remote(batch):
                return client.predict_bytes(batch, top_k=5)

            check_same_answer(local, remote, images[:4])
            rows = []
            for batch_size, count in ((1, args.requests), (32, max(args.requests // 5, 20))):
                rows.append((batch_size, *paired_latencies(local, remote, images[:batch_size],
                                                           count)))
            # The transport alone: GetModelStatus runs no TensorFlow. Back to back, and after an
            # idle gap as long as the model's batch-1 compute, when the server's and client's
            # threads have gone to sleep and must be woken on a busy machine.
            gap = float(np.percentile(rows[0][1], 50)) / 1000.0
            status_ms = (round_trips(client.status, 0.0, args.requests),
                         round_trips(client.status, gap, args.requests))
            throughput = []
            for concurrency in (1, 8):
                throughput.append((concurrency, *paired_throughput(
                    local, remote, images[:1], concurrency, args.throughput_seconds)))
            client.close()
        finally:
            server.terminate()
            server.wait(timeout=60)
    report = format_report(rows, throughput, status_ms, (load_before, os.getloadavg()[0]), args)
    print(report)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(report)


def build_demo_model():
    """The demo's model: imcl_tf.models.IMCLModel with the small_cnn backbone on 64x64 images."""
    import keras

    from imcl_tf import models

    keras.utils.set_random_seed(0)
    return models.IMCLModel(num_classes=NUM_CLASSES, input_shape_=(IMAGE_SIZE, IMAGE_SIZE, 3),
                            backbone="small_cnn", method="logistic")


def demo_jpegs(count: int) -> list[bytes]:
    """Smooth random 80x96 images as JPEG (resized and cropped to 64x64 in the graph)."""
    rng = np.random.default_rng(0)
    coarse = rng.uniform(0, 255, size=[count, 5, 6, 3]).astype(np.float32)
    pixels = tf.cast(tf.image.resize(coarse, [80, 96]), tf.uint8).numpy()
    return [tf.io.encode_jpeg(image).numpy() for image in pixels]


def start_server_process(model_base_path: str) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "serving.server", f"--model_base_path={model_base_path}",
               f"--model_name={MODEL_NAME}", "--port=0", "--max_batch_size=64"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = process.stdout.readline()  # the server prints one line once it is serving
    match = re.search(r"on [^ ]+:(\d+)$", line.strip())
    if not match:
        process.kill()
        raise RuntimeError(f"the server did not start; it printed {line!r}")
    return process, int(match.group(1))


def check_same_answer(local, remote, batch) -> None:
    expected = local(batch)
    scores = np.array([[score for _, score in ranked] for ranked in remote(batch)])
    np.testing.assert_allclose(scores, expected[export.TOP_K_SCORES].numpy(), atol=1e-6)


def paired_latencies(local, remote, batch, count: int,
                     block: int = 25) -> tuple[np.ndarray, np.ndarray]:
    """Milliseconds per call of each function, in alternating blocks of `block` calls.

    Blocks keep each side warm (as under a steady request stream) while load changes on the
    shared machine hit both sides alike.
    """
    for _ in range(10):  # warm caches and the gRPC channel
        local(batch)
        remote(batch)
    times = {local: [], remote: []}
    while len(times[remote]) < count:
        for fn in (local, remote):
            for _ in range(min(block, count - len(times[fn]))):
                start = time.perf_counter()
                fn(batch)
                times[fn].append(time.perf_counter() - start)
    return np.array(times[local]) * 1000.0, np.array(times[remote]) * 1000.0


def round_trips(fn, gap_seconds: float, count: int) -> np.ndarray:
    """Milliseconds per call of `fn`, sleeping `gap_seconds` before each call."""
    times = []
    for _ in range(count):
        if gap_seconds:
            time.sleep(gap_seconds)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return np.array(times) * 1000.0


def paired_throughput(local, remote, batch, concurrency: int, seconds: float,
                      rounds: int = 2) -> tuple[float, float]:
    """Images per second of each function with `concurrency` threads, in alternating rounds."""
    totals = {local: [0, 0.0], remote: [0, 0.0]}
    for _ in range(rounds):
        for fn in (local, remote):
            images, elapsed = _run_threads(fn, batch, concurrency, seconds / rounds)
            totals[fn][0] += images
            totals[fn][1] += elapsed
    return totals[local][0] / totals[local][1], totals[remote][0] / totals[remote][1]


def _run_threads(fn, batch, concurrency: int, seconds: float) -> tuple[int, float]:
    done = [0] * concurrency
    barrier = threading.Barrier(concurrency + 1)
    deadline = []

    def worker(i):
        barrier.wait()
        while time.perf_counter() < deadline[0]:
            fn(batch)
            done[i] += len(batch)

    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(worker, i) for i in range(concurrency)]
        start = time.perf_counter()
        deadline.append(start + seconds)
        barrier.wait()
        for future in futures:
            future.result()
        elapsed = time.perf_counter() - start
    return sum(done), elapsed


def format_report(rows, throughput, status_ms, load, args) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Serving benchmark: gRPC server vs in-process signature",
        "",
        f"Command: `python bench/serving_bench.py --requests={args.requests} "
        f"--throughput_seconds={args.throughput_seconds:g}"
        + (f" --out={args.out}`" if args.out else "`"),
        "",
        f"Machine: 2-core CPU VM, no GPU, shared with other jobs (1-minute load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end); Python "
        f"{platform.python_version()}, TensorFlow {tf.__version__}. Date: {date}.",
        "",
        f"Model: the demo's `imcl_tf.models.IMCLModel` (backbone `small_cnn`), {IMAGE_SIZE}x"
        f"{IMAGE_SIZE} images, {NUM_CLASSES} classes, random weights; signature "
        "`serving_default` (JPEG bytes in, decoding and resizing inside the graph). Server: "
        "`python -m serving.server` in a separate process on 127.0.0.1; client: "
        "`serving.client.PredictionClient.predict_bytes` (top-5 outputs). In-process: the same "
        "SavedModel signature called directly.",
        "",
        f"## Latency (sequential requests, ms; {rows[0][1].size} at batch 1, {rows[1][1].size} at "
        "batch 32, in-process and gRPC in alternating blocks of 25)",
        "",
        "| batch | in-process p50 | in-process p99 | gRPC p50 | gRPC p99 | added p50 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for batch, local_ms, remote_ms in rows:
        lp50, lp99 = np.percentile(local_ms, [50, 99])
        rp50, rp99 = np.percentile(remote_ms, [50, 99])
        lines.append(f"| {batch} | {lp50:.2f} | {lp99:.2f} | {rp50:.2f} | {rp99:.2f} | "
                     f"{rp50 - lp50:+.2f} |")
    back_to_back, after_gap = status_ms
    lines += ["", "gRPC round trip without a model (GetModelStatus, no TensorFlow): p50 "
              f"{np.percentile(back_to_back, 50):.2f} ms back to back; p50 "
              f"{np.percentile(after_gap, 50):.2f} ms after an idle gap of "
              f"{np.percentile(rows[0][1], 50):.1f} ms (the batch-1 compute time), the cost of "
              "waking the idle client and server threads on this machine.",
              "", f"## Throughput (batch-1 requests, images/s; {args.throughput_seconds:g} s per "
              "side, in two alternating rounds)", "",
              "| concurrency | in-process | gRPC | gRPC / in-process |", "|---:|---:|---:|---:|"]
    for concurrency, local_ips, remote_ips in throughput:
        lines.append(f"| {concurrency} | {local_ips:.0f} | {remote_ips:.0f} | "
                     f"{remote_ips / local_ips:.0%} |")
    added = np.percentile(rows[0][2], 50) - np.percentile(rows[0][1], 50)
    ratio = throughput[1][2] / throughput[1][1]
    lines += ["", "## Targets", "",
              f"- Added p50 latency at batch 1 <= 2 ms: {added:.2f} ms, "
              f"{'met' if added <= 2.0 else 'NOT met'}.",
              f"- Throughput at concurrency 8 >= 70% of in-process: {ratio:.0%}, "
              f"{'met' if ratio >= 0.7 else 'NOT met'}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

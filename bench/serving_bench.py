"""Serving overhead: the gRPC server (own process, loopback) vs the same signature in-process.

Measures p50/p99 latency at batch 1 and 32 (sequential requests) and throughput at concurrency 1
and 8 (threads sending batch-1 requests), for `serving_default` (JPEG bytes in, decoding inside the
graph) of the demo's model: imcl_tf.models.IMCLModel with the small_cnn backbone on 64x64
images, randomly initialised (speed does not depend on the weights). Two servers run: one with
default flags and one with `--enable_batching` (TF Serving's production setting).

    python bench/serving_bench.py --out bench/results/serving.md

Targets: at most 2 ms added to p50 at batch 1; at concurrency 8 at least 70% of the in-process
throughput.

A third server is the latency reference: a bare gRPC servicer (`--bare_server`, started by the
benchmark itself) that only turns the request's image bytes into a tensor, calls the same
signature and returns the top-k outputs, with no checks, no version manager and no batching. The
gap between it and in-process is what gRPC in Python costs on the machine whatever the server
does; the gap between it and serving.server is our request handling.
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
PATHS = ("in-process", "gRPC", "gRPC, --enable_batching")
REFERENCE_PATH = "bare gRPC servicer (reference)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300,
                        help="requests per latency series at batch 1 (a fifth of it at batch 32)")
    parser.add_argument("--throughput_seconds", type=float, default=8.0,
                        help="duration of each throughput run, per path")
    parser.add_argument("--out", default=None, help="write the results as Markdown here")
    parser.add_argument("--bare_server", default=None, metavar="VERSION_DIR",
                        help="internal: serve VERSION_DIR with the bare reference servicer")
    args = parser.parse_args()
    if args.bare_server:
        if not os.path.isfile(os.path.join(args.bare_server, "saved_model.pb")):
            parser.error(f"--bare_server={args.bare_server} has no saved_model.pb; give a version "
                         "folder written by python -m imcl_tf.export.")
        serve_bare(args.bare_server)
        return

    load_before = os.getloadavg()[0]  # other jobs share the machine: say how busy it was
    with tempfile.TemporaryDirectory() as export_base:
        version_dir = export.export_model(build_demo_model(), export_base, MODEL_NAME,
                                          class_names=[f"class_{i}" for i in range(NUM_CLASSES)],
                                          input_mode="image", image_size=IMAGE_SIZE)
        images = demo_jpegs(32)
        model_base = os.path.join(export_base, MODEL_NAME)
        servers = [start_server_process(model_base, []),
                   start_server_process(model_base, ["--enable_batching"]),
                   start_server_process(model_base, [], bare_version_dir=version_dir)]
        try:
            clients = [PredictionClient(f"127.0.0.1:{port}", MODEL_NAME)
                       for _, port in servers[:2]]
            signature = tf.saved_model.load(version_dir).signatures[export.SERVING_DEFAULT]

            def local(batch):
                return signature(image_bytes=tf.constant(batch))

            functions = [local] + [lambda batch, c=c: c.predict_bytes(batch, top_k=5)
                                   for c in clients]
            reference = bare_client(servers[2][1])
            for remote in functions[1:] + [reference]:
                check_same_answer(local, remote, images[:4])
            latency = {batch_size: interleaved_latencies(functions + [reference],
                                                         images[:batch_size], count)
                       for batch_size, count in ((1, args.requests),
                                                 (32, max(args.requests // 5, 20)))}
            # The transport alone: GetModelStatus runs no TensorFlow. Back to back, and after an
            # idle gap as long as the model's batch-1 compute, when the server's and client's
            # threads have gone to sleep and must be woken on a busy machine.
            gap_ms = float(np.percentile(latency[1][0], 50))
            status_ms = (round_trips(clients[0].status, 0.0, args.requests),
                         round_trips(clients[0].status, gap_ms / 1000.0, args.requests))
            # CPU time is counted in this process (in-process path and clients) plus the server
            # process a path talks to: the cost per image, whatever else runs on the machine.
            processes = [[], [servers[0][0].pid], [servers[1][0].pid]]
            throughput = {concurrency: interleaved_throughput(functions, processes, images[:1],
                                                              concurrency, args.throughput_seconds)
                          for concurrency in (1, 8)}
            for client in clients:
                client.close()
        finally:
            for process, _ in servers:
                process.terminate()
                process.wait(timeout=60)
    report = format_report(latency, throughput, status_ms, gap_ms,
                           (load_before, os.getloadavg()[0]), args)
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


def start_server_process(model_base_path: str, flags: list[str],
                         bare_version_dir: str | None = None) -> tuple[subprocess.Popen, int]:
    """Starts `python -m serving.server` (or, with `bare_version_dir`, the bare reference
    servicer) on a free loopback port; returns (process, port)."""
    if bare_version_dir:
        command = [sys.executable, os.path.abspath(__file__), f"--bare_server={bare_version_dir}"]
    else:
        command = [sys.executable, "-m", "serving.server", f"--model_base_path={model_base_path}",
                   f"--model_name={MODEL_NAME}", "--port=0", "--rest_api_port=0", *flags]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = process.stdout.readline()  # the server prints one line once it is serving
    match = re.search(r"on [^ ]+:(\d+)$", line.strip())
    if not match:
        process.kill()
        raise RuntimeError(f"the server did not start; it printed {line!r}")
    return process, int(match.group(1))


def serve_bare(version_dir: str) -> None:
    """The reference server: the least a Python gRPC Predict servicer can do for this signature
    (image bytes to a tensor, the signature call, the requested outputs back), on the same
    `grpc.server` thread pool as serving.server."""
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving import tensors

    signature = tf.saved_model.load(version_dir).signatures[export.SERVING_DEFAULT]

    class BareServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            images = list(request.inputs[export.IMAGE_BYTES_INPUT].string_val)
            outputs = signature(image_bytes=tf.constant(images))
            response = predict_pb2.PredictResponse()
            for name in request.output_filter:
                tensors.to_tensor_proto(outputs[name].numpy(), response.outputs[name])
            return response

    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=16))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(BareServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"bare reference servicer on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


def bare_client(port: int):
    """predict_bytes' equivalent for the reference server: a raw stub, no checks."""
    import grpc
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from serving import tensors

    stub = prediction_service_pb2_grpc.PredictionServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{port}"))

    def predict(batch):
        request = predict_pb2.PredictRequest(
            output_filter=[export.TOP_K_CLASSES, export.TOP_K_SCORES])
        tensors.string_tensor_proto(batch, request.inputs[export.IMAGE_BYTES_INPUT])
        outputs = stub.Predict(request, timeout=30.0).outputs
        classes = tensors.to_ndarray(outputs[export.TOP_K_CLASSES]).tolist()
        scores = tensors.to_ndarray(outputs[export.TOP_K_SCORES]).tolist()
        return [list(zip(names, row)) for names, row in zip(classes, scores)]

    return predict


def check_same_answer(local, remote, batch) -> None:
    expected = local(batch)
    scores = np.array([[score for _, score in ranked] for ranked in remote(batch)])
    np.testing.assert_allclose(scores, expected[export.TOP_K_SCORES].numpy(), atol=1e-6)


def interleaved_latencies(functions, batch, count: int, block: int = 25) -> list[np.ndarray]:
    """Milliseconds per call of each function, the functions taking turns in blocks of `block`.

    Blocks keep each path warm (as under a steady request stream) while load changes on the
    shared machine hit every path alike.
    """
    for _ in range(10):  # warm caches and the gRPC channels
        for fn in functions:
            fn(batch)
    times = [[] for _ in functions]
    while len(times[-1]) < count:
        for fn, series in zip(functions, times):
            for _ in range(min(block, count - len(series))):
                start = time.perf_counter()
                fn(batch)
                series.append(time.perf_counter() - start)
    return [np.array(series) * 1000.0 for series in times]


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


def interleaved_throughput(functions, processes, batch, concurrency: int, seconds: float,
                           rounds: int = 2) -> list[tuple[float, float]]:
    """(images per second, CPU ms per image) of each function with `concurrency` threads.

    The functions take turns in `rounds` rounds; CPU time is this process's plus that of the
    process ids listed for the function.
    """
    images, elapsed, cpu = [0] * len(functions), [0.0] * len(functions), [0.0] * len(functions)
    for _ in range(rounds):
        for i, (fn, pids) in enumerate(zip(functions, processes)):
            cpu_before = _cpu_seconds(pids)
            done, took = _run_threads(fn, batch, concurrency, seconds / rounds)
            cpu[i] += _cpu_seconds(pids) - cpu_before
            images[i] += done
            elapsed[i] += took
    return [(n / t, 1000.0 * c / n) for n, t, c in zip(images, elapsed, cpu)]


def _cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of this process and of `pids` (Linux /proc)."""
    own = os.times()
    total = own.user + own.system
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


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


def format_report(latency, throughput, status_ms, gap_ms, load, args) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = (f"python bench/serving_bench.py --requests={args.requests} "
               f"--throughput_seconds={args.throughput_seconds:g}"
               + (f" --out={args.out}" if args.out else ""))
    lines = [
        "# Serving benchmark: gRPC server vs in-process signature",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: 2-core CPU VM, no GPU, shared with other jobs (1-minute load average "
        f"{load[0]:.1f} at the start, {load[1]:.1f} at the end); Python "
        f"{platform.python_version()}, TensorFlow {tf.__version__}. Date: {date}.",
        "",
        f"Model: the demo's `imcl_tf.models.IMCLModel` (backbone `small_cnn`), {IMAGE_SIZE}x"
        f"{IMAGE_SIZE} images, {NUM_CLASSES} classes, random weights; signature "
        "`serving_default` (JPEG bytes in, decoding and resizing inside the graph). Servers: "
        "`python -m serving.server` in separate processes on 127.0.0.1, one with default flags, "
        "one with `--enable_batching`; client: `serving.client.PredictionClient.predict_bytes` "
        "(top-5 outputs). In-process: the same SavedModel signature called directly. Reference "
        "(latency only): a bare `grpc.server` servicer in its own process that converts the "
        "image bytes, calls the same signature and returns the top-5 outputs, nothing else, "
        "called through a raw stub: what gRPC in Python costs here whatever the server does.",
        "",
        f"## Latency (sequential requests, ms; {latency[1][0].size} at batch 1, "
        f"{latency[32][0].size} at batch 32; the paths take turns in blocks of 25)",
        "",
        "| batch | path | p50 | p99 | added p50 |",
        "|---:|---|---:|---:|---:|",
    ]
    for batch, series in latency.items():
        base = np.percentile(series[0], 50)
        for path, times in zip(PATHS + (REFERENCE_PATH,), series):
            p50, p99 = np.percentile(times, [50, 99])
            added = "" if path == PATHS[0] else f"{p50 - base:+.2f}"
            lines.append(f"| {batch} | {path} | {p50:.2f} | {p99:.2f} | {added} |")
    back_to_back, after_gap = status_ms
    lines += ["", "gRPC round trip without a model (GetModelStatus, no TensorFlow): p50 "
              f"{np.percentile(back_to_back, 50):.2f} ms back to back; p50 "
              f"{np.percentile(after_gap, 50):.2f} ms after an idle gap of {gap_ms:.1f} ms (the "
              "batch-1 compute time), the cost of waking idle client and server threads on this "
              "machine.",
              "", f"## Throughput (batch-1 requests, images/s; {args.throughput_seconds:g} s per "
              "path, in two rounds taking turns)", "",
              "| concurrency | path | images/s | / in-process | CPU ms per image (client + "
              "server) |",
              "|---:|---|---:|---:|---:|"]
    for concurrency, results in throughput.items():
        for path, (rate, cpu_ms) in zip(PATHS, results):
            ratio = "" if path == PATHS[0] else f"{rate / results[0][0]:.0%}"
            lines.append(f"| {concurrency} | {path} | {rate:.0f} | {ratio} | {cpu_ms:.2f} |")
    added = np.percentile(latency[1][1], 50) - np.percentile(latency[1][0], 50)
    floor = np.percentile(latency[1][3], 50) - np.percentile(latency[1][0], 50)
    local, remote, batched = (rate for rate, _ in throughput[8])
    lines += ["", "## Targets", "",
              f"- Added p50 latency at batch 1 <= 2 ms (default server): {added:.2f} ms, "
              f"{'met' if added <= 2.0 else 'NOT met'}. The bare reference servicer adds "
              f"{floor:.2f} ms, so serving.server's own request handling costs "
              f"{added - floor:+.2f} ms of it.",
              f"- Throughput at concurrency 8 >= 70% of in-process: {remote / local:.0%} "
              f"(default server), {'met' if remote / local >= 0.7 else 'NOT met'}; "
              f"{batched / local:.0%} with `--enable_batching`, "
              f"{'met' if batched / local >= 0.7 else 'NOT met'}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Fault battery for the serving side: hostile inputs and version churn against a real
`python -m serving.server` process, under continuous good traffic over gRPC and REST.

    python bench/fault_serving.py [--quick] [--out bench/results/fault_serving.md]

Bad inputs: compact TensorProtos claiming huge shapes, decompression bombs (a 48 KB PNG of
20000 x 20000 pixels, four in one request, a many-frame GIF, over gRPC Predict, Classify and
REST), malformed requests (dtype, shape, bytes that are not an image, truncated headers, NaN
pixels, bad JSON, ragged lists, an oversized body, unknown model or version). Each must be
refused "clearly": INVALID_ARGUMENT / NOT_FOUND / RESOURCE_EXHAUSTED (or HTTP 4xx) with a message.

Faults: a version copied in half and completed later, a version whose class names do not match
its outputs, a version lacking a signature the serving one has, the base path moved away and
back, the base path replaced by one holding only a broken version. Each is survived when the
expected version serves afterwards and no good request failed.

Prints requests sent / failed, faults injected / survived, bad inputs tried / rejected clearly,
and the server's peak RSS (VmHWM, reset before the hostile inputs). Runs in about a minute.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # image_bombs: hostile files built from bytes

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.framework import tensor_pb2, types_pb2  # noqa: E402
from tensorflow_serving.apis import (classification_pb2, get_model_status_pb2,  # noqa: E402
                                     model_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from bench.serving_bench import MODEL_NAME as SERVED_NAME  # noqa: E402
from bench.serving_bench import (IMAGE_SIZE, NUM_CLASSES, build_demo_model,  # noqa: E402
                                 demo_jpegs, start_server_process)
from image_bombs import gif_frames, png_bomb  # noqa: E402
from imcl_tf import data, export  # noqa: E402
from serving import tensors  # noqa: E402

MAX_BATCH = 16
CLEAR_CODES = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.RESOURCE_EXHAUSTED}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="one traffic thread per API and shorter waits (the smoke test)")
    parser.add_argument("--out", help="also write the figures as a Markdown report here")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as workdir:
        figures = run(workdir, quick=args.quick)
    figures["seconds"] = time.monotonic() - started
    text = format_figures(figures)
    print(text)
    if args.out:
        command = "python bench/fault_serving.py" + (" --quick" if args.quick else "") + \
            f" --out={args.out}"
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(format_report(text, command, load_before, os.getloadavg()[0]))
    ok = (figures["failed"] == 0 and figures["survived"] == figures["faults"]
          and figures["rejected"] == figures["tried"])
    return 0 if ok else 1


def run(workdir: str, quick: bool = False) -> dict:
    """Runs the battery; returns its figures (and the problems found, by name)."""
    staging = os.path.join(workdir, "staging")
    base = os.path.join(workdir, "models", SERVED_NAME)
    versions = stage_versions(staging)
    os.makedirs(base)
    shutil.copytree(versions["good1"], os.path.join(base, "1"))
    rest_port = free_port()
    process, port = start_server_process(base, ["--poll_seconds=0.2",
                                                f"--max_batch_size={MAX_BATCH}",
                                                f"--rest_api_port={rest_port}"])
    server = Battery(process, port, rest_port, base, quick)
    try:
        server.start_traffic()
        server.hostile_inputs()
        server.version_faults(versions)
        server.stop_traffic()
    finally:
        server.shutdown()
    return server.figures()


def stage_versions(staging: str) -> dict[str, str]:
    """Version folders to deploy: two good image versions, one whose class names do not match
    its outputs, and a features model (it lacks the image signatures)."""
    import keras

    names = [f"class{i}" for i in range(NUM_CLASSES)]
    found = {}
    for key, seed in (("good1", 0), ("good2", 1)):
        keras.utils.set_random_seed(seed)
        found[key] = export.export_model(build_demo_model(), staging, key, class_names=names,
                                         input_mode="image", image_size=IMAGE_SIZE)
    wrong = os.path.join(staging, "wrong_names")
    shutil.copytree(found["good2"], wrong)
    with open(os.path.join(wrong, "assets", export.CLASS_NAMES_ASSET), "w") as f:
        f.write("".join(f"{name}\n" for name in names[:-1]))
    keras.utils.set_random_seed(0)
    features = keras.Sequential([keras.Input((6,)), keras.layers.Dense(NUM_CLASSES)])
    found["no_image_signatures"] = export.export_model(
        features, staging, "features", class_names=names, input_mode="features", feature_dim=6)
    found["wrong_names"] = wrong
    return found


class Battery:
    """The server under test, its traffic threads and the tallies."""

    def __init__(self, process, port: int, rest_port: int, base: str, quick: bool):
        self.process = process
        self.base = base
        self.quick = quick
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)
        self.models = model_service_pb2_grpc.ModelServiceStub(self.channel)
        self.rest = f"http://127.0.0.1:{rest_port}"
        self.model_name = SERVED_NAME
        self.jpegs = demo_jpegs(4)
        self.lock = threading.Lock()
        self.sent = self.failed = 0
        self.failures: list[str] = []
        self.versions_seen: list[int] = []
        self.bad_tried = self.bad_rejected = 0
        self.bad_unclear: list[str] = []
        self.faults: list[tuple[str, bool, str]] = []
        self.rss: dict[str, float] = {"after start": rss_mb(process.pid, "VmRSS")}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- good traffic --

    def start_traffic(self) -> None:
        senders = [self._grpc_good, self._rest_good] * (1 if self.quick else 2)
        self._threads = [threading.Thread(target=self._traffic, args=(send,), daemon=True)
                         for send in senders]
        for thread in self._threads:
            thread.start()

    def stop_traffic(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def _traffic(self, send) -> None:
        while not self._stop.is_set():
            try:
                version = send()
                with self.lock:
                    self.sent += 1
                    self.versions_seen.append(version)
            except Exception as err:  # tallied: a failed good request is the battery's finding
                with self.lock:
                    self.sent += 1
                    self.failed += 1
                    self.failures.append(f"{type(err).__name__}: {err}"[:300])
            time.sleep(0.01)

    def _grpc_good(self) -> int:
        request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=self.model_name))
        tensors.string_tensor_proto(self.jpegs[:2], request.inputs[export.IMAGE_BYTES_INPUT])
        return self.stub.Predict(request, timeout=60).model_spec.version.value

    def _rest_good(self) -> int:
        status, answer = http_json(f"{self.rest}/v1/models/{self.model_name}:predict",
                                   {"instances": [b64(self.jpegs[2])]})
        if status != 200 or len(answer.get("predictions", [])) != 1:
            raise RuntimeError(f"REST answered {status}: {answer}")
        return 0  # REST answers carry no version

    def served_version(self) -> int:
        request = get_model_status_pb2.GetModelStatusRequest(
            model_spec=model_pb2.ModelSpec(name=self.model_name))
        states = self.models.GetModelStatus(request, timeout=30).model_version_status
        available = [s.version for s in states
                     if s.state == get_model_status_pb2.ModelVersionStatus.AVAILABLE]
        return max(available, default=0)

    def version_error(self, version: int) -> str:
        request = get_model_status_pb2.GetModelStatusRequest(
            model_spec=model_pb2.ModelSpec(name=self.model_name))
        for state in self.models.GetModelStatus(request, timeout=30).model_version_status:
            if state.version == version:
                return state.status.error_message
        return ""

    # -- hostile inputs --

    def hostile_inputs(self) -> None:
        reset_peak_rss(self.process.pid)
        for name, attempt in self._bad_inputs():
            self.bad_tried += 1
            try:
                outcome = attempt()
            except grpc.RpcError as err:
                outcome = (err.code(), err.details())
            code, message = outcome
            clear = ((code in CLEAR_CODES or (isinstance(code, int) and 400 <= code < 500))
                     and bool(message) and "internal error" not in message)
            if clear:
                self.bad_rejected += 1
            else:
                self.bad_unclear.append(f"{name}: {code} {message!r:.200}")
        self.rss["peak during hostile inputs"] = rss_mb(self.process.pid, "VmHWM")

    def _bad_inputs(self):
        bomb = png_bomb(20000, 20000)
        jpeg = self.jpegs[0]

        def predict(inputs, signature="", name=None, version=None):
            request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(
                name=name or self.model_name, signature_name=signature))
            if version is not None:
                request.model_spec.version.value = version
            for key, value in inputs.items():
                if isinstance(value, tensor_pb2.TensorProto):
                    request.inputs[key].CopyFrom(value)
                else:
                    tensors.to_tensor_proto(value, request.inputs[key])
            return lambda: self._grpc_error(self.stub.Predict, request)

        def compact(dims):
            proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[1.0])
            for size in dims:
                proto.tensor_shape.dim.add(size=size)
            return proto

        def rest(body=None, raw=None, path=":predict", headers=None):
            url = f"{self.rest}/v1/models/{self.model_name}{path}"
            return lambda: http_json(url, body, raw=raw, headers=headers)

        images = np.zeros([1, IMAGE_SIZE, IMAGE_SIZE, 3], np.float32)
        nan_images = images.copy()
        nan_images[0, 0, 0, 0] = np.nan
        bomb_example = classification_pb2.ClassificationRequest(
            model_spec=model_pb2.ModelSpec(name=self.model_name, signature_name="classify"))
        bomb_example.input.example_list.examples.add().features.feature[
            data.IMAGE_ENCODED_KEY].bytes_list.value.append(bomb)
        yield from [
            ("compact [60000, 64, 64, 3] (62 bytes)",
             predict({"images": compact([60000, IMAGE_SIZE, IMAGE_SIZE, 3])}, "predict_images")),
            ("compact [20000, 64, 64, 3]",
             predict({"images": compact([20000, IMAGE_SIZE, IMAGE_SIZE, 3])}, "predict_images")),
            ("compact with a wrong image size",
             predict({"images": compact([60000, 128, 128, 3])}, "predict_images")),
            ("compact with a negative dimension",
             predict({"images": compact([2, IMAGE_SIZE, -1, 3])}, "predict_images")),
            ("PNG bomb 20000 x 20000",
             predict({"image_bytes": np.array([bomb], dtype=object)})),
            ("four PNG bombs in one request",
             predict({"image_bytes": np.array([bomb] * 4, dtype=object)})),
            ("GIF of 64 frames of 4000 x 4000",
             predict({"image_bytes": np.array([gif_frames(4000, 4000, 64)], dtype=object)})),
            ("PNG bomb inside a Classify tf.Example",
             lambda: self._grpc_error(self.stub.Classify, bomb_example)),
            ("PNG bomb over REST", rest({"instances": [b64(bomb)]})),
            ("wrong dtype", predict({"images": images.astype(np.float64)}, "predict_images")),
            ("wrong shape", predict({"images": np.zeros([1, 8, 8, 3], np.float32)},
                                    "predict_images")),
            ("NaN pixels", predict({"images": nan_images}, "predict_images")),
            ("bytes that are not an image",
             predict({"image_bytes": np.array([b"<html>hello</html>"], dtype=object)})),
            ("a truncated PNG header",
             predict({"image_bytes": np.array([b"\x89PNG\r\n\x1a\n\x00\x00\x00"],
                                              dtype=object)})),
            ("a JPEG cut after 40 bytes",
             predict({"image_bytes": np.array([jpeg[:40]], dtype=object)})),
            ("a batch over --max_batch_size",
             predict({"image_bytes": np.array([jpeg] * (MAX_BATCH + 1), dtype=object)})),
            ("an unknown model", predict({"images": images}, "predict_images", name="other")),
            ("an unknown version", predict({"images": images}, "predict_images", version=99)),
            ("an unknown signature", predict({"images": images}, "predict_audio")),
            ("REST: bad JSON", rest(raw=b"{\"instances\": [")),
            ("REST: ragged instances", rest({"signature_name": "predict_images",
                                             "instances": [[1.0, 2.0], [1.0]]})),
            ("REST: invalid base64", rest({"instances": [{"b64": "%%%"}]})),
            ("REST: a 1 GB Content-Length", rest(raw=b"{}", headers={
                "Content-Length": str(1 << 30)})),
            ("REST: an unknown verb", rest({}, path=":explain")),
            ("REST: an unknown model", lambda: http_json(
                f"{self.rest}/v1/models/other:predict", {"instances": [1]})),
        ]

    @staticmethod
    def _grpc_error(method, request):
        try:
            method(request, timeout=60)
        except grpc.RpcError as err:
            return err.code(), err.details()
        return grpc.StatusCode.OK, "accepted"

    # -- version churn --

    def version_faults(self, versions: dict[str, str]) -> None:
        polls = 8 if self.quick else 15
        self._fault("a version copied in half, completed later",
                    lambda: self._half_copy(versions["good2"], 2, polls),
                    lambda: self._wait(lambda: self.served_version() == 2, "version 2 serves"))
        self._fault("a version whose class names do not match its outputs",
                    lambda: self._deploy(versions["wrong_names"], 3),
                    lambda: self._wait(lambda: "class names" in self.version_error(3)
                                       and self.served_version() == 2,
                                       "version 3 rejected, version 2 serves"))
        self._fault("a version lacking the serving version's signatures",
                    lambda: self._deploy(versions["no_image_signatures"], 4),
                    lambda: self._wait(lambda: "lacks signatures" in self.version_error(4)
                                       and self.served_version() == 2,
                                       "version 4 rejected, version 2 serves"))
        self._fault("the base path moved away for several polls and back",
                    lambda: self._move_away(polls),
                    lambda: self._wait(lambda: self.served_version() == 2, "version 2 serves"))
        self._fault("the base path replaced by one holding only a broken version",
                    self._replace_with_broken,
                    lambda: self._wait(lambda: self.served_version() == 2, "version 2 serves"))

    def _fault(self, name: str, inject, check) -> None:
        with self.lock:
            failed_before = self.failed
        try:
            inject()
            detail = check()
        except Exception as err:  # the battery reports it as a fault not survived
            detail = f"{type(err).__name__}: {err}"
        with self.lock:
            new_failures = self.failed - failed_before
        survived = detail == "" and new_failures == 0
        if new_failures:
            detail = f"{new_failures} good requests failed. {detail}".strip()
        self.faults.append((name, survived, detail))

    def _wait(self, condition, what: str, seconds: float = 60) -> str:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if condition():
                time.sleep(0.5)  # let traffic run on the new state for a moment
                return ""
            time.sleep(0.1)
        return f"not reached within {seconds:.0f} s: {what}"

    def _deploy(self, source: str, version: int) -> None:
        staging = os.path.join(os.path.dirname(self.base), f".copy-{version}")
        shutil.copytree(source, staging)
        os.rename(staging, os.path.join(self.base, str(version)))

    def _half_copy(self, source: str, version: int, polls: int) -> None:
        """Copies straight into the version folder: saved_model.pb first, the rest after the
        server has failed to load it at several polls."""
        target = os.path.join(self.base, str(version))
        os.makedirs(os.path.join(target, "variables"))
        shutil.copy(os.path.join(source, "saved_model.pb"), target)
        time.sleep(0.2 * polls)
        for entry in os.listdir(source):
            path = os.path.join(source, entry)
            if entry == "variables":
                for name in os.listdir(path):
                    shutil.copy(os.path.join(path, name), os.path.join(target, "variables"))
            elif os.path.isdir(path):
                shutil.copytree(path, os.path.join(target, entry))

    def _move_away(self, polls: int) -> None:
        away = self.base + ".away"
        os.rename(self.base, away)
        time.sleep(0.2 * polls)
        os.rename(away, self.base)

    def _replace_with_broken(self) -> None:
        kept = self.base + ".kept"
        os.rename(self.base, kept)
        os.makedirs(os.path.join(self.base, "9"))
        with open(os.path.join(self.base, "9", "saved_model.pb"), "wb") as f:
            f.write(b"not a SavedModel")
        time.sleep(2.0)
        shutil.rmtree(self.base)
        os.rename(kept, self.base)

    # -- the end --

    def shutdown(self) -> None:
        self._stop.set()
        self.rss["peak over the run"] = rss_mb(self.process.pid, "VmHWM")
        self.channel.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            self.exit_code = self.process.wait(timeout=60)
        except Exception:
            self.process.kill()
            self.exit_code = self.process.wait()

    def figures(self) -> dict:
        return {"sent": self.sent, "failed": self.failed, "failures": self.failures[:5],
                "faults": len(self.faults), "survived": sum(ok for _, ok, _ in self.faults),
                "fault_details": self.faults, "tried": self.bad_tried,
                "rejected": self.bad_rejected, "unclear": self.bad_unclear, "rss": self.rss,
                "exit_code": self.exit_code,
                "versions_seen": sorted(set(v for v in self.versions_seen if v))}


def http_json(url: str, body=None, raw: bytes | None = None, headers=None):
    """(HTTP status, JSON answer); with a custom Content-Length the body is not sent."""
    payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    if headers and "Content-Length" in headers:
        host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
        with socket.create_connection((host, int(port)), timeout=60) as connection:
            path = "/" + url.split("//", 1)[1].split("/", 1)[1]
            connection.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: "
                               f"{headers['Content-Length']}\r\n\r\n".encode())
            answer = connection.makefile("rb").read()
        head, _, text = answer.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(text)["error"]
    request = urllib.request.Request(url, data=payload,
                                     method="GET" if payload is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        answer = json.loads(err.read())
        return err.code, answer.get("error", "")


def b64(encoded: bytes) -> dict:
    return {"b64": base64.b64encode(encoded).decode("ascii")}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int, field: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024


def reset_peak_rss(pid: int) -> None:
    """Sets the process's VmHWM back to its current RSS (Linux clear_refs)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def format_figures(figures: dict) -> str:
    rss = figures["rss"]
    lines = [
        f"requests sent: {figures['sent']}, failed: {figures['failed']} "
        f"(gRPC and REST good traffic during the whole run; versions served: "
        f"{figures['versions_seen']})",
        f"faults injected: {figures['faults']}, survived: {figures['survived']}",
        f"bad inputs tried: {figures['tried']}, rejected clearly: {figures['rejected']}",
        f"server RSS: {rss['after start']:.0f} MB after start, peak "
        f"{rss['peak during hostile inputs']:.0f} MB during the hostile inputs (VmHWM reset "
        f"before them), peak {rss['peak over the run']:.0f} MB over the run",
        f"server exit status after SIGTERM: {figures['exit_code']}",
    ]
    for name, survived, detail in figures["fault_details"]:
        lines.append(f"  fault: {name}: {'survived' if survived else 'NOT survived'}"
                     + (f" ({detail})" if detail else ""))
    lines += [f"  unclear rejection: {item}" for item in figures["unclear"]]
    lines += [f"  failed request: {item}" for item in figures["failures"]]
    if "seconds" in figures:
        lines.append(f"battery time: {figures['seconds']:.0f} s")
    return "\n".join(lines)


def format_report(text: str, command: str, load_before: float, load_after: float) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"# Serving fault battery\n\nCommand: `{command}`\n\nMachine: {os.cpu_count()}-core "
            f"CPU, no GPU, shared with other jobs (1-minute load average {load_before:.1f} at "
            f"the start, {load_after:.1f} at the end); Python {platform.python_version()}, "
            f"TensorFlow {tf.__version__}. Date: {now}.\n\nServer: `python -m serving.server` "
            "in its own process on 127.0.0.1 (gRPC and REST), the demo's model (small_cnn, "
            "64x64); `--poll_seconds=0.2 --max_batch_size=16`, other flags at their defaults "
            "(`--max_image_pixels=50000000`, `--max_message_mb=64`).\n\n```\n" + text
            + "\n```\n")


if __name__ == "__main__":
    sys.exit(main())

"""A TensorFlow-Serving-compatible gRPC and REST server for the SavedModels of `imcl_tf.export`.

For development, tests and the demo; production uses TF Serving's binary (serving/README.md has
its Docker command), which cannot be installed here. It speaks the same protocols
(`tensorflow.serving.PredictionService` Predict / Classify / GetModelMetadata and
`tensorflow.serving.ModelService` GetModelStatus over gRPC, TF Serving's JSON API over REST,
serving/rest.py) over the same SavedModel, so one client works against both.

    python -m serving.server --model_base_path=exports/demo --model_name=demo --port=8500 \
        --rest_api_port=8501

Versions are the integer folders under the base path. The newest `--num_versions` are kept loaded;
requests without a version go to the newest. A poller loads new versions fully (including the
warm-up requests) before swapping them in, and a request keeps the version it started on, so a
version change never fails a request; a new version must pass sanity checks first, and a base
path that vanishes for a poll keeps the loaded versions serving. Bad requests get INVALID_ARGUMENT
or NOT_FOUND with a message saying what was wrong; shapes, element counts and image sizes (from
their headers, `--max_image_pixels`) are checked before anything big is built, so nothing a client
sends stops the server. SIGTERM/SIGINT stop accepting requests, let the ones in flight finish,
and exit 0.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import math
import os
import re
import signal
import ssl
import sys
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow.core.protobuf import error_codes_pb2, saved_model_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, model_service_pb2_grpc, predict_pb2,
                                     prediction_log_pb2, prediction_service_pb2_grpc)

from imcl_tf import data, export, image_header
from serving import arguments, rest, tensors
from serving.errors import RequestError

DEFAULT_PORT = arguments.DEFAULT_PORT  # TF Serving's gRPC port
DEFAULT_HOST = arguments.DEFAULT_HOST
SIGNATURE_DEF_FIELD = "signature_def"  # the one metadata field TF Serving knows
MAX_WARMUP_RECORDS = 1000  # TF Serving's limit on warm-up records
_State = get_model_status_pb2.ModelVersionStatus.State
_LOG = logging.getLogger("serving.server")
DEFAULT_MAX_MESSAGE_MB = arguments.DEFAULT_MAX_MESSAGE_MB


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-request limits applied to every Predict and Classify, checked before anything is
    built from the request: a compact TensorProto (one value and a huge shape) or a small image
    that decodes to gigapixels is refused from its header."""
    max_batch_size: int = 64
    # Elements all inputs of one request may expand to: what a dense float32 message of
    # --max_message_mb carries (16.8 M for 64 MiB).
    max_request_elements: int = DEFAULT_MAX_MESSAGE_MB * 1024 * 1024 // 4
    max_image_pixels: int = image_header.DEFAULT_MAX_IMAGE_PIXELS
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_MB * 1024 * 1024  # also the REST body limit


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """Server-side batching (TF Serving's --enable_batching): concurrent requests to one signature
    are merged into one model call of at most `max_batch_size` rows.

    With `batch_timeout_micros=0` a batch is whatever queued while the previous one ran, so a lone
    request never waits; a positive timeout lets a partial batch wait that long for company.
    """
    max_batch_size: int = 64
    num_batch_threads: int = 2  # model calls running at once
    batch_timeout_micros: int = 0


def start_server(model_base_path: str, model_name: str, *, port: int = 0,
                 host: str = DEFAULT_HOST, max_batch_size: int = 64,
                 max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
                 max_image_pixels: int = image_header.DEFAULT_MAX_IMAGE_PIXELS,
                 poll_seconds: float = 1.0, num_versions: int = 2, num_threads: int = 16,
                 enable_batching: bool = False, num_batch_threads: int = 2,
                 batch_timeout_micros: int = 0, rest_api_port: int | None = None,
                 max_concurrent_rpcs: int = 0, ssl_cert: str | None = None,
                 ssl_key: str | None = None,
                 access_log: str | None = None) -> tuple["ServingServer", int]:
    """Loads the model's versions, starts serving, and returns (server, bound gRPC port).

    `port=0` binds a free port. `rest_api_port` adds TF Serving's REST API (None: no REST, 0: a
    free port; the bound one is `server.rest_port`). Call `server.stop(grace_seconds)` to shut it
    down. With `enable_batching`, concurrent requests are merged into model calls of at most
    `max_batch_size` rows (see BatchingOptions). `max_concurrent_rpcs` (0: no limit) refuses
    requests beyond that many in flight with RESOURCE_EXHAUSTED (HTTP 429). `ssl_cert` and
    `ssl_key` (PEM files, both or neither) serve gRPC and REST over TLS. `access_log` is a file
    (or "-" for stderr) that gets one line per request.

    Example:
      >>> server, port = start_server("exports/demo", "demo")  # doctest: +SKIP
      >>> server.stop(5)  # doctest: +SKIP
    """
    if not os.path.isdir(model_base_path):
        raise ValueError(f"--model_base_path={model_base_path!r} is not a folder; give "
                         "<export_base>/<model_name> as written by python -m imcl_tf.export.")
    for name, value in (("max_batch_size", max_batch_size), ("max_message_mb", max_message_mb),
                        ("num_versions", num_versions), ("num_threads", num_threads),
                        ("num_batch_threads", num_batch_threads)):
        if value < 1:
            raise ValueError(f"--{name} must be at least 1. Received: {value}.")
    if poll_seconds <= 0:
        raise ValueError(f"--poll_seconds must be positive. Received: {poll_seconds}.")
    if batch_timeout_micros < 0:
        raise ValueError(f"--batch_timeout_micros must be >= 0. Received: {batch_timeout_micros}.")
    if max_concurrent_rpcs < 0:
        raise ValueError(f"--max_concurrent_rpcs must be >= 0 (0: no limit). Received: "
                         f"{max_concurrent_rpcs}.")
    if rest_api_port is not None and not 0 <= rest_api_port < 65536:
        raise ValueError(f"--rest_api_port must be a port number. Received: {rest_api_port}.")
    image_header.check_max_image_pixels(max_image_pixels)
    credentials, ssl_context = _tls(ssl_cert, ssl_key)
    max_bytes = max_message_mb * 1024 * 1024
    limits = Limits(max_batch_size=max_batch_size, max_request_elements=max_bytes // 4,
                    max_image_pixels=max_image_pixels, max_message_bytes=max_bytes)
    batching = (BatchingOptions(max_batch_size, num_batch_threads, batch_timeout_micros)
                if enable_batching else None)
    manager = ModelManager(model_base_path, model_name, limits, num_versions=num_versions,
                           batching=batching)
    services = Services(manager, limits, _access_logger(access_log), max_concurrent_rpcs)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=num_threads),
                         options=[("grpc.max_receive_message_length", max_bytes),
                                  ("grpc.max_send_message_length", max_bytes),
                                  # gRPC shares ports by default: a second server on a port in
                                  # use would silently take half the traffic.
                                  ("grpc.so_reuseport", 0)],
                         maximum_concurrent_rpcs=max_concurrent_rpcs or None)
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(services), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(services), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:  # bound before loading, so a port conflict fails fast
        bound_port = (server.add_secure_port(address, credentials) if credentials
                      else server.add_insecure_port(address))
    except RuntimeError as err:  # newer grpc raises instead of returning 0
        raise OSError(f"cannot listen on {address}: {err}; is the port in use?") from err
    if bound_port == 0:
        raise OSError(f"cannot listen on {address}; is the port in use?")
    rest_server = (None if rest_api_port is None
                   else rest.RestServer(services, host, rest_api_port, ssl_context))
    manager.refresh()
    server.start()
    if rest_server is not None:
        rest_server.start()
    manager.start_polling(poll_seconds)
    return ServingServer(server, services, rest_server), bound_port


def _tls(ssl_cert: str | None, ssl_key: str | None):
    """(gRPC server credentials, REST SSLContext) from PEM files, or (None, None)."""
    if not ssl_cert and not ssl_key:
        return None, None
    if not (ssl_cert and ssl_key):
        raise ValueError("--ssl_cert and --ssl_key go together: give both PEM files (the "
                         "certificate chain and its private key) or neither.")
    try:
        with open(ssl_cert, "rb") as f:
            cert = f.read()
        with open(ssl_key, "rb") as f:
            key = f.read()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(ssl_cert, ssl_key)
    except (OSError, ssl.SSLError) as err:
        raise ValueError(f"cannot use --ssl_cert={ssl_cert!r} --ssl_key={ssl_key!r}: {err}; "
                         "give a PEM certificate and its PEM private key.") from err
    return grpc.ssl_server_credentials([(key, cert)]), context


def _access_logger(access_log: str | None) -> logging.Logger | None:
    """A logger writing one line per request to `access_log` (a path, or "-" for stderr)."""
    if not access_log:
        return None
    logger = logging.Logger("serving.access", logging.INFO)  # this server's own, not global
    try:
        handler = (logging.StreamHandler(sys.stderr) if access_log == "-"
                   else logging.FileHandler(access_log, encoding="utf-8"))
    except OSError as err:
        raise ValueError(f"cannot open --access_log={access_log!r}: {err}") from err
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    return logger


class ServingServer:
    """A running server: the gRPC server, the REST server (if any) and the version poller."""

    def __init__(self, grpc_server: grpc.Server, services: "Services",
                 rest_server: rest.RestServer | None = None):
        self.grpc_server = grpc_server
        self.services = services
        self.manager = services.manager
        self.rest_server = rest_server
        self.rest_port = None if rest_server is None else rest_server.port

    def stop(self, grace_seconds: float = 10.0) -> None:
        """Stops accepting requests, lets those in flight finish (up to `grace_seconds`), stops
        polling."""
        deadline = time.monotonic() + grace_seconds
        if self.rest_server is not None:
            self.rest_server.stop()  # no new connections or requests
        self.grpc_server.stop(grace_seconds).wait()
        self.services.wait_idle(deadline - time.monotonic())  # REST requests still running
        self.manager.stop_polling()
        self.services.close()


# ---- Loaded versions ---------------------------------------------------------------------------


class Servable:
    """One loaded SavedModel version: its callable signatures and their SignatureDefs."""

    def __init__(self, version: int, path: str, batching: BatchingOptions | None = None):
        self.version = version
        self.path = path
        self._loaded = tf.saved_model.load(path)  # keeps variables and tables alive
        self.signatures: dict[str, Callable[..., Mapping[str, tf.Tensor]]] = dict(
            self._loaded.signatures)
        self._batchers = {} if batching is None else {
            name: Batcher(functools.partial(self._run_now, name), batching)
            for name in self.signatures}
        saved_model = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            saved_model.ParseFromString(f.read())
        # All SignatureDefs, as TF Serving lists them in GetModelMetadata (init op included).
        self.signature_defs = dict(saved_model.meta_graphs[0].signature_def)
        # What a request is checked against, read from the SignatureDefs once instead of per
        # request.
        self.plans = {name: _SignaturePlan.of(self.signature_defs[name])
                      for name in self.signatures}

    def signature_def(self, name: str):
        """The SignatureDef of a callable signature, or INVALID_ARGUMENT naming the known ones."""
        if name not in self.signatures:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Serving signature key {name!r} not found in version "
                               f"{self.version}; signatures: {sorted(self.signatures)}.")
        return self.signature_defs[name]

    def plan(self, name: str) -> "_SignaturePlan":
        """The request plan of a callable signature, or INVALID_ARGUMENT naming the known ones."""
        plan = self.plans.get(name)
        if plan is None:
            self.signature_def(name)  # raises the error naming the signatures
        return plan

    def run(self, name: str, inputs: Mapping[str, np.ndarray],
            outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Calls signature `name` (through its batcher when batching is on).

        `outputs` names the outputs wanted (default: all); a batched call returns all of them.
        TensorFlow's own errors become RequestErrors with the same gRPC code.
        """
        if name in self._batchers:
            return self._batchers[name].run(inputs)
        return self._run_now(name, inputs, outputs)

    def _run_now(self, name: str, inputs: Mapping[str, np.ndarray],
                 outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        try:
            result = self.signatures[name](**{key: tf.constant(value)
                                               for key, value in inputs.items()})
            if outputs is None:
                return {key: value.numpy() for key, value in result.items()}
            return {key: result[key].numpy() for key in outputs}
        except tf.errors.OpError as err:
            raise RequestError(_GRPC_CODE.get(err.error_code, grpc.StatusCode.INTERNAL),
                               f"signature {name!r} of version {self.version} failed on this "
                               f"input: {tf_error_summary(err.message or str(err))}") from err


@dataclasses.dataclass(frozen=True)
class _SignaturePlan:
    """A SignatureDef's names, dtypes and shapes as plain Python values, for checking requests."""
    inputs: tuple[str, ...]  # sorted
    input_names: frozenset[str]
    input_dtypes: Mapping[str, int]
    input_shapes: Mapping[str, list[int] | None]  # None: unknown rank
    outputs: tuple[str, ...]  # sorted
    output_names: frozenset[str]

    @classmethod
    def of(cls, signature) -> "_SignaturePlan":
        return cls(
            inputs=tuple(sorted(signature.inputs)), input_names=frozenset(signature.inputs),
            input_dtypes={name: info.dtype for name, info in signature.inputs.items()},
            input_shapes={name: (None if info.tensor_shape.unknown_rank
                                 else [dim.size for dim in info.tensor_shape.dim])
                          for name, info in signature.inputs.items()},
            outputs=tuple(sorted(signature.outputs)), output_names=frozenset(signature.outputs))


class Batcher:
    """Merges concurrent calls of one signature into one model call (TF Serving's batching).

    It has no thread of its own: a request thread that finds a free batch slot runs the oldest
    queued requests (its own or others') as one call and hands out the results, while the other
    request threads wait for theirs. A merged call that fails is retried request by request, so a
    bad input fails only the request that sent it.
    """

    def __init__(self, run: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
                 options: BatchingOptions):
        self._run = run
        self._options = options
        self._queue: collections.deque[_Task] = collections.deque()
        self._running = 0  # batch slots in use
        self._condition = threading.Condition()

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        task = _Task(inputs)
        with self._condition:
            self._queue.append(task)
            self._condition.notify_all()  # a runner waiting for a fuller batch counts rows
        while True:
            with self._condition:  # wait for the result, or for a free slot to run a batch
                while not task.done and not (self._queue and
                                             self._running < self._options.num_batch_threads):
                    self._condition.wait()
                if task.done:
                    break
                self._running += 1  # this thread runs the next batch
                batch = self._take_batch()
            try:
                self._execute(batch)
            finally:
                with self._condition:
                    self._running -= 1
                    self._condition.notify_all()
        if task.error is not None:
            raise task.error
        return task.result

    def _take_batch(self) -> list["_Task"]:
        """Removes the oldest requests that fit one call (same non-batch shapes, at most
        max_batch_size rows), after waiting up to batch_timeout_micros for a fuller batch."""
        if self._options.batch_timeout_micros:
            deadline = self._queue[0].enqueued + self._options.batch_timeout_micros / 1e6
            while (sum(t.rows for t in self._queue) < self._options.max_batch_size
                   and time.monotonic() < deadline):
                self._condition.wait(deadline - time.monotonic())
        batch, rows, kept = [], 0, collections.deque()
        while self._queue:
            task = self._queue.popleft()
            if not batch or (task.shape_key == batch[0].shape_key
                             and rows + task.rows <= self._options.max_batch_size):
                batch.append(task)
                rows += task.rows
            else:
                kept.append(task)
        self._queue.extendleft(reversed(kept))
        return batch

    def _execute(self, batch: list["_Task"]) -> None:
        try:
            if len(batch) > 1:
                try:
                    self._run_merged(batch)
                    return
                except Exception:  # find out which request is bad: run them one by one below
                    pass
            for task in batch:
                try:
                    task.result = self._run(task.inputs)
                except Exception as err:  # delivered to the request's own thread
                    task.error = err
        finally:
            for task in batch:
                task.done = True

    def _run_merged(self, batch: list["_Task"]) -> None:
        merged = {name: np.concatenate([task.inputs[name] for task in batch])
                  for name in batch[0].inputs}
        outputs = self._run(merged)
        total = sum(task.rows for task in batch)
        if any(value.ndim == 0 or value.shape[0] != total for value in outputs.values()):
            raise ValueError("outputs are not batch-major; cannot split a merged batch")
        start = 0
        for task in batch:
            task.result = {name: value[start:start + task.rows]
                           for name, value in outputs.items()}
            start += task.rows


class _Task:
    """One request waiting in a Batcher."""

    def __init__(self, inputs: Mapping[str, np.ndarray]):
        self.inputs = inputs
        self.rows = next(iter(inputs.values())).shape[0]
        # Requests merge only when every input agrees beyond the batch dimension.
        self.shape_key = tuple((name, value.dtype.str, value.shape[1:])
                               for name, value in sorted(inputs.items()))
        self.enqueued = time.monotonic()
        self.result: dict[str, np.ndarray] | None = None
        self.error: BaseException | None = None
        self.done = False


QUICK_LOAD_ATTEMPTS = 5  # failed loads retried at every poll (a copy may still be running) ...
MAX_RETRY_SECONDS = 60.0  # ... then with a doubling delay up to this, and at once on any change
MAX_FINGERPRINT_FILES = 10_000  # files of a version folder looked at to notice a change


def tf_error_summary(message: str) -> str:
    """The part of a TensorFlow runtime error a client can act on, without the graph trace.

    "Graph execution error: ... assertion failed: [image] [image_bytes[0]] [: truncated JPEG]
    [[{{node ...}}]] [Op:...]" becomes "image image_bytes[0]: truncated JPEG".
    """
    noise = ("Graph execution error", "Detected at node", "<stack traces unavailable>")
    lines = [line.strip() for line in message.splitlines()]
    text = " ".join(line for line in lines if line and not line.startswith(noise))
    text = re.sub(r"\s*\[\[\{\{node [^}]*\}\}\]\]|\s*\[Op:[^\]]*\]", "", text).strip()
    prefix = "assertion failed: "
    if text.startswith(prefix + "[") and text.endswith("]"):
        # tf.debugging.Assert prints each data item in brackets.
        text = " ".join(text[len(prefix) + 1:-1].split("] [")).replace(" : ", ": ")
    return text or message


@dataclasses.dataclass
class _VersionState:
    state: int
    error_code: int = 0
    error_message: str = ""
    attempts: int = 0  # failed loads so far
    # (path, size, mtime) of every file in the version folder at the last failure: a copy that
    # completes later changes it (the folder's own mtime does not change on writes inside
    # variables/), which earns a new attempt at once.
    fingerprint: tuple = ()
    retry_at: float = 0.0  # monotonic time of the next attempt when nothing changed (inf: never)


class VersionRejected(Exception):
    """A version that loaded but fails the sanity checks; it is not swapped in."""


class ModelManager:
    """Finds, loads and unloads the versions of one model; hands out the one a request names.

    Readers take `self._servables` (a dict that is replaced, never mutated) without a lock, so a
    swap is one atomic reference assignment; a request holds its Servable until it finishes.
    """

    def __init__(self, model_base_path: str, model_name: str, limits: Limits, *,
                 num_versions: int = 2, batching: BatchingOptions | None = None):
        self.model_base_path = model_base_path
        self.model_name = model_name
        self.limits = limits
        self.num_versions = num_versions
        self.batching = batching
        self._servables: dict[int, Servable] = {}
        self._states: dict[int, _VersionState] = {}
        self._refresh_lock = threading.Lock()
        self._base_missing = False  # warned that the base path is gone (once per absence)
        self._kept_without_disk = False  # warned that no new version loads (once)
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # -- lookups (request threads) --

    def resolve(self, model_spec) -> Servable:
        """The servable `model_spec` names: NOT_FOUND for another model or an unknown version."""
        if model_spec.name != self.model_name:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: model {model_spec.name!r} is "
                               f"not served here; this server serves {self.model_name!r}.")
        servables = self._servables
        if model_spec.version_label:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"version_label {model_spec.version_label!r} is not defined: this "
                               "server has no version labels; set model_spec.version or leave "
                               "both unset for the newest version.")
        if model_spec.HasField("version"):
            version = model_spec.version.value
            if version not in servables:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"Servable not found for request: version {version} of model "
                                   f"{self.model_name!r} is not loaded; loaded versions: "
                                   f"{sorted(servables)}.")
            return servables[version]
        if not servables:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"Servable not found for request: no version of model "
                               f"{self.model_name!r} is loaded yet (none found under "
                               f"{self.model_base_path}).")
        return servables[max(servables)]

    def version_statuses(self) -> dict[int, _VersionState]:
        """State of every version seen so far (loading, available, failed, unloaded)."""
        return dict(self._states)

    def loaded_versions(self) -> list[int]:
        return sorted(self._servables)

    # -- loading (poller thread) --

    def refresh(self) -> None:
        """Loads new versions, then swaps the served set; unloads versions removed from disk.

        A base path that is missing, unreadable or empty for a poll (a redeploy by `mv`) keeps
        the loaded versions serving, and so does a new set of versions none of which loads: the
        server never drops to nothing while something was serving.
        """
        with self._refresh_lock:
            try:
                on_disk = export.list_versions(self.model_base_path)
                missing = None if on_disk else "has no version folder"
                if not os.path.isdir(self.model_base_path):
                    missing = "is missing"
            except OSError as err:
                on_disk, missing = [], f"cannot be read ({err})"
            if missing:
                if self._servables and not self._base_missing:
                    _LOG.warning("the base path %s %s; keeping versions %s of %s serving until "
                                 "it is back", self.model_base_path, missing,
                                 sorted(self._servables), self.model_name)
                self._base_missing = True
                return
            if self._base_missing:
                _LOG.info("the base path %s is back: versions %s", self.model_base_path, on_disk)
                self._base_missing = False
            wanted = on_disk[-self.num_versions:]
            servables = dict(self._servables)
            for version in wanted:
                if version not in servables and self._should_try(version):
                    servable = self._load(version, self._newest(servables))
                    if servable is not None:
                        servables[version] = servable
            # Keep the newest `num_versions` of what loaded (an older one stays in service while a
            # newer one fails to load).
            keep = sorted(v for v in servables if v in on_disk)[-self.num_versions:]
            new_servables = {v: servables[v] for v in keep}
            if not new_servables and self._servables:
                if not self._kept_without_disk:
                    _LOG.warning("none of versions %s of %s under %s loads; versions %s keep "
                                 "serving", on_disk, self.model_name, self.model_base_path,
                                 sorted(self._servables))
                self._kept_without_disk = True
                return
            self._kept_without_disk = False
            for version in set(self._servables) - set(new_servables):
                self._states[version] = _VersionState(_State.END)
                _LOG.info("unloaded version %d of %s", version, self.model_name)
            self._servables = new_servables  # the atomic swap

    @staticmethod
    def _newest(servables: Mapping[int, Servable]) -> Servable | None:
        return servables[max(servables)] if servables else None

    def _should_try(self, version: int) -> bool:
        """Whether to (re)load: a failed version is retried at every poll a few times, then with
        a doubling delay; any change to its files earns an attempt at once. A version rejected
        by the sanity checks is retried only after a change."""
        state = self._states.get(version)
        if state is None or state.error_code == 0:
            return True
        return (time.monotonic() >= state.retry_at
                or self._fingerprint(version) != state.fingerprint)

    def _fingerprint(self, version: int) -> tuple:
        """(relative path, size, mtime_ns) of the files of a version folder, sorted."""
        root = os.path.join(self.model_base_path, str(version))
        entries = []
        for folder, _, files in os.walk(root):
            for name in files:
                path = os.path.join(folder, name)
                try:
                    info = os.stat(path)
                except OSError:  # removed while walking: the next poll sees the change
                    continue
                entries.append((os.path.relpath(path, root), info.st_size, info.st_mtime_ns))
                if len(entries) >= MAX_FINGERPRINT_FILES:
                    return tuple(sorted(entries))
        return tuple(sorted(entries))

    def _load(self, version: int, previous: Servable | None) -> Servable | None:
        """Loads, checks (check_version) and warms up a version; None when any step fails."""
        path = os.path.join(self.model_base_path, str(version))
        state = self._states.get(version)
        attempts = state.attempts if state is not None else 0
        fingerprint = self._fingerprint(version)
        self._states[version] = _VersionState(_State.LOADING, attempts=attempts)
        start = time.monotonic()
        try:
            servable = Servable(version, path, self.batching)
            check_version(servable, previous)
            count = run_warmup(servable, self.model_name, self.limits)
        except Exception as err:  # a bad version must not take the server down
            message = f"{type(err).__name__}: {err}".strip()
            retry_at = start + (0.0 if attempts + 1 < QUICK_LOAD_ATTEMPTS else
                                min(MAX_RETRY_SECONDS, 2.0 ** (attempts + 1 - QUICK_LOAD_ATTEMPTS)))
            if isinstance(err, RequestError):
                message = f"warm-up request failed: {err.message}"
            elif isinstance(err, VersionRejected):
                message = f"rejected: {err}"
                retry_at = float("inf")  # the same files fail the same check
            _LOG.error("failed to load version %d of %s from %s (attempt %d): %s; %s", version,
                       self.model_name, path, attempts + 1, message,
                       "the versions loaded keep serving" if previous is not None else
                       "nothing is served until a version loads")
            self._states[version] = _VersionState(
                _State.END, error_code=error_codes_pb2.INTERNAL if not isinstance(
                    err, VersionRejected) else error_codes_pb2.FAILED_PRECONDITION,
                error_message=message, attempts=attempts + 1, fingerprint=fingerprint,
                retry_at=retry_at)
            return None
        self._states[version] = _VersionState(_State.AVAILABLE)
        _LOG.info("loaded version %d of %s in %.1f s (%d warm-up requests)", version,
                  self.model_name, time.monotonic() - start, count)
        return servable

    def start_polling(self, poll_seconds: float) -> None:
        def poll():
            while not self._stop.wait(poll_seconds):
                try:
                    self.refresh()
                except Exception:  # e.g. the base path vanished for a moment: try again later
                    _LOG.exception("polling %s failed", self.model_base_path)

        self._poller = threading.Thread(target=poll, name="version-poller", daemon=True)
        self._poller.start()

    def stop_polling(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join()


def check_version(servable: Servable, previous: Servable | None) -> None:
    """Sanity checks a loaded version must pass before it takes traffic.

    Its class-name asset must have one name per output column (what top_k_classes and Classify
    read), and it must have every signature of the version serving now, so that clients of that
    version keep working.

    Raises:
      VersionRejected saying what is wrong.
    """
    try:
        names = export.read_class_names(servable.path)
    except OSError as err:
        raise VersionRejected(f"its class names asset cannot be read ({err}); export it with "
                              "python -m imcl_tf.export") from err
    for name, signature in sorted(servable.signature_defs.items()):
        for output in (export.PROBABILITIES, export.LOGITS, export.CLASSIFY_SCORES,
                       export.CLASSIFY_CLASSES):
            if output not in signature.outputs:
                continue
            dims = signature.outputs[output].tensor_shape.dim
            if dims and dims[-1].size not in (-1, len(names)):
                raise VersionRejected(
                    f"signature {name!r} output {output!r} has {dims[-1].size} columns but "
                    f"{export.CLASS_NAMES_ASSET} lists {len(names)} class names")
    if previous is not None:
        lost = sorted(set(previous.signatures) - set(servable.signatures))
        if lost:
            raise VersionRejected(f"it lacks signatures {lost} that version {previous.version} "
                                  "(serving now) has; clients using them would break")


def run_warmup(servable: Servable, model_name: str, limits: Limits) -> int:
    """Replays assets.extra/tf_serving_warmup_requests on a servable before it takes traffic."""
    path = os.path.join(servable.path, export.WARMUP_DIR, export.WARMUP_FILE)
    if not os.path.exists(path):
        return 0
    count = 0
    for record in tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        if log.HasField("predict_log"):
            predict(servable, log.predict_log.request, model_name, limits)
        elif log.HasField("classify_log"):
            classify(servable, log.classify_log.request, model_name, limits)
        else:
            raise ValueError(f"warm-up record {count} is a {log.WhichOneof('log_type')}, which "
                             "this server does not replay (only predict_log and classify_log).")
        count += 1
    return count


# ---- Request handling (independent of gRPC, so warm-up uses the same path) ---------------------


def predict(servable: Servable, request: predict_pb2.PredictRequest, model_name: str,
            limits: Limits, deadline: float | None = None) -> predict_pb2.PredictResponse:
    """Validates a PredictRequest against the signature, runs it, and builds the response."""
    signature_name = request.model_spec.signature_name or export.SERVING_DEFAULT
    plan = servable.plan(signature_name)
    received = set(request.inputs)
    if plan.input_names != received:
        expected = set(plan.input_names)
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"signature {signature_name!r} takes inputs {sorted(expected)}; the "
                           f"request sent {sorted(received)} (missing: "
                           f"{sorted(expected - received)}, unexpected: "
                           f"{sorted(received - expected)}).")
    # Every shape is checked from tensor_shape before any array is built: a compact TensorProto
    # (one value, a huge shape) would otherwise be expanded to its full size first.
    shapes = {name: _checked_shape(name, request.inputs[name], plan.input_dtypes[name],
                                   plan.input_shapes[name], signature_name, limits)
              for name in plan.inputs}
    _check_elements(shapes, signature_name, limits)
    if len(shapes) > 1:
        batch_sizes = {name: shape[0] for name, shape in shapes.items()}
        if len(set(batch_sizes.values())) > 1:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"inputs have different batch sizes: {batch_sizes}.")
    inputs = {name: _input_array(name, request.inputs[name], signature_name, limits)
              for name in plan.inputs}
    outputs = list(request.output_filter) or plan.outputs
    if not plan.output_names.issuperset(outputs):
        unknown = sorted(set(outputs) - plan.output_names)
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"output_filter names {unknown}, which signature {signature_name!r} "
                           f"does not have; its outputs: {sorted(plan.output_names)}.")
    _check_deadline(deadline)
    result = servable.run(signature_name, inputs, outputs)
    response = predict_pb2.PredictResponse()
    _fill_model_spec(response.model_spec, model_name, servable.version, signature_name)
    response_outputs = response.outputs
    for name in outputs:
        tensors.to_tensor_proto(result[name], response_outputs[name])
    return response


def classify(servable: Servable, request: classification_pb2.ClassificationRequest,
             model_name: str, limits: Limits,
             deadline: float | None = None) -> classification_pb2.ClassificationResponse:
    """Classify as TF Serving does it for TF2 SavedModels (no method-name check).

    The signature needs exactly one input named `inputs` (serialized tf.Example) and the outputs
    `classes` and/or `scores`; imcl_tf exports one named `classify`. serving_default takes image
    bytes, so Classify on it is refused with INVALID_ARGUMENT, as TF Serving refuses it.
    """
    signature_name = request.model_spec.signature_name or export.SERVING_DEFAULT
    if signature_name not in servable.signatures:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"No signature was found with the name: {signature_name!r}; "
                           f"signatures: {sorted(servable.signatures)}.")
    signature = servable.signature_defs[signature_name]
    problem = None
    if set(signature.inputs) != {export.CLASSIFY_INPUT}:
        problem = (f"it takes inputs {sorted(signature.inputs)}, while Classify needs exactly one "
                   f"input named {export.CLASSIFY_INPUT!r} (serialized tf.Example)")
    elif not set(signature.outputs) <= {export.CLASSIFY_CLASSES, export.CLASSIFY_SCORES}:
        problem = (f"it has outputs {sorted(signature.outputs)}, while Classify needs "
                   f"{export.CLASSIFY_CLASSES!r} and/or {export.CLASSIFY_SCORES!r} only")
    if problem:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"signature {signature_name!r} cannot serve Classify: {problem}. Use "
                           f"signature_name={export.CLASSIFY!r}, or Predict for this signature.")
    serialized = _serialized_examples(request.input, limits)
    if not serialized:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           "Input is empty: the ClassificationRequest has no examples.")
    _check_deadline(deadline)
    result = servable.run(signature_name,
                          {export.CLASSIFY_INPUT: np.array(serialized, dtype=object)})
    classes = result.get(export.CLASSIFY_CLASSES)  # [B, L] bytes
    scores = result.get(export.CLASSIFY_SCORES)  # [B, L] float32
    response = classification_pb2.ClassificationResponse()
    _fill_model_spec(response.model_spec, model_name, servable.version, signature_name)
    num_classes = (classes if classes is not None else scores).shape[1]
    for i in range(len(serialized)):
        row = response.result.classifications.add()
        for c in range(num_classes):
            entry = row.classes.add()
            if classes is not None:
                entry.label = classes[i, c].decode("utf-8")
            if scores is not None:
                entry.score = float(scores[i, c])
    return response


def model_metadata(servable: Servable, request: get_model_metadata_pb2.GetModelMetadataRequest,
                   model_name: str) -> get_model_metadata_pb2.GetModelMetadataResponse:
    if not request.metadata_field:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           "GetModelMetadataRequest must specify at least one metadata_field "
                           f"(this server knows {SIGNATURE_DEF_FIELD!r}).")
    for field in request.metadata_field:
        if field != SIGNATURE_DEF_FIELD:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"Metadata field {field!r} is not supported; only "
                               f"{SIGNATURE_DEF_FIELD!r} is.")
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    _fill_model_spec(response.model_spec, model_name, servable.version, "")
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    for name, signature in servable.signature_defs.items():
        signature_map.signature_def[name].CopyFrom(signature)
    response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
    return response


def model_status(manager: ModelManager, request: get_model_status_pb2.GetModelStatusRequest
                 ) -> get_model_status_pb2.GetModelStatusResponse:
    spec = request.model_spec
    if spec.name != manager.model_name:
        raise RequestError(grpc.StatusCode.NOT_FOUND,
                           f"Could not find any versions of model {spec.name!r}; this server "
                           f"serves {manager.model_name!r}.")
    states = manager.version_statuses()
    if spec.HasField("version"):
        if spec.version.value not in states:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"Could not find version {spec.version.value} of model "
                               f"{manager.model_name!r}; known versions: {sorted(states)}.")
        states = {spec.version.value: states[spec.version.value]}
    response = get_model_status_pb2.GetModelStatusResponse()
    for version in sorted(states):
        entry = response.model_version_status.add(version=version, state=states[version].state)
        entry.status.error_code = states[version].error_code
        entry.status.error_message = states[version].error_message
    return response


def _checked_shape(name: str, proto, dtype: int, expected: list[int] | None,
                   signature_name: str, limits: Limits) -> list[int]:
    """A request input's shape read from its tensor_shape (nothing is built), after checking its
    dtype, shape and batch size against the signature (`expected`: None for an unknown rank, -1
    for a free dimension) and --max_batch_size."""
    where = f"input {name!r} of signature {signature_name!r}"
    if proto.dtype != dtype:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{where} has dtype {_dtype_name(proto.dtype)}; expected "
                           f"{_dtype_name(dtype)}.")
    if proto.tensor_shape.unknown_rank:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{where} has an unknown rank; send its full shape.")
    shape = [dim.size for dim in proto.tensor_shape.dim]
    if any(size < 0 for size in shape):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{where} has shape {shape}; every dimension must be >= 0.")
    if expected is not None and (
            len(shape) != len(expected)
            or any(e not in (-1, got) for e, got in zip(expected, shape))):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{where} has shape {shape}; expected {expected} (-1: any size).")
    if not shape:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{where} is a scalar; send a batch (first dimension).")
    _check_batch(shape[0], where, limits)
    return shape


def _check_elements(shapes: Mapping[str, list[int]], where: str, limits: Limits) -> None:
    """The request's inputs together expand to at most limits.max_request_elements values."""
    counts = {name: math.prod(shape) for name, shape in shapes.items()}
    total = sum(counts.values())
    if total > limits.max_request_elements:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the inputs of signature {where!r} have {total:,} elements "
                           f"({', '.join(f'{name}: {shapes[name]}' for name in sorted(shapes))}), "
                           f"over this server's limit of {limits.max_request_elements:,} per "
                           f"request (what a dense float32 message of --max_message_mb="
                           f"{limits.max_message_bytes // (1024 * 1024)} holds); split the "
                           "request.")


def _input_array(name: str, proto, signature_name: str, limits: Limits) -> np.ndarray:
    """One request input as a NumPy array; call after _checked_shape and _check_elements.
    Image bytes are checked from their headers (format, size, --max_image_pixels)."""
    where = f"input {name!r} of signature {signature_name!r}"
    try:
        array = tensors.to_ndarray(proto)
    except (ValueError, TypeError) as err:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{where} is not a valid TensorProto: {err}") from err
    if name == export.IMAGE_BYTES_INPUT:
        check_images(array.reshape(-1), f"{where}: element", limits)
    return array


def check_images(encoded: Sequence[bytes], where: str, limits: Limits) -> None:
    """Reads each image's size from its header and refuses unknown formats, truncated headers
    and images over --max_image_pixels, before the signature decodes anything."""
    for i, image in enumerate(encoded):
        try:
            image_header.check_image_pixels(image, limits.max_image_pixels, f"{where} {i}")
        except (image_header.ImageHeaderError, image_header.ImageTooLargeError) as err:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(err)) from err


def _check_deadline(deadline: float | None) -> None:
    """DEADLINE_EXCEEDED when the client's deadline (time.monotonic()) has passed: the model is
    not run for an answer nobody waits for."""
    if deadline is not None and time.monotonic() >= deadline:
        raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           "the request's deadline passed before the model ran; the server was "
                           "busy: retry with a longer deadline, or add capacity.")


def _check_batch(batch: int, where: str, limits: Limits) -> None:
    if batch == 0:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{where} is an empty batch; send at least one item.")
    if batch > limits.max_batch_size:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{where} has a batch of {batch}, over this server's "
                           f"--max_batch_size={limits.max_batch_size}; split the request.")


def _serialized_examples(model_input, limits: Limits) -> list[bytes]:
    """Serialized tf.Examples of a serving Input, the context merged in as TF Serving does; their
    images are checked from their headers (check_images) before the signature decodes them."""
    kind = model_input.WhichOneof("kind")
    if kind not in ("example_list", "example_list_with_context"):
        return []
    listed = getattr(model_input, kind).examples
    where = f"input.{kind}.examples"
    if listed:
        _check_batch(len(listed), where, limits)  # before anything is merged or looked at
    if kind == "example_list":
        examples = list(listed)
    else:
        context = model_input.example_list_with_context.context
        examples = []
        for example in listed:
            combined = tf.train.Example()
            combined.CopyFrom(context)
            combined.MergeFrom(example)  # the example's own features win over the context's
            examples.append(combined)
    for i, example in enumerate(examples):
        if data.IMAGE_ENCODED_KEY in example.features.feature:
            feature = example.features.feature[data.IMAGE_ENCODED_KEY]
            check_images(feature.bytes_list.value, f"{where}[{i}] feature "
                         f"{data.IMAGE_ENCODED_KEY!r} value", limits)
    return [example.SerializeToString() for example in examples]


def _fill_model_spec(spec, model_name: str, version: int, signature_name: str) -> None:
    spec.name = model_name
    spec.version.value = version
    if signature_name:
        spec.signature_name = signature_name


def _dtype_name(dtype: int) -> str:
    try:
        return types_pb2.DataType.Name(dtype)
    except ValueError:
        return f"unknown dtype {dtype}"


# TensorFlow's error codes are the gRPC status codes, number for number.
_GRPC_CODE = {code.value[0]: code for code in grpc.StatusCode}


# ---- Services (shared by gRPC and REST) ------------------------------------------------------


class Services:
    """What both front ends call: request handling over the ModelManager, admission control and
    the access log, so gRPC and REST apply the same checks and limits."""

    def __init__(self, manager: ModelManager, limits: Limits,
                 access_logger: logging.Logger | None = None, max_concurrent_rpcs: int = 0):
        self.manager = manager
        self.limits = limits
        self._access_logger = access_logger
        self._max_in_flight = max_concurrent_rpcs
        self._in_flight = 0  # REST requests running
        self._lock = threading.Condition()

    def predict(self, request, deadline: float | None = None):
        return predict(self.manager.resolve(request.model_spec), request,
                       self.manager.model_name, self.limits, deadline)

    def classify(self, request, deadline: float | None = None):
        return classify(self.manager.resolve(request.model_spec), request,
                        self.manager.model_name, self.limits, deadline)

    def metadata(self, request):
        return model_metadata(self.manager.resolve(request.model_spec), request,
                              self.manager.model_name)

    def status(self, request):
        return model_status(self.manager, request)

    def plan(self, model_spec) -> _SignaturePlan:
        """The input plan of the signature `model_spec` names (REST converts JSON with it)."""
        servable = self.manager.resolve(model_spec)
        return servable.plan(model_spec.signature_name or export.SERVING_DEFAULT)

    @contextlib.contextmanager
    def admission(self):
        """Counts a REST request in flight; refuses it beyond --max_concurrent_rpcs (gRPC has its
        own limit in grpc.server)."""
        with self._lock:
            if self._max_in_flight and self._in_flight >= self._max_in_flight:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   f"the server is at its limit of {self._max_in_flight} "
                                   "concurrent requests (--max_concurrent_rpcs); retry later.")
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify_all()

    def wait_idle(self, seconds: float) -> None:
        """Waits up to `seconds` for the REST requests in flight to finish."""
        with self._lock:
            self._lock.wait_for(lambda: self._in_flight == 0, timeout=max(seconds, 0.0))

    def access(self, what: str, peer: str, model: str, code: grpc.StatusCode,
               seconds: float) -> None:
        if self._access_logger is not None:
            self._access_logger.info("%s peer=%s model=%s status=%s ms=%.1f", what, peer, model,
                                     code.name, seconds * 1000)

    @staticmethod
    def log_exception(message: str, *args) -> None:
        _LOG.exception(message, *args)

    def close(self) -> None:
        """Closes the access log file."""
        if self._access_logger is not None:
            for handler in self._access_logger.handlers:
                handler.close()


# ---- gRPC services -----------------------------------------------------------------------------


def _handler(method: Callable[..., Any]) -> Callable[..., Any]:
    """Checks the client's deadline, turns RequestError into its status and any other exception
    into INTERNAL (never a crash), and writes the access log line."""

    def wrapped(self, request, context):
        start = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            remaining = context.time_remaining()
            deadline = None if remaining is None else start + remaining
            _check_deadline(deadline)
            return method(self, request, deadline)
        except RequestError as err:
            code = err.code
            context.abort(err.code, err.message)
        except Exception as err:  # a bug must cost one request, not the server
            code = grpc.StatusCode.INTERNAL
            _LOG.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL,
                          f"internal error in {method.__name__}: {type(err).__name__}: {err}")
        finally:
            spec = getattr(request, "model_spec", None)
            self._services.access(f"gRPC {method.__name__}", context.peer(),
                                  spec.name if spec is not None else "-", code,
                                  time.monotonic() - start)

    wrapped.__name__ = method.__name__
    wrapped.__doc__ = method.__doc__
    return wrapped


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService over the shared Services."""

    def __init__(self, services: Services):
        self._services = services

    @_handler
    def Predict(self, request, deadline):
        return self._services.predict(request, deadline)

    @_handler
    def Classify(self, request, deadline):
        return self._services.classify(request, deadline)

    @_handler
    def GetModelMetadata(self, request, deadline):
        return self._services.metadata(request)

    @_handler
    def Regress(self, request, deadline):
        self._services.manager.resolve(request.model_spec)
        raise RequestError(grpc.StatusCode.UNIMPLEMENTED,
                           "Regress is not served: imcl_tf models export no regression "
                           "signature; use Predict (or Classify with signature 'classify').")

    @_handler
    def MultiInference(self, request, deadline):
        raise RequestError(grpc.StatusCode.UNIMPLEMENTED,
                           "MultiInference is not served by this development server; send "
                           "Predict or Classify requests.")


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService: version status (config reloads are not supported)."""

    def __init__(self, services: Services):
        self._services = services

    @_handler
    def GetModelStatus(self, request, deadline):
        return self._services.status(request)

    @_handler
    def HandleReloadConfigRequest(self, request, deadline):
        raise RequestError(grpc.StatusCode.UNIMPLEMENTED,
                           "this server serves one model from --model_base_path and picks up new "
                           "versions by itself; config reloads are not supported.")


# ---- Command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = arguments.server_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    try:
        server, port = start_server(args.model_base_path, args.model_name, port=args.port,
                                    host=args.host, max_batch_size=args.max_batch_size,
                                    max_message_mb=args.max_message_mb,
                                    poll_seconds=args.poll_seconds,
                                    num_versions=args.num_versions, num_threads=args.num_threads,
                                    enable_batching=args.enable_batching,
                                    num_batch_threads=args.num_batch_threads,
                                    batch_timeout_micros=args.batch_timeout_micros,
                                    max_image_pixels=args.max_image_pixels,
                                    rest_api_port=args.rest_api_port or None,
                                    max_concurrent_rpcs=args.max_concurrent_rpcs,
                                    ssl_cert=args.ssl_cert, ssl_key=args.ssl_key,
                                    access_log=args.access_log)
    except (ValueError, OSError) as err:
        print(f"serving.server: error: {err}", file=sys.stderr)
        return 2
    versions = server.manager.loaded_versions()
    if not versions:
        _LOG.warning("no version of %s loaded yet: answering NOT_FOUND until one appears under %s",
                     args.model_name, args.model_base_path)
    # Tests and benchmarks wait for this line.
    print(f"serving model {args.model_name!r} versions {versions} on {args.host}:{port}",
          flush=True)
    if server.rest_port is not None:
        print(f"REST API on http{'s' if args.ssl_cert else ''}://{args.host}:{server.rest_port}"
              f"/v1/models/{args.model_name}", flush=True)
    while not stop_requested.wait(0.5):
        pass
    _LOG.info("stopping: finishing requests in flight (up to %.0f s)", args.shutdown_grace_seconds)
    server.stop(args.shutdown_grace_seconds)
    _LOG.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

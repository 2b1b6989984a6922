"""TensorFlow Serving's REST API (port 8501) beside the gRPC one, for serving/server.py.

The same URLs and JSON as `tensorflow_model_server --rest_api_port`:

    POST /v1/models/NAME[/versions/N | /labels/L]:predict
         {"signature_name": ..., "instances": [...]}  or  {"signature_name": ..., "inputs": ...}
    POST /v1/models/NAME[/versions/N | /labels/L]:classify
         {"signature_name": ..., "examples": [...], "context": {...}}
    GET  /v1/models/NAME[/versions/N]            version status
    GET  /v1/models/NAME[/versions/N]/metadata   signatures

Bytes travel as {"b64": "..."}. Answers are {"predictions": ...} (row format), {"outputs": ...}
(columnar), {"results": ...} (classify) or {"error": "..."} with the HTTP status TF Serving maps
the gRPC code to (400 INVALID_ARGUMENT, 404 NOT_FOUND, ...). A request becomes the same
PredictRequest / ClassificationRequest the gRPC service handles, so every limit and check
(`--max_message_mb` on the body, shapes, batch size, element count, `--max_image_pixels`) is the
gRPC code path's.
"""

from __future__ import annotations

import base64
import binascii
import http.server
import json
import re
import socket
import ssl
import threading
import time
from typing import Any, Callable

import grpc
import numpy as np
from google.protobuf import json_format
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, model_pb2, predict_pb2)

from imcl_tf import export
from serving import arguments, tensors
from serving.errors import RequestError

DEFAULT_REST_PORT = arguments.DEFAULT_REST_PORT  # TF Serving's REST port
READ_TIMEOUT_SECONDS = 30  # a client that stops sending mid-request loses its connection
MAX_JSON_DEPTH = 32  # nesting of one input value; real tensors have rank 1-4

# TF Serving's mapping of gRPC codes to HTTP statuses (tensorflow_serving/util/net_http).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200, grpc.StatusCode.CANCELLED: 499, grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400, grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400, grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500, grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500, grpc.StatusCode.UNAUTHENTICATED: 401,
}
_PATH = re.compile(r"^/v1/models/(?P<name>[^/:]+)"
                   r"(?:/versions/(?P<version>-?\d+)|/labels/(?P<label>[^/:]+))?"
                   r"(?::(?P<verb>[A-Za-z]+)|/(?P<metadata>metadata))?/?$")
_NUMPY_DTYPES = {types_pb2.DT_FLOAT: np.float32, types_pb2.DT_DOUBLE: np.float64,
                 types_pb2.DT_INT32: np.int32, types_pb2.DT_INT64: np.int64,
                 types_pb2.DT_BOOL: np.bool_}


class RestServer:
    """The REST endpoint: a ThreadingHTTPServer in its own thread over the gRPC side's services."""

    def __init__(self, services, host: str, port: int, ssl_context: ssl.SSLContext | None):
        handler = type("Handler", (_Handler,), {"services": services})
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("Server", (http.server.ThreadingHTTPServer,),
                            {"address_family": family, "daemon_threads": True})
        try:
            self.httpd = server_class((host, port), handler)
        except OSError as err:
            raise OSError(f"cannot listen on {host}:{port} for REST: {err}; is the port in "
                          "use? (--rest_api_port=0 turns REST off)") from err
        self.httpd.stopping = threading.Event()  # read by handlers of kept-alive connections
        if ssl_context is not None:
            self.httpd.socket = ssl_context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rest-server",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops accepting connections and requests; those already running finish in their
        threads (ServingServer.stop waits for them)."""
        self.httpd.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join()


class _Handler(http.server.BaseHTTPRequestHandler):
    """One connection; `services` (set by RestServer) is server.RestServices."""

    services: Any
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length
    timeout = READ_TIMEOUT_SECONDS
    server_version = "imcl_tf-serving"

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self._answer("GET", self._get)

    def do_POST(self):  # noqa: N802
        self._answer("POST", self._post)

    def log_message(self, format, *args):  # noqa: A002 - requests go to the access log instead
        pass

    def _answer(self, method: str, action: Callable[[re.Match], dict]) -> None:
        start = time.monotonic()
        match = _PATH.match(self.path.split("?", 1)[0])
        code = grpc.StatusCode.OK
        try:
            if self.server.stopping.is_set():
                self.close_connection = True
                raise RequestError(grpc.StatusCode.UNAVAILABLE,
                                   "the server is shutting down; retry on another replica.")
            if match is None:
                raise RequestError(grpc.StatusCode.NOT_FOUND,
                                   f"Malformed request: {method} {self.path}; the API is "
                                   "/v1/models/NAME[/versions/N|/labels/L][:predict|:classify"
                                   "|/metadata].")
            with self.services.admission():
                body = action(match)
            status = 200
        except RequestError as err:
            code, body = err.code, {"error": err.message}
            status = 413 if err.too_large else HTTP_STATUS.get(err.code, 500)
        except Exception as err:  # a bug costs one request, not the server
            self.services.log_exception("REST %s %s failed", method, self.path)
            code = grpc.StatusCode.INTERNAL
            status, body = 500, {"error": f"internal error: {type(err).__name__}: {err}"}
        payload = json.dumps(body, allow_nan=True).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client went away
            self.close_connection = True
        name = match.group("name") if match else "-"
        self.services.access(f"REST {method} {self.path.split('?', 1)[0]}",
                             self.client_address[0], name, code, time.monotonic() - start)

    # -- GET: status and metadata --

    def _get(self, match: re.Match) -> dict:
        if match.group("verb"):
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"Malformed request: GET with :{match.group('verb')}; "
                               "predictions are POST requests.")
        spec = _model_spec(match)
        if match.group("metadata"):
            response = self.services.metadata(get_model_metadata_pb2.GetModelMetadataRequest(
                model_spec=spec, metadata_field=["signature_def"]))
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(signature_map)
            return {"model_spec": json_format.MessageToDict(
                        response.model_spec, preserving_proto_field_name=True),
                    "metadata": {"signature_def": json_format.MessageToDict(
                        signature_map, preserving_proto_field_name=True)}}
        if spec.version_label:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "Model status takes /versions/N, not /labels/L.")
        response = self.services.status(get_model_status_pb2.GetModelStatusRequest(
            model_spec=spec))
        return json_format.MessageToDict(response, preserving_proto_field_name=True,
                                         always_print_fields_with_no_presence=True)

    # -- POST: predict and classify --

    def _post(self, match: re.Match) -> dict:
        verb = match.group("verb")
        if match.group("metadata") or verb not in ("predict", "classify", "regress"):
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"Malformed request: POST {self.path}; use :predict or "
                               ":classify.")
        body = self._json_body()
        spec = _model_spec(match)
        spec.signature_name = _optional_string(body, "signature_name")
        if verb == "predict":
            return self._predict(spec, body)
        if verb == "classify":
            request = classification_pb2.ClassificationRequest(model_spec=spec)
            _fill_examples(request.input, body)
            response = self.services.classify(request)
            return {"results": [[[entry.label, entry.score] for entry in row.classes]
                                for row in response.result.classifications]}
        raise RequestError(grpc.StatusCode.UNIMPLEMENTED,
                           "Regress is not served: imcl_tf models export no regression "
                           "signature; use :predict (or :classify with signature 'classify').")

    def _json_body(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "chunked request bodies are not supported; send Content-Length.")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "the request has no valid Content-Length header.") from None
        limit = self.services.limits.max_message_bytes
        if length < 0 or length > limit:
            self.close_connection = True  # the body is not read: the connection cannot go on
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"the request body has {length:,} bytes, over this server's "
                               f"limit of {limit:,} (--max_message_mb); split the request.",
                               too_large=True)
        raw = self.rfile.read(length)
        if len(raw) != length:
            self.close_connection = True
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"the request body ended after {len(raw)} of {length} bytes.")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"JSON Parse error: {err}") from None
        if not isinstance(body, dict):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "the request body must be a JSON object, e.g. "
                               '{"instances": [...]}.')
        return body

    def _predict(self, spec, body: dict) -> dict:
        if ("instances" in body) == ("inputs" in body):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               "the request must have exactly one of 'instances' (row format) "
                               "or 'inputs' (columnar format).")
        plan = self.services.plan(spec)
        row_format = "instances" in body
        values = (_rows_to_columns(body["instances"], plan.inputs) if row_format
                  else _named_columns(body["inputs"], plan.inputs))
        request = predict_pb2.PredictRequest(model_spec=spec)
        for name, value in values.items():
            dtype = plan.input_dtypes.get(name)
            if dtype is None:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"signature {spec.signature_name or export.SERVING_DEFAULT!r} "
                                   f"has no input {name!r}; its inputs: {list(plan.inputs)}.")
            tensors.to_tensor_proto(_json_array(value, dtype, name), request.inputs[name])
        response = self.services.predict(request)
        outputs = {name: _json_value(tensors.to_ndarray(proto), name)
                   for name, proto in sorted(response.outputs.items())}
        if row_format:
            rows = len(next(iter(outputs.values()))) if outputs else 0
            if len(outputs) == 1:
                return {"predictions": next(iter(outputs.values()))}
            return {"predictions": [{name: value[i] for name, value in outputs.items()}
                                    for i in range(rows)]}
        if len(outputs) == 1:
            return {"outputs": next(iter(outputs.values()))}
        return {"outputs": outputs}


def _model_spec(match: re.Match) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=match.group("name"))
    if match.group("version") is not None:
        version = int(match.group("version"))
        if not 0 < version < 2**63:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"version {match.group('version')} is not a positive integer.")
        spec.version.value = version
    elif match.group("label"):
        spec.version_label = match.group("label")
    return spec


def _optional_string(body: dict, key: str) -> str:
    value = body.get(key, "")
    if not isinstance(value, str):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{key!r} must be a string. Received: {value!r:.80}.")
    return value


def _rows_to_columns(instances, input_names) -> dict[str, list]:
    """Row format: a list of instances, each the single input's value or {input: value}."""
    if not isinstance(instances, list) or not instances:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           "'instances' must be a non-empty list (one entry per example).")
    named = [isinstance(row, dict) and not _is_b64(row) for row in instances]
    if all(named):
        keys = set(instances[0])
        for i, row in enumerate(instances):
            if set(row) != keys:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                   f"instances[{i}] has inputs {sorted(row)}, instances[0] has "
                                   f"{sorted(keys)}; every instance needs the same inputs.")
        return {key: [row[key] for row in instances] for key in sorted(keys)}
    if any(named):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           "'instances' mixes named inputs ({input: value}) and plain values.")
    if len(input_names) != 1:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the signature takes inputs {list(input_names)}: each instance must "
                           "be an object naming them.")
    return {input_names[0]: instances}


def _named_columns(inputs, input_names) -> dict[str, Any]:
    """Columnar format: {input: batched value}, or the batched value of the single input."""
    if isinstance(inputs, dict) and not _is_b64(inputs):
        return dict(inputs)
    if len(input_names) != 1:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"the signature takes inputs {list(input_names)}: 'inputs' must be an "
                           "object naming them.")
    return {input_names[0]: inputs}


def _is_b64(value) -> bool:
    return isinstance(value, dict) and len(value) == 1 and "b64" in value


def _json_array(value, dtype: int, name: str) -> np.ndarray:
    """A JSON value (nested lists) as an array of the signature's dtype; rectangular only."""
    flat, shape = [], []
    _flatten(value, 0, shape, flat, name)
    if dtype == types_pb2.DT_STRING:
        array = np.empty([len(flat)], dtype=object)
        for i, item in enumerate(flat):
            array[i] = _json_bytes(item, name)
        return array.reshape(shape)
    numpy_dtype = _NUMPY_DTYPES.get(dtype)
    if numpy_dtype is None:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"input {name!r} has dtype {types_pb2.DataType.Name(dtype)}, which the "
                           "REST API of this server does not convert; use gRPC.")
    wanted = bool if dtype == types_pb2.DT_BOOL else (int, float)
    for item in flat:
        if not isinstance(item, wanted) or (dtype != types_pb2.DT_BOOL and
                                            isinstance(item, bool)):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"input {name!r} takes {'booleans' if wanted is bool else 'numbers'}"
                               f"; it holds {item!r:.40}.")
    try:
        return np.array(flat, dtype=numpy_dtype).reshape(shape)
    except OverflowError as err:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"input {name!r}: {err}.") from None


def _flatten(value, depth: int, shape: list, flat: list, name: str) -> None:
    """Appends the leaves of nested lists to `flat`, checking that every list at one depth has
    the same length (recorded in `shape`)."""
    if not isinstance(value, list):
        if len(shape) != depth:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"input {name!r} is ragged: a value at depth {depth} where "
                               f"lists of shape {shape} were found elsewhere.")
        flat.append(value)
        return
    if depth >= MAX_JSON_DEPTH:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"input {name!r} is nested deeper than {MAX_JSON_DEPTH} lists.")
    if len(shape) == depth:
        if flat:  # leaves were already found at a shallower depth
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"input {name!r} is ragged: lists and values at depth {depth}.")
        shape.append(len(value))
    elif len(shape) < depth or shape[depth] != len(value):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"input {name!r} is ragged: lists of different lengths at depth "
                           f"{depth} ({shape[depth] if len(shape) > depth else '-'} and "
                           f"{len(value)}).")
    for item in value:
        _flatten(item, depth + 1, shape, flat, name)


def _json_bytes(item, name: str) -> bytes:
    if _is_b64(item):
        encoded = item["b64"]
        if isinstance(encoded, str):
            try:
                return base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError):
                pass
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"input {name!r}: {{'b64': ...}} does not hold valid base64 text.")
    if isinstance(item, str):
        return item.encode("utf-8")
    raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"input {name!r} takes strings or {{\"b64\": ...}} objects; it holds "
                       f"{item!r:.40}.")


def _json_value(array: np.ndarray, name: str):
    """An output array as JSON: numbers as lists, strings as text ({"b64"} for names ending in
    _bytes or bytes that are not UTF-8, as TF Serving does)."""
    if array.dtype != object:
        return array.tolist()
    flat = []
    for item in array.reshape(-1):
        try:
            flat.append({"b64": base64.b64encode(item).decode("ascii")} if name.endswith("_bytes")
                        else item.decode("utf-8"))
        except UnicodeDecodeError:
            flat.append({"b64": base64.b64encode(item).decode("ascii")})
    return np.array(flat, dtype=object).reshape(array.shape).tolist() if array.ndim else flat[0]


def _fill_examples(model_input, body: dict) -> None:
    """{"examples": [{feature: value}], "context": {...}} -> a serving Input of tf.Examples."""
    examples = body.get("examples")
    if not isinstance(examples, list):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           "a classify request needs 'examples': a list of {feature: value}.")
    if "context" in body:
        target = model_input.example_list_with_context
        _fill_example(target.context, body["context"], "context")
    else:
        target = model_input.example_list
    for i, example in enumerate(examples):
        _fill_example(target.examples.add(), example, f"examples[{i}]")


def _fill_example(example, features, where: str) -> None:
    if not isinstance(features, dict):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{where} must be an object of features.")
    for key, value in features.items():
        values = value if isinstance(value, list) else [value]
        feature = example.features.feature[key]
        if all(isinstance(v, str) or _is_b64(v) for v in values):
            feature.bytes_list.value.extend(_json_bytes(v, f"{where}.{key}") for v in values)
        elif all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            feature.int64_list.value.extend(values)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            feature.float_list.value.extend(float(v) for v in values)
        else:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"{where}.{key} must be a number, a string, {{\"b64\": ...}}, or a "
                               "list of one of these kinds.")

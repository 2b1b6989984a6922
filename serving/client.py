"""gRPC client for imcl_tf models served by TensorFlow Serving or serving/server.py.

It sends only standard PredictRequest / ClassificationRequest / GetModelMetadata / GetModelStatus
fields, so the same code talks to the real `tensorflow_model_server` (port 8500) and to the local
development server.

    python -m serving.client --server=localhost:8500 --model_name=demo cat.jpg dog.png
    python -m serving.client --server=localhost:8500 --model_name=demo --json --top_k=3 *.jpg

Python API:

    client = PredictionClient("localhost:8500", "demo")
    client.predict_bytes([open("cat.jpg", "rb").read()], top_k=3)  # [[("cat", 0.97), ...]]
"""

from __future__ import annotations

import json
import sys
from typing import Any, Sequence

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, model_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from imcl_tf import data, export
from serving import arguments, tensors

Predictions = list[list[tuple[str, float]]]  # per image: (class name, probability), best first


class ServingError(RuntimeError):
    """A failed call: the gRPC status, the server's message and what the client was doing."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.code = code


class PredictionClient:
    """Talks to one model on a TF Serving compatible server.

    Args:
      server: "host:port" of the gRPC endpoint (TF Serving's default port is 8500).
      model_name: the served model's name.
      version: a fixed version, or None for the newest the server has.
      timeout: seconds per call.
      max_message_mb: largest message sent or received, in MiB.
    """

    def __init__(self, server: str, model_name: str, *, version: int | None = None,
                 timeout: float = 30.0, max_message_mb: int = 64):
        self.server = server
        self.model_name = model_name
        self.version = version
        self.timeout = timeout
        max_bytes = max_message_mb * 1024 * 1024
        self._channel = grpc.insecure_channel(
            server, options=[("grpc.max_receive_message_length", max_bytes),
                             ("grpc.max_send_message_length", max_bytes)])
        self._predictions = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._request_templates: dict[tuple, predict_pb2.PredictRequest] = {}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "PredictionClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- predictions --

    def predict_bytes(self, images: Sequence[bytes], top_k: int = 5,
                      signature: str = export.SERVING_DEFAULT) -> Predictions:
        """Top-k (class, probability) per JPEG/PNG encoding, all sent in one PredictRequest."""
        request = self._predict_request(signature, _TOP_K_OUTPUTS)
        tensors.string_tensor_proto([bytes(image) for image in images],  # [B]
                                    request.inputs[export.IMAGE_BYTES_INPUT])
        return self._top_k(self._predict(request, signature), top_k)

    def predict_images(self, images: np.ndarray, top_k: int = 5,
                       signature: str = export.PREDICT_IMAGES) -> Predictions:
        """Top-k per image of a float32 [B, S, S, 3] array in 0..255 (already resized)."""
        images = np.asarray(images, dtype=np.float32)
        return self._top_k(self.predict({export.IMAGES_INPUT: images}, signature,
                                        _TOP_K_OUTPUTS), top_k)

    def predict_features(self, features: np.ndarray, top_k: int = 5,
                         signature: str = export.PREDICT_FEATURES) -> Predictions:
        """Top-k per row of a float32 [B, D] feature array (features-mode models)."""
        features = np.asarray(features, dtype=np.float32)
        return self._top_k(self.predict({export.FEATURES_INPUT: features}, signature,
                                        _TOP_K_OUTPUTS), top_k)

    def predict(self, inputs: dict[str, np.ndarray], signature: str = export.SERVING_DEFAULT,
                output_filter: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """One raw Predict call: named NumPy inputs in, named NumPy outputs out."""
        request = self._predict_request(signature, output_filter)
        for name, value in inputs.items():
            tensors.to_tensor_proto(value, request.inputs[name])
        return self._predict(request, signature)

    def _predict_request(self, signature: str,
                         output_filter: Sequence[str]) -> predict_pb2.PredictRequest:
        """A PredictRequest without inputs: a copy of one built once per model, version, signature
        and output filter."""
        key = (self.model_name, self.version, signature, tuple(output_filter))
        template = self._request_templates.get(key)
        if template is None:
            template = predict_pb2.PredictRequest(model_spec=self._model_spec(signature),
                                                  output_filter=list(output_filter))
            self._request_templates[key] = template
        request = predict_pb2.PredictRequest()
        request.CopyFrom(template)
        return request

    def _predict(self, request: predict_pb2.PredictRequest,
                 signature: str) -> dict[str, np.ndarray]:
        response = self._call(self._predictions.Predict, request, f"Predict ({signature})")
        return {name: tensors.to_ndarray(proto) for name, proto in response.outputs.items()}

    def classify_bytes(self, images: Sequence[bytes],
                       signature: str = export.CLASSIFY) -> list[dict[str, float]]:
        """Every class's probability per image, through the Classify API (tf.Example inputs)."""
        request = classification_pb2.ClassificationRequest(
            model_spec=self._model_spec(signature))
        for image in images:
            request.input.example_list.examples.add().features.feature[
                data.IMAGE_ENCODED_KEY].bytes_list.value.append(bytes(image))
        response = self._call(self._predictions.Classify, request, f"Classify ({signature})")
        return [{entry.label: entry.score for entry in row.classes}
                for row in response.result.classifications]

    # -- model information --

    def metadata(self) -> dict[str, Any]:
        """Signatures of the served version: {"version": V, "signatures": {name: {...}}}.

        Each signature maps "inputs" and "outputs" to {tensor name: (dtype name, shape)} with -1
        for a free dimension. Internal signatures (starting with "__") are left out.
        """
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=self._model_spec(""), metadata_field=["signature_def"])
        response = self._call(self._predictions.GetModelMetadata, request, "GetModelMetadata")
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        signatures = {}
        for name, signature in signature_map.signature_def.items():
            if name.startswith("__"):
                continue
            signatures[name] = {
                side: {key: (types_pb2.DataType.Name(info.dtype),
                             [dim.size for dim in info.tensor_shape.dim])
                       for key, info in getattr(signature, side).items()}
                for side in ("inputs", "outputs")}
        return {"version": response.model_spec.version.value, "signatures": signatures}

    def status(self) -> list[dict[str, Any]]:
        """[{"version", "state" (AVAILABLE, LOADING, END, ...), "error"}] per known version."""
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=self._model_spec(""))
        response = self._call(self._models.GetModelStatus, request, "GetModelStatus")
        return [{"version": entry.version,
                 "state": get_model_status_pb2.ModelVersionStatus.State.Name(entry.state),
                 "error": entry.status.error_message}
                for entry in response.model_version_status]

    def image_size(self, signature: str = export.PREDICT_IMAGES) -> int:
        """Side S of the float image input of `signature`, read from the model's metadata."""
        signatures = self.metadata()["signatures"]
        inputs = signatures.get(signature, {}).get("inputs", {})
        if export.IMAGES_INPUT not in inputs:
            raise ServingError(f"model {self.model_name!r} on {self.server} has no signature "
                               f"{signature!r} with an {export.IMAGES_INPUT!r} input; signatures: "
                               f"{sorted(signatures)}.")
        return inputs[export.IMAGES_INPUT][1][1]

    # -- helpers --

    def _model_spec(self, signature: str) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=self.model_name, signature_name=signature)
        if self.version is not None:
            spec.version.value = self.version
        return spec

    def _call(self, method, request, what: str):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            code = err.code()
            hint = _HINTS.get(code, "")
            raise ServingError(f"{what} of model {self.model_name!r} on {self.server} failed: "
                               f"{code.name}: {err.details()}{hint}", code) from None

    def _top_k(self, outputs: dict[str, np.ndarray], top_k: int) -> Predictions:
        exported_k = outputs[export.TOP_K_SCORES].shape[1]
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1. Received: {top_k}.")
        if top_k > exported_k:
            # Asking for more than there are classes just means all of them.
            if exported_k < self._num_classes():
                raise ValueError(f"top_k={top_k} is more than the {exported_k} the model was "
                                 "exported with; re-export with a larger --top_k, or use "
                                 "classify_bytes() for every class's score.")
            top_k = exported_k
        classes = outputs[export.TOP_K_CLASSES][:, :top_k].tolist()  # [B, k] bytes
        scores = outputs[export.TOP_K_SCORES][:, :top_k].tolist()  # [B, k] Python floats
        return [[(name.decode("utf-8"), score) for name, score in zip(names, row)]
                for names, row in zip(classes, scores)]

    def _num_classes(self) -> int:
        """L, from the probabilities output of serving_default in the model's metadata."""
        outputs = self.metadata()["signatures"][export.SERVING_DEFAULT]["outputs"]
        return outputs[export.PROBABILITIES][1][-1]


_TOP_K_OUTPUTS = (export.TOP_K_CLASSES, export.TOP_K_SCORES)
_HINTS = {
    grpc.StatusCode.UNAVAILABLE: " (is the server running and the address right?)",
    grpc.StatusCode.DEADLINE_EXCEEDED: " (raise --timeout, or send fewer images per request)",
    grpc.StatusCode.RESOURCE_EXHAUSTED: " (message too large: send fewer images per request or "
                                        "raise the message size limits)",
}


def decode_images(encoded: Sequence[bytes], image_size: int) -> np.ndarray:
    """Decodes and resizes JPEG/PNG bytes exactly as the served model does.

    Returns float32 [B, S, S, 3] in 0..255, the `images` input of predict_images.
    """
    return np.stack([data.decode_image(tf.constant(bytes(image)), image_size).numpy()
                     for image in encoded])


# ---- Command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = arguments.client_parser()
    args = parser.parse_args(argv)

    try:
        encoded = []
        for path in args.images:
            with open(path, "rb") as f:
                encoded.append(f.read())
        with PredictionClient(args.server, args.model_name, version=args.version,
                              timeout=args.timeout) as client:
            if args.signature == export.PREDICT_IMAGES:
                array = decode_images(encoded, client.image_size(args.signature))
                predictions = client.predict_images(array, args.top_k, args.signature)
            else:
                predictions = client.predict_bytes(encoded, args.top_k, args.signature)
    except (OSError, ValueError, ServingError, tf.errors.OpError) as err:
        message = err.message if isinstance(err, tf.errors.OpError) else str(err)
        print(f"serving.client: error: {message}", file=sys.stderr)
        return 1

    if args.json:
        print(json.dumps([{"image": path,
                           "predictions": [{"class": name, "score": round(score, 6)}
                                           for name, score in ranked]}
                          for path, ranked in zip(args.images, predictions)], indent=2))
    else:
        for path, ranked in zip(args.images, predictions):
            print(path)
            for rank, (name, score) in enumerate(ranked, start=1):
                print(f"  {rank:>2}. {name:<30} {score:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

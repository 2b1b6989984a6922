"""The REST API of serving/server.py (TF Serving's URLs and JSON), driven with urllib against a
real server on 127.0.0.1 serving a tiny export; its limits and errors are the gRPC side's."""

import base64
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import model_pb2, prediction_service_pb2_grpc

from image_bombs import png_bomb
from imcl_tf import data, export
from serving import rest
from serving import server as serving_server
from test_export import CLASS_NAMES, IMAGE_SIZE, ROOT, encoded_images, tiny_image_model
from test_serving import expected_probabilities, predict_request

MAX_BATCH = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model, REST base URL, gRPC stub) of the tiny image model, version 1."""
    base = str(tmp_path_factory.mktemp("exports"))
    model = tiny_image_model()
    export.export_model(model, base, "tiny", class_names=CLASS_NAMES, input_mode="image",
                        image_size=IMAGE_SIZE, top_k=3)
    server, port = serving_server.start_server(os.path.join(base, "tiny"), "tiny",
                                               max_batch_size=MAX_BATCH, max_message_mb=1,
                                               rest_api_port=0)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield (model, f"http://127.0.0.1:{server.rest_port}",
           prediction_service_pb2_grpc.PredictionServiceStub(channel))
    channel.close()
    server.stop(5)


def call(url, body=None, method=None, raw=None):
    """(HTTP status, decoded JSON answer) of one request."""
    payload = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=payload,
                                     method=method or ("GET" if payload is None else "POST"))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def b64(encoded):
    return {"b64": base64.b64encode(encoded).decode("ascii")}


def test_predict_row_and_columnar_formats_match_the_model(served, rng):
    model, url, _ = served
    encoded = encoded_images(rng, 3)
    expected = expected_probabilities(model, encoded)
    top = np.argsort(-expected, axis=1, kind="stable")[:, :3]

    status, answer = call(f"{url}/v1/models/tiny:predict",
                          {"instances": [b64(e) for e in encoded]})
    assert status == 200, answer
    rows = answer["predictions"]
    assert len(rows) == 3 and set(rows[0]) == set(export.PREDICT_OUTPUTS)
    np.testing.assert_allclose([row["probabilities"] for row in rows], expected, atol=1e-5)
    assert [row["top_k_indices"] for row in rows] == top.tolist()
    assert [row["top_k_classes"] for row in rows] == np.array(CLASS_NAMES)[top].tolist()

    status, answer = call(f"{url}/v1/models/tiny/versions/1:predict",
                          {"signature_name": "serving_default",
                           "inputs": {"image_bytes": [b64(e) for e in encoded]}})
    assert status == 200, answer
    np.testing.assert_allclose(answer["outputs"]["probabilities"], expected, atol=1e-5)

    decoded = np.stack([data.decode_image(e, IMAGE_SIZE).numpy() for e in encoded])
    for body in ({"signature_name": "predict_images", "instances": decoded.tolist()},
                 {"signature_name": "predict_images",
                  "instances": [{"images": image} for image in decoded.tolist()]},
                 {"signature_name": "predict_images", "inputs": decoded.tolist()}):
        status, answer = call(f"{url}/v1/models/tiny:predict", body)
        assert status == 200, answer
        probabilities = ([row["probabilities"] for row in answer["predictions"]]
                         if "predictions" in answer else answer["outputs"]["probabilities"])
        np.testing.assert_allclose(probabilities, expected, atol=1e-5)


def test_classify_status_and_metadata(served, rng):
    model, url, _ = served
    encoded = encoded_images(rng, 2)
    expected = expected_probabilities(model, encoded)
    status, answer = call(f"{url}/v1/models/tiny:classify",
                          {"signature_name": "classify",
                           "examples": [{"image/encoded": b64(e)} for e in encoded]})
    assert status == 200, answer
    for row, probabilities in zip(answer["results"], expected):
        assert [label for label, _ in row] == CLASS_NAMES
        np.testing.assert_allclose([score for _, score in row], probabilities, atol=1e-5)

    for path in ("/v1/models/tiny", "/v1/models/tiny/versions/1"):
        status, answer = call(url + path)
        assert (status, answer) == (200, {"model_version_status": [
            {"version": "1", "state": "AVAILABLE",
             "status": {"error_code": "OK", "error_message": ""}}]})
    status, answer = call(f"{url}/v1/models/tiny/metadata")
    assert status == 200
    assert answer["model_spec"] == {"name": "tiny", "version": "1"}
    signatures = answer["metadata"]["signature_def"]["signature_def"]
    assert {"serving_default", "predict_images", "classify"} <= set(signatures)
    assert signatures["predict_images"]["inputs"]["images"]["dtype"] == "DT_FLOAT"


def test_errors_are_json_with_tf_serving_http_codes(served, rng):
    _, url, _ = served
    jpeg = encoded_images(rng, 2)[1]
    predict = f"{url}/v1/models/tiny:predict"
    images = np.zeros([1, IMAGE_SIZE, IMAGE_SIZE, 3]).tolist()
    cases = [
        (predict, dict(raw=b"{not json"), 400, "JSON Parse error"),
        (predict, dict(raw=b"[1, 2]"), 400, "must be a JSON object"),
        (predict, dict(body={"instances": [], "inputs": []}), 400, "exactly one of"),
        (predict, dict(body={"instances": []}), 400, "non-empty list"),
        (predict, dict(body={"instances": [b64(b"hello")]}), 400,
         "element 0: not a PNG, JPEG, GIF or BMP file"),
        (predict, dict(body={"instances": [{"b64": "***"}]}), 400, "valid base64"),
        (predict, dict(body={"instances": [b64(jpeg)] * (MAX_BATCH + 1)}), 400,
         f"over this server's --max_batch_size={MAX_BATCH}"),
        (predict, dict(body={"signature_name": "predict_images",
                             "instances": [[[1.0, 2.0]], [[1.0]]]}), 400, "ragged"),
        (predict, dict(body={"signature_name": "predict_images", "instances": [["a"]]}), 400,
         "takes numbers"),
        (predict, dict(body={"signature_name": "predict_images",
                             "instances": np.zeros([1, 8, 8, 3]).tolist()}), 400,
         "has shape [1, 8, 8, 3]; expected [-1, 16, 16, 3]"),
        (predict, dict(raw=json.dumps({"signature_name": "predict_images",
                                       "inputs": [[[[float("nan")] * 3] * IMAGE_SIZE]
                                                  * IMAGE_SIZE]}).encode()), 400,
         "NaN or infinite values"),
        (predict, dict(body={"signature_name": "predict_audio", "inputs": images}), 400,
         "'predict_audio' not found"),
        (predict, dict(body={"inputs": {"pixels": [1]}}), 400, "has no input 'pixels'"),
        (f"{url}/v1/models/other:predict", dict(body={"inputs": images}), 404,
         "model 'other' is not served here"),
        (f"{url}/v1/models/tiny/versions/7:predict", dict(body={"inputs": images}), 404,
         "version 7 of model 'tiny' is not loaded"),
        (f"{url}/v1/models/tiny/labels/stable:predict", dict(body={"inputs": images}), 404,
         "version_label 'stable' is not defined"),
        (f"{url}/v1/models/tiny:regress", dict(body={"examples": []}), 501, "Regress"),
        (f"{url}/v1/models/tiny:explain", dict(body={}), 404, "Malformed request"),
        (f"{url}/v2/anything", dict(), 404, "Malformed request"),
        (f"{url}/v1/models/tiny:predict", dict(), 404, "predictions are POST requests"),
        (f"{url}/v1/models/tiny/versions/9", dict(), 404, "Could not find version 9"),
        (f"{url}/v1/models/tiny:classify", dict(body={"examples": [{"image/encoded": [True]}]}),
         400, "must be a number, a string"),
    ]
    for target, kwargs, status, message in cases:
        got, answer = call(target, **kwargs)
        assert (got, list(answer)) == (status, ["error"]), (target, kwargs, got, answer)
        assert message in answer["error"], (message, answer)
    status, answer = call(predict, {"instances": [b64(jpeg)]})  # still serving
    assert status == 200


def test_limits_and_messages_are_the_grpc_ones(served):
    _, url, stub = served
    bomb = png_bomb(20000, 20000)
    status, answer = call(f"{url}/v1/models/tiny:predict", {"instances": [b64(bomb)]})
    with pytest.raises(grpc.RpcError) as caught:
        stub.Predict(predict_request({"image_bytes": np.array([bomb], dtype=object)}))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status == 400 and answer["error"] == caught.value.details()
    assert "20000 x 20000 pixels" in answer["error"]

    # A body over --max_message_mb=1 is refused from its Content-Length, before it is read.
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", "/v1/models/tiny:predict")
    connection.putheader("Content-Length", str(2 * 1024 * 1024))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413
    assert "over this server's limit of 1,048,576 (--max_message_mb)" in json.loads(
        response.read())["error"]
    connection.close()


def test_http_status_table_covers_every_grpc_code():
    assert set(rest.HTTP_STATUS) == set(grpc.StatusCode)
    assert rest.HTTP_STATUS[grpc.StatusCode.INVALID_ARGUMENT] == 400
    assert rest.HTTP_STATUS[grpc.StatusCode.NOT_FOUND] == 404
    assert rest.HTTP_STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED] == 429


def test_stop_finishes_rest_requests_in_flight(tmp_path, rng):
    export.export_model(tiny_image_model(), str(tmp_path), "tiny", class_names=CLASS_NAMES,
                        input_mode="image", image_size=IMAGE_SIZE)
    server, _ = serving_server.start_server(str(tmp_path / "tiny"), "tiny", rest_api_port=0)
    servable = server.manager.resolve(model_pb2.ModelSpec(name="tiny"))
    fast, started = servable.signatures["serving_default"], []

    def slow(**inputs):
        started.append(1)
        time.sleep(1.0)
        return fast(**inputs)

    servable.signatures["serving_default"] = slow
    url = f"http://127.0.0.1:{server.rest_port}/v1/models/tiny:predict"
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "answer", call(url, {"instances": [b64(encoded_images(rng, 1)[0])]})))
    thread.start()
    while not started:
        time.sleep(0.01)
    server.stop(10)
    thread.join()
    assert result["answer"][0] == 200 and len(result["answer"][1]["predictions"]) == 1
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, data=b"{}", timeout=10)


@pytest.mark.slow
def test_cli_serves_rest_on_loopback_beside_grpc(tmp_path, rng):
    export.export_model(tiny_image_model(), str(tmp_path), "tiny", class_names=CLASS_NAMES,
                        input_mode="image", image_size=IMAGE_SIZE)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        rest_port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "serving.server", f"--model_base_path={tmp_path / 'tiny'}",
         "--model_name=tiny", "--port=0", f"--rest_api_port={rest_port}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first, second = process.stdout.readline(), process.stdout.readline()
        assert re.search(r"versions \[1\] on 127\.0\.0\.1:\d+$", first.strip()), first
        assert second.strip() == f"REST API on http://127.0.0.1:{rest_port}/v1/models/tiny"
        status, answer = call(f"http://127.0.0.1:{rest_port}/v1/models/tiny:predict",
                              {"instances": [b64(encoded_images(rng, 1)[0])]})
        assert status == 200 and len(answer["predictions"]) == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert rest.DEFAULT_REST_PORT == 8501 and serving_server.DEFAULT_HOST == "127.0.0.1"

"""serving/server.py's operational options: TLS, --max_concurrent_rpcs, the server-side deadline
check and the access log, over gRPC and REST."""

import json
import os
import shutil
import ssl
import subprocess
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import model_pb2, prediction_service_pb2_grpc

from imcl_tf import export
from serving import server as serving_server
from test_export import CLASS_NAMES, FEATURE_DIM, tiny_features_model
from test_serving import predict_request


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("exports"))
    export.export_model(tiny_features_model(), folder, "feat", class_names=CLASS_NAMES,
                        input_mode="features", feature_dim=FEATURE_DIM)
    return os.path.join(folder, "feat")


def features_request():
    return predict_request({"features": np.ones([1, FEATURE_DIM], np.float32)},
                           "predict_features", name="feat")


def rest_predict(url, context=None):
    body = json.dumps({"signature_name": "predict_features",
                       "instances": np.ones([1, FEATURE_DIM]).tolist()}).encode()
    request = urllib.request.Request(f"{url}/v1/models/feat:predict", data=body)
    try:
        with urllib.request.urlopen(request, timeout=60, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def slow_down(server, seconds, calls):
    """Makes predict_features take `seconds`, counting the calls that reach the model."""
    servable = server.manager.resolve(model_pb2.ModelSpec(name="feat"))
    fast = servable.signatures["predict_features"]

    def slow(**inputs):
        calls.append(time.monotonic())
        time.sleep(seconds)
        return fast(**inputs)

    servable.signatures["predict_features"] = slow


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_on_grpc_and_rest(base, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server, port = serving_server.start_server(base, "feat", rest_api_port=0,
                                               ssl_cert=str(cert), ssl_key=str(key))
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        with grpc.secure_channel(f"localhost:{port}", credentials) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            assert stub.Predict(features_request(), timeout=60).model_spec.version.value == 1
        with grpc.insecure_channel(f"localhost:{port}") as channel:
            with pytest.raises(grpc.RpcError) as caught:
                prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                    features_request(), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        context = ssl.create_default_context(cafile=str(cert))
        status, answer = rest_predict(f"https://localhost:{server.rest_port}", context)
        assert status == 200 and len(answer["predictions"]) == 1
    finally:
        server.stop(5)
    with pytest.raises(ValueError, match="--ssl_cert and --ssl_key go together"):
        serving_server.start_server(base, "feat", ssl_cert=str(cert))
    with pytest.raises(ValueError, match="cannot use --ssl_cert"):
        serving_server.start_server(base, "feat", ssl_cert=str(cert), ssl_key=str(cert))


def start_while_busy(request, calls):
    """Starts `request` in a thread and returns it once the (slowed) model is running it."""
    thread = threading.Thread(target=request)
    thread.start()
    while not calls:
        time.sleep(0.01)
    return thread


def test_max_concurrent_rpcs_refuses_the_excess_on_both_apis(base):
    server, port = serving_server.start_server(base, "feat", rest_api_port=0,
                                               max_concurrent_rpcs=1)
    calls = []
    slow_down(server, 1.5, calls)
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{port}"))
        first = start_while_busy(lambda: stub.Predict(features_request(), timeout=60), calls)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(features_request(), timeout=60)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        first.join()
        url = f"http://127.0.0.1:{server.rest_port}"
        calls.clear()
        first = start_while_busy(lambda: rest_predict(url), calls)
        status, answer = rest_predict(url)
        assert status == 429 and "--max_concurrent_rpcs" in answer["error"]
        first.join()
        assert rest_predict(url)[0] == 200
    finally:
        server.stop(5)


def test_a_request_whose_deadline_passed_while_queued_does_not_run_the_model(base):
    server, port = serving_server.start_server(base, "feat", num_threads=1)
    calls = []
    slow_down(server, 1.0, calls)
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{port}"))
        first = start_while_busy(lambda: stub.Predict(features_request(), timeout=60), calls)
        with pytest.raises(grpc.RpcError) as caught:  # waits behind the first in the one thread
            stub.Predict(features_request(), timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        first.join()
        time.sleep(0.2)  # the queued request has now been looked at by the server
        assert len(calls) == 1  # and the model did not run for it
    finally:
        server.stop(5)
    with pytest.raises(serving_server.RequestError) as refused:
        server.services.predict(features_request(), deadline=time.monotonic() - 1)
    assert refused.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_access_log_has_one_line_per_request(base, tmp_path):
    log = tmp_path / "access.log"
    server, port = serving_server.start_server(base, "feat", rest_api_port=0,
                                               access_log=str(log))
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{port}"))
        stub.Predict(features_request(), timeout=60)
        with pytest.raises(grpc.RpcError):
            stub.Predict(predict_request({"features": np.ones([1, 2], np.float32)},
                                         "predict_features", name="feat"), timeout=60)
        assert rest_predict(f"http://127.0.0.1:{server.rest_port}")[0] == 200
    finally:
        server.stop(5)
    lines = log.read_text().splitlines()
    assert len(lines) == 3, lines
    assert "gRPC Predict peer=" in lines[0] and "model=feat status=OK ms=" in lines[0]
    assert "status=INVALID_ARGUMENT" in lines[1]
    assert "REST POST /v1/models/feat:predict peer=127.0.0.1 model=feat status=OK" in lines[2]

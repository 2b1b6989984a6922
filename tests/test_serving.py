"""Tests for serving/: the TF-Serving-compatible gRPC server and the client, over real exports.

Servers run in-process on a free loopback port, except the SIGTERM test, which runs the CLI.
"""

import inspect
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, model_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from imcl_tf import data, export
from serving import client as serving_client
from serving import server as serving_server
from test_export import (CLASS_NAMES, FEATURE_DIM, IMAGE_SIZE, ROOT, encoded_images, np_sigmoid,
                         tiny_features_model, tiny_image_model)

MAX_BATCH = 8


def expected_probabilities(model, encoded):
    """What the served model must answer: sigmoid(model(decode_image(bytes))), computed here."""
    decoded = np.stack([data.decode_image(tf.constant(e), IMAGE_SIZE).numpy() for e in encoded])
    return np_sigmoid(model(decoded, training=False).numpy())


def predict_request(inputs, signature="", name="tiny", version=None, output_filter=()):
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=name, signature_name=signature),
        output_filter=list(output_filter))
    if version is not None:
        request.model_spec.version.value = version
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The tiny image model exported as version 1 and served with batching on; yields
    (model, stub, port)."""
    base = str(tmp_path_factory.mktemp("exports"))
    model = tiny_image_model()
    export.export_model(model, base, "tiny", class_names=CLASS_NAMES, input_mode="image",
                        image_size=IMAGE_SIZE, top_k=3)
    server, port = serving_server.start_server(os.path.join(base, "tiny"), "tiny",
                                               max_batch_size=MAX_BATCH, poll_seconds=0.2,
                                               enable_batching=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield model, prediction_service_pb2_grpc.PredictionServiceStub(channel), port
    channel.close()
    server.stop(5)


def test_predict_round_trip_matches_the_keras_model(served, rng):
    model, stub, _ = served
    encoded = encoded_images(rng, 4)
    expected = expected_probabilities(model, encoded)
    response = stub.Predict(predict_request({"image_bytes": np.array(encoded, dtype=object)}))
    assert response.model_spec.name == "tiny" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    outputs = {key: tf.make_ndarray(value) for key, value in response.outputs.items()}
    assert set(outputs) == set(export.PREDICT_OUTPUTS)
    np.testing.assert_allclose(outputs["probabilities"], expected, atol=1e-5)
    top = np.argsort(-expected, axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(outputs["top_k_indices"], top)
    assert outputs["top_k_classes"].astype(str).tolist() == np.array(CLASS_NAMES)[top].tolist()

    decoded = np.stack([data.decode_image(tf.constant(e), IMAGE_SIZE).numpy() for e in encoded])
    response = stub.Predict(predict_request({"images": decoded}, "predict_images",
                                            output_filter=["probabilities"]))
    assert list(response.outputs) == ["probabilities"]
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]), expected,
                               atol=1e-5)


def test_client_api_and_classify(served, rng):
    model, _, port = served
    encoded = encoded_images(rng, 3)
    expected = expected_probabilities(model, encoded)
    with serving_client.PredictionClient(f"127.0.0.1:{port}", "tiny") as client:
        ranked = client.predict_bytes(encoded, top_k=2)
        for row, probabilities in zip(ranked, expected):
            best = np.argsort(-probabilities, kind="stable")[:2]
            assert [name for name, _ in row] == [CLASS_NAMES[i] for i in best]
            np.testing.assert_allclose([score for _, score in row], probabilities[best],
                                       atol=1e-5)
        # More than the exported top_k=3 is fine only up to the number of classes (4): here 3 < 4.
        with pytest.raises(ValueError, match="exported with"):
            client.predict_bytes(encoded, top_k=4)
        decoded = serving_client.decode_images(encoded, IMAGE_SIZE)
        from_images = client.predict_images(decoded, top_k=3)
        from_bytes = client.predict_bytes(encoded, top_k=3)
        assert [[name for name, _ in row] for row in from_images] == [
            [name for name, _ in row] for row in from_bytes]
        np.testing.assert_allclose([[score for _, score in row] for row in from_images],
                                   [[score for _, score in row] for row in from_bytes], atol=1e-5)
        classified = client.classify_bytes(encoded)
        for scores, probabilities in zip(classified, expected):
            assert list(scores) == CLASS_NAMES
            np.testing.assert_allclose([scores[name] for name in CLASS_NAMES], probabilities,
                                       atol=1e-5)


def test_metadata_and_status(served):
    _, stub, port = served
    request = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=model_pb2.ModelSpec(name="tiny"), metadata_field=["signature_def"])
    response = stub.GetModelMetadata(request)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_map)
    signatures = signature_map.signature_def
    assert {"serving_default", "predict_images", "classify"} <= set(signatures)
    assert list(signatures["serving_default"].inputs) == ["image_bytes"]
    assert set(signatures["serving_default"].outputs) == set(export.PREDICT_OUTPUTS)
    assert signatures["serving_default"].method_name == "tensorflow/serving/predict"

    with serving_client.PredictionClient(f"127.0.0.1:{port}", "tiny") as client:
        metadata = client.metadata()
        assert metadata["version"] == 1
        assert metadata["signatures"]["predict_images"]["inputs"] == {
            "images": ("DT_FLOAT", [-1, IMAGE_SIZE, IMAGE_SIZE, 3])}
        assert metadata["signatures"]["serving_default"]["outputs"]["top_k_classes"] == (
            "DT_STRING", [-1, 3])
        assert client.status() == [{"version": 1, "state": "AVAILABLE", "error": ""}]

    models = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    status = models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(
        model_spec=model_pb2.ModelSpec(name="tiny")))
    assert [(s.version, s.state) for s in status.model_version_status] == [
        (1, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]


def _bad_requests(encoded):
    images = np.zeros([1, IMAGE_SIZE, IMAGE_SIZE, 3], np.float32)
    jpeg = encoded[1]
    tf_example = classification_pb2.ClassificationRequest(
        model_spec=model_pb2.ModelSpec(name="tiny", signature_name="serving_default"))
    tf_example.input.example_list.examples.add()
    empty_classify = classification_pb2.ClassificationRequest(
        model_spec=model_pb2.ModelSpec(name="tiny", signature_name="classify"))
    return [
        ("wrong dtype", "Predict", predict_request({"images": images.astype(np.float64)},
                                                   "predict_images"),
         grpc.StatusCode.INVALID_ARGUMENT, "has dtype DT_DOUBLE; expected DT_FLOAT"),
        ("wrong input name", "Predict", predict_request({"pixels": images}, "predict_images"),
         grpc.StatusCode.INVALID_ARGUMENT, "missing: ['images'], unexpected: ['pixels']"),
        ("wrong shape", "Predict", predict_request({"images": np.zeros([1, 8, 8, 3], np.float32)},
                                                   "predict_images"),
         grpc.StatusCode.INVALID_ARGUMENT, "has shape [1, 8, 8, 3]; expected [-1, 16, 16, 3]"),
        ("not an image", "Predict",
         predict_request({"image_bytes": np.array([jpeg, b"hello world"], dtype=object)}),
         grpc.StatusCode.INVALID_ARGUMENT, "element 1: not a PNG, JPEG, GIF or BMP file"),
        ("truncated JPEG", "Predict",
         predict_request({"image_bytes": np.array([jpeg[: len(jpeg) // 2]], dtype=object)}),
         grpc.StatusCode.INVALID_ARGUMENT, "image_bytes[0]"),
        ("empty batch", "Predict",
         predict_request({"image_bytes": np.array([], dtype=object)}),
         grpc.StatusCode.INVALID_ARGUMENT, "is an empty batch"),
        ("batch over the limit", "Predict",
         predict_request({"image_bytes": np.array([jpeg] * (MAX_BATCH + 1), dtype=object)}),
         grpc.StatusCode.INVALID_ARGUMENT, f"batch of {MAX_BATCH + 1}, over this server's "
                                           f"--max_batch_size={MAX_BATCH}"),
        ("unknown signature", "Predict", predict_request({"images": images}, "predict_audio"),
         grpc.StatusCode.INVALID_ARGUMENT, "'predict_audio' not found"),
        ("unknown output", "Predict", predict_request({"images": images}, "predict_images",
                                                      output_filter=["embedding"]),
         grpc.StatusCode.INVALID_ARGUMENT, "output_filter names ['embedding']"),
        ("unknown model", "Predict", predict_request({"images": images}, "predict_images",
                                                     name="other"),
         grpc.StatusCode.NOT_FOUND, "model 'other' is not served here"),
        ("unknown version", "Predict", predict_request({"images": images}, "predict_images",
                                                       version=5),
         grpc.StatusCode.NOT_FOUND, "version 5 of model 'tiny' is not loaded"),
        ("classify on serving_default", "Classify", tf_example,
         grpc.StatusCode.INVALID_ARGUMENT, "cannot serve Classify"),
        ("empty classify", "Classify", empty_classify,
         grpc.StatusCode.INVALID_ARGUMENT, "Input is empty"),
        ("metadata without field", "GetModelMetadata",
         get_model_metadata_pb2.GetModelMetadataRequest(
             model_spec=model_pb2.ModelSpec(name="tiny")),
         grpc.StatusCode.INVALID_ARGUMENT, "at least one metadata_field"),
    ]


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(served, rng):
    model, stub, _ = served
    encoded = encoded_images(rng, 2)
    good = predict_request({"image_bytes": np.array(encoded, dtype=object)})
    expected = expected_probabilities(model, encoded)
    for what, method, request, code, message in _bad_requests(encoded):
        with pytest.raises(grpc.RpcError) as caught:
            getattr(stub, method)(request)
        assert caught.value.code() == code, (what, caught.value.details())
        assert message in caught.value.details(), (what, caught.value.details())
        response = stub.Predict(good)  # still serving, still right
        np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]), expected,
                                   atol=1e-5)


def test_model_status_errors_and_port_in_use(served):
    _, _, port = served
    with pytest.raises(OSError, match="is the port in use"):
        serving_server.start_server(os.path.dirname(os.path.abspath(__file__)), "tiny", port=port)
    models = model_service_pb2_grpc.ModelServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    for spec, code in ((model_pb2.ModelSpec(name="other"), grpc.StatusCode.NOT_FOUND),
                       (model_pb2.ModelSpec(name="tiny", version={"value": 9}),
                        grpc.StatusCode.NOT_FOUND)):
        with pytest.raises(grpc.RpcError) as caught:
            models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(model_spec=spec))
        assert caught.value.code() == code


def test_client_turns_grpc_errors_into_messages(served):
    _, _, port = served
    with serving_client.PredictionClient(f"127.0.0.1:{port}", "nope") as client:
        with pytest.raises(serving_client.ServingError, match="NOT_FOUND: .*'nope'") as caught:
            client.status()
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
    with serving_client.PredictionClient("127.0.0.1:1", "tiny", timeout=5) as client:
        with pytest.raises(serving_client.ServingError, match="UNAVAILABLE.*server running"):
            client.status()


@pytest.mark.slow
def test_many_concurrent_clients_get_correct_answers(served, rng):
    model, _, port = served
    encoded = encoded_images(rng, 16)
    expected = expected_probabilities(model, encoded)
    errors, checked = [], [0] * 16
    client = serving_client.PredictionClient(f"127.0.0.1:{port}", "tiny")

    def worker(i):
        for j in range(100):
            batch = [encoded[i], encoded[(i + j) % 16]]
            try:
                outputs = client.predict({"image_bytes": np.array(batch, dtype=object)},
                                         output_filter=["probabilities"])
                np.testing.assert_allclose(outputs["probabilities"],
                                           expected[[i, (i + j) % 16]], atol=1e-5)
                checked[i] += 1
            except Exception as err:  # collected: a thread's assertion must fail the test
                errors.append(f"thread {i} request {j}: {err}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    assert errors == []
    assert checked == [100] * 16


def _run_concurrently(fn, arguments):
    """fn(argument) in one thread each, started together; returns (results, errors) by index."""
    results, errors = {}, {}
    barrier = threading.Barrier(len(arguments))

    def worker(i):
        barrier.wait()
        try:
            results[i] = fn(arguments[i])
        except Exception as err:  # returned to the test, which checks it
            errors[i] = err

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(arguments))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


def test_batcher_merges_concurrent_calls_and_isolates_a_bad_request():
    calls = []

    def model(inputs):  # doubles its input; rejects negative rows, as a model rejects bad images
        x = inputs["x"]
        calls.append(len(x))
        time.sleep(0.05)  # long enough for the other threads to queue behind the first call
        if (x < 0).any():
            raise serving_server.RequestError(grpc.StatusCode.INVALID_ARGUMENT, "negative row")
        return {"y": 2 * x, "rows": np.full([len(x)], len(x))}

    batcher = serving_server.Batcher(model, serving_server.BatchingOptions(max_batch_size=5,
                                                                          num_batch_threads=1))
    inputs = [np.full([1 + i % 2, 3], float(i + 1), np.float32) for i in range(8)]
    inputs[5] = -inputs[5]
    results, errors = _run_concurrently(lambda x: batcher.run({"x": x}), inputs)
    assert sorted(errors) == [5]
    assert isinstance(errors[5], serving_server.RequestError) and "negative" in errors[5].message
    for i, result in results.items():
        np.testing.assert_array_equal(result["y"], 2 * inputs[i])
    assert max(calls) > 1, calls  # some calls were merged ...
    assert max(calls) <= 5, calls  # ... never over max_batch_size rows


def test_batcher_timeout_waits_for_a_fuller_batch():
    calls = []

    def model(inputs):
        calls.append(len(inputs["x"]))
        return {"y": inputs["x"] + 1}

    batcher = serving_server.Batcher(model, serving_server.BatchingOptions(
        max_batch_size=2, num_batch_threads=1, batch_timeout_micros=5_000_000))

    def late_run(x):
        time.sleep(0.05 * x[0])  # the second request arrives 50 ms after the first
        return batcher.run({"x": x})

    results, errors = _run_concurrently(late_run, [np.array([0]), np.array([1])])
    assert errors == {}
    assert [results[0]["y"].tolist(), results[1]["y"].tolist()] == [[1], [2]]
    assert calls == [2]  # one call: the first request waited, the full batch went at once


@pytest.mark.slow
def test_new_version_is_picked_up_without_failing_requests(tmp_path, rng):
    base = tmp_path / "exports"
    old_model, new_model = tiny_image_model(seed=0), tiny_image_model(seed=1)
    export.export_model(old_model, str(base), "tiny", class_names=CLASS_NAMES,
                        input_mode="image", image_size=IMAGE_SIZE)
    server, port = serving_server.start_server(str(base / "tiny"), "tiny", poll_seconds=0.1)
    encoded = encoded_images(rng, 2)
    expected = {1: expected_probabilities(old_model, encoded),
                2: expected_probabilities(new_model, encoded)}
    assert not np.allclose(expected[1], expected[2], atol=1e-3)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{port}"))
    request = predict_request({"image_bytes": np.array(encoded, dtype=object)})
    stop, errors, versions_seen = threading.Event(), [], []

    def worker():
        while not stop.is_set():
            try:
                response = stub.Predict(request, timeout=30)
                version = response.model_spec.version.value
                np.testing.assert_allclose(tf.make_ndarray(response.outputs["probabilities"]),
                                           expected[version], atol=1e-5)
                versions_seen.append(version)
            except Exception as err:
                errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        # Deploy as serving/README.md says: copy beside the base path, then rename into place.
        staged = export.export_model(new_model, str(tmp_path / "staging"), "tiny",
                                     class_names=CLASS_NAMES, input_mode="image",
                                     image_size=IMAGE_SIZE)
        shutil.copytree(staged, base / "tiny" / ".copying-2")
        os.rename(base / "tiny" / ".copying-2", base / "tiny" / "2")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and versions_seen[-20:].count(2) < 20:
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    try:
        assert errors == []
        assert versions_seen[0] == 1 and versions_seen[-20:] == [2] * 20
        # Version 1 stays loaded (--num_versions=2) and can still be asked for by number.
        old = stub.Predict(predict_request({"image_bytes": np.array(encoded, dtype=object)},
                                           version=1))
        np.testing.assert_allclose(tf.make_ndarray(old.outputs["probabilities"]), expected[1],
                                   atol=1e-5)
        # A broken version does not replace a working one; its status says why.
        os.makedirs(base / "tiny" / "3")
        (base / "tiny" / "3" / "saved_model.pb").write_bytes(b"not a SavedModel")
        server.manager.refresh()
        assert stub.Predict(request).model_spec.version.value == 2
        models = model_service_pb2_grpc.ModelServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{port}"))
        response = models.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(
            model_spec=model_pb2.ModelSpec(name="tiny")))
        status = {entry.version: entry for entry in response.model_version_status}
        assert status[2].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
        assert status[3].state == get_model_status_pb2.ModelVersionStatus.END
        assert status[3].status.error_message
    finally:
        server.stop(5)


def test_graceful_stop_finishes_requests_in_flight(tmp_path, rng):
    export.export_model(tiny_features_model(), str(tmp_path), "feat", class_names=CLASS_NAMES,
                        input_mode="features", feature_dim=FEATURE_DIM)
    server, port = serving_server.start_server(str(tmp_path / "feat"), "feat", max_message_mb=1)
    servable = server.manager.resolve(model_pb2.ModelSpec(name="feat"))
    fast = servable.signatures["predict_features"]
    started = threading.Event()

    def slow_signature(**inputs):  # keeps one request in flight while the server stops
        started.set()
        time.sleep(1.0)
        return fast(**inputs)

    features = rng.normal(size=[2, FEATURE_DIM]).astype(np.float32)
    client = serving_client.PredictionClient(f"127.0.0.1:{port}", "feat")
    with pytest.raises(serving_client.ServingError, match="RESOURCE_EXHAUSTED"):
        client.predict_features(np.zeros([64, 8192], np.float32))  # 2 MiB > --max_message_mb=1
    expected = client.predict_features(features, top_k=2)
    servable.signatures["predict_features"] = slow_signature
    result = {}
    request_thread = threading.Thread(
        target=lambda: result.setdefault("answer", client.predict_features(features, top_k=2)))
    request_thread.start()
    assert started.wait(30)
    server.stop(10)
    request_thread.join()
    assert result["answer"] == expected
    with pytest.raises(serving_client.ServingError, match="UNAVAILABLE"):
        client.predict_features(features)
    client.close()


@pytest.mark.slow
def test_cli_server_and_client_then_sigterm(tmp_path, rng, capsys):
    """The server CLI in a subprocess; the client CLI in-process; SIGTERM exits 0."""
    model = tiny_image_model()
    export.export_model(model, str(tmp_path), "tiny", class_names=CLASS_NAMES,
                        input_mode="image", image_size=IMAGE_SIZE, top_k=3)
    command = [sys.executable, "-m", "serving.server", f"--model_base_path={tmp_path / 'tiny'}",
               "--model_name=tiny", "--port=0", "--rest_api_port=0"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        match = re.search(r"serving model 'tiny' versions \[1\] on 127\.0\.0\.1:(\d+)", line)
        assert match, (line, process.stderr.read() if process.poll() is not None else "")
        server = f"127.0.0.1:{match.group(1)}"
        paths = []
        for i, encoded in enumerate(encoded_images(rng, 2)):
            paths.append(str(tmp_path / f"image{i}.png"))
            with open(paths[-1], "wb") as f:
                f.write(encoded)
        expected = expected_probabilities(model, [open(p, "rb").read() for p in paths])

        assert serving_client.main(["--server", server, "--model_name=tiny", "--top_k=2",
                                    "--json", *paths]) == 0
        answers = json.loads(capsys.readouterr().out)
        assert [a["image"] for a in answers] == paths
        for answer, probabilities in zip(answers, expected):
            best = np.argsort(-probabilities, kind="stable")[:2]
            assert [p["class"] for p in answer["predictions"]] == [CLASS_NAMES[i] for i in best]
            np.testing.assert_allclose([p["score"] for p in answer["predictions"]],
                                       probabilities[best], atol=1e-5)

        assert serving_client.main(["--server", server, "--model_name=tiny",
                                    "--signature=predict_images", "--top_k=1", paths[0]]) == 0
        table = capsys.readouterr().out.splitlines()
        best = int(np.argmax(expected[0]))
        assert table[0] == paths[0]
        assert re.fullmatch(rf"\s+1\. {CLASS_NAMES[best]}\s+{expected[0][best]:.4f}", table[1])

        assert serving_client.main(["--server", server, "--model_name=other", paths[0]]) == 1
        assert "NOT_FOUND" in capsys.readouterr().err

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "stopped" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def _batching_parameters_class():
    """TF Serving's BatchingParameters message (session_bundle_config.proto, fields 1-7), built
    here because tensorflow-serving-api does not ship that proto."""
    from google.protobuf import (descriptor_pb2, descriptor_pool, message_factory,
                                 wrappers_pb2)

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    proto = descriptor_pb2.FileDescriptorProto(name="batching_parameters_test.proto",
                                               package="test", syntax="proto3",
                                               dependency=["google/protobuf/wrappers.proto"])
    message = proto.message_type.add(name="BatchingParameters")
    field = descriptor_pb2.FieldDescriptorProto
    for number, name in enumerate(["max_batch_size", "batch_timeout_micros",
                                   "max_enqueued_batches", "num_batch_threads"], start=1):
        message.field.add(name=name, number=number, type=field.TYPE_MESSAGE,
                          type_name=".google.protobuf.Int64Value", label=field.LABEL_OPTIONAL)
    message.field.add(name="thread_pool_name", number=5, type=field.TYPE_MESSAGE,
                      type_name=".google.protobuf.StringValue", label=field.LABEL_OPTIONAL)
    message.field.add(name="allowed_batch_sizes", number=6, type=field.TYPE_INT64,
                      label=field.LABEL_REPEATED)
    message.field.add(name="pad_variable_length_inputs", number=7, type=field.TYPE_BOOL,
                      label=field.LABEL_OPTIONAL)
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("test.BatchingParameters"))


def test_tf_serving_config_files_parse_and_match_the_local_server():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    with open(os.path.join(ROOT, "serving", "models.config")) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    [model] = config.model_config_list.config
    assert model.model_platform == "tensorflow"
    assert model.base_path == f"/models/{model.name}"  # the export base is mounted at /models
    defaults = inspect.signature(serving_server.start_server).parameters
    assert model.model_version_policy.latest.num_versions == defaults["num_versions"].default

    with open(os.path.join(ROOT, "serving", "batching_parameters.txt")) as f:
        batching = text_format.Parse(f.read(), _batching_parameters_class()())
    assert batching.max_batch_size.value == defaults["max_batch_size"].default
    assert batching.batch_timeout_micros.value == defaults["batch_timeout_micros"].default
    assert batching.num_batch_threads.value == defaults["num_batch_threads"].default


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
    np.arange(-3, 3, dtype=np.int32),
    np.array([[1, 2**40]], dtype=np.int64),
    np.linspace(0, 1, 5),  # float64
    np.array([True, False]),
    np.array([b"\xff\xd8 jpeg", b"", "caf\u00e9"], dtype=object),
    np.array([["a", "bc"]]),  # fixed-width unicode
    np.zeros([0, 3], np.float32),
    np.array([], dtype=object),
    np.float32(2.5),  # scalar
    np.array([1, 2], dtype=np.uint8),  # not on the fast path: TensorFlow's converter
])
def test_tensor_proto_conversion_matches_tensorflow(array):
    from serving import tensors

    proto = tensors.to_tensor_proto(array)
    reference = tf.make_tensor_proto(array)
    assert proto.dtype == reference.dtype
    assert proto.tensor_shape == reference.tensor_shape
    np.testing.assert_array_equal(tf.make_ndarray(proto), tf.make_ndarray(reference))
    back = tensors.to_ndarray(reference)
    expected = tf.make_ndarray(reference)
    assert back.dtype == expected.dtype and back.shape == expected.shape
    np.testing.assert_array_equal(back, expected)
    # TF Serving may send numbers as value lists instead of tensor_content.
    if reference.dtype == tf.float32.as_datatype_enum and reference.tensor_content:
        listed = tf.make_tensor_proto(array)
        listed.ClearField("tensor_content")
        listed.float_val.extend(np.asarray(array).reshape(-1).tolist())
        np.testing.assert_array_equal(tensors.to_ndarray(listed), expected)


def test_string_tensor_proto_matches_the_numpy_path():
    from tensorflow.core.framework import tensor_pb2

    from serving import tensors

    values = [b"\xff\xd8 jpeg", b"", b"trailing\x00"]
    for batch in (values, values[:1], []):
        direct = tensors.string_tensor_proto(batch, tensor_pb2.TensorProto())
        assert direct == tensors.to_tensor_proto(np.array(batch, dtype=object).reshape(-1))
        assert tensors.to_ndarray(direct).tolist() == batch

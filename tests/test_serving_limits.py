"""Hostile requests to serving/server.py: compact TensorProtos with huge shapes, image
decompression bombs, non-finite arrays. Each is refused with INVALID_ARGUMENT before anything big
is built, and the server's peak memory stays bounded."""

import os
import re

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (classification_pb2, model_pb2, predict_pb2,
                                     prediction_service_pb2_grpc)

from image_bombs import gif_frames, png_bomb
from imcl_tf import data, export
from serving import server as serving_server
from serving import tensors
from test_export import CLASS_NAMES, IMAGE_SIZE, encoded_images, tiny_image_model
from test_serving import predict_request

MAX_BATCH = 8


def compact_float_proto(dims, value=1.0):
    """A TensorProto of one float and a shape: a few bytes that tf.make_ndarray would expand."""
    proto = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[value])
    for size in dims:
        proto.tensor_shape.dim.add(size=size)
    return proto


def peak_rss_growth_mb(action):
    """MB the process's peak RSS rises above its current RSS while `action` runs (Linux)."""
    def status(field):
        with open("/proc/self/status") as f:
            return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1)) / 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = status("VmRSS")
    action()
    return status("VmHWM") - before


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("exports"))
    export.export_model(tiny_image_model(), base, "tiny", class_names=CLASS_NAMES,
                        input_mode="image", image_size=IMAGE_SIZE, top_k=3)
    server, port = serving_server.start_server(os.path.join(base, "tiny"), "tiny",
                                               max_batch_size=MAX_BATCH)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield server, prediction_service_pb2_grpc.PredictionServiceStub(channel), base
    channel.close()
    server.stop(5)


def call_error(stub_method, request):
    with pytest.raises(grpc.RpcError) as caught:
        stub_method(request, timeout=60)
    return caught.value.code(), caught.value.details()


def test_compact_tensor_protos_are_refused_from_their_shape(served):
    _, stub, _ = served
    cases = [
        # The request: 62 bytes claiming 60000 images; here with the model's own size.
        ([60000, IMAGE_SIZE, IMAGE_SIZE, 3], "has a batch of 60000, over this server's "
                                             f"--max_batch_size={MAX_BATCH}"),
        ([60000, 64, 64, 3], f"has shape [60000, 64, 64, 3]; expected [-1, {IMAGE_SIZE}, "
                             f"{IMAGE_SIZE}, 3]"),
        ([2, IMAGE_SIZE, -5, 3], "every dimension must be >= 0"),
        ([0, IMAGE_SIZE, IMAGE_SIZE, 3], "is an empty batch"),
    ]
    for dims, message in cases:
        request = predict_pb2.PredictRequest(
            model_spec=model_pb2.ModelSpec(name="tiny", signature_name="predict_images"))
        request.inputs["images"].CopyFrom(compact_float_proto(dims))
        assert request.ByteSize() < 100
        grown = peak_rss_growth_mb(lambda: cases.append(call_error(stub.Predict, request)))
        code, details = cases.pop()
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert message in details, details
        # Expanding [60000, 16, 16, 3] float32 would take 184 MB.
        assert grown < 60, (dims, grown)
    # A compact proto within the limits is expanded as TensorFlow does and served.
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name="tiny", signature_name="predict_images"))
    request.inputs["images"].CopyFrom(compact_float_proto([2, IMAGE_SIZE, IMAGE_SIZE, 3], 7.0))
    probabilities = tf.make_ndarray(stub.Predict(request).outputs["probabilities"])
    assert probabilities.shape == (2, len(CLASS_NAMES))
    np.testing.assert_allclose(probabilities[0], probabilities[1])


def test_the_element_limit_is_checked_before_any_array_is_built(served, monkeypatch):
    server, _, _ = served
    servable = server.manager.resolve(model_pb2.ModelSpec(name="tiny"))

    def must_not_run(proto):
        raise AssertionError("an array was built before the limits were checked")

    monkeypatch.setattr(tensors, "to_ndarray", must_not_run)
    monkeypatch.setattr(tf, "make_ndarray", must_not_run)
    limits = serving_server.Limits(max_batch_size=10**9, max_request_elements=10**6,
                                   max_message_bytes=4 * 10**6)
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name="tiny", signature_name="predict_images"))
    request.inputs["images"].CopyFrom(compact_float_proto([10**7, IMAGE_SIZE, IMAGE_SIZE, 3]))
    with pytest.raises(serving_server.RequestError) as caught:
        serving_server.predict(servable, request, "tiny", limits)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert ("have 7,680,000,000 elements (images: [10000000, 16, 16, 3]), over this server's "
            "limit of 1,000,000 per request") in caught.value.message
    assert "--max_message_mb" in caught.value.message


def test_image_bombs_are_refused_from_their_headers_and_memory_stays_bounded(served, rng):
    _, stub, _ = served
    bomb = png_bomb(20000, 20000)  # 48 KB, 1.2 GB once decoded
    good = encoded_images(rng, 1)[0]
    for images, message in [
            ([good, bomb], "element 1: PNG image of 20000 x 20000 pixels (400,000,000 pixels) "
                           "is over the limit of 50,000,000 pixels (--max_image_pixels=50000000)"),
            ([bomb] * 4, "element 0: PNG image of 20000 x 20000"),
            ([gif_frames(4000, 4000, 8)], "element 0: GIF image of 4000 x 4000 pixels x 8 "
                                          "frames"),
            ([good[:1]], "element 0: not a PNG, JPEG, GIF or BMP file"),
            ([b"\x89PNG\r\n\x1a\n\x00\x00"], "element 0: truncated PNG file (10 bytes)")]:
        request = predict_request({"image_bytes": np.array(images, dtype=object)})
        grown = peak_rss_growth_mb(lambda: images.append(call_error(stub.Predict, request)))
        code, details = images.pop()
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert message in details, details
        assert grown < 60, (message, grown)

    example = tf.train.Example()
    example.features.feature[data.IMAGE_ENCODED_KEY].bytes_list.value.append(bomb)
    classify = classification_pb2.ClassificationRequest(
        model_spec=model_pb2.ModelSpec(name="tiny", signature_name="classify"))
    classify.input.example_list.examples.add().CopyFrom(example)
    code, details = call_error(stub.Classify, classify)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert ("input.example_list.examples[0] feature 'image/encoded' value 0: PNG image of "
            "20000 x 20000") in details


def test_the_exported_signature_guards_itself_when_the_server_limit_is_higher(served, rng):
    """What TF Serving users get: the SavedModel refuses the bomb before decoding it."""
    _, _, base = served
    server, port = serving_server.start_server(os.path.join(base, "tiny"), "tiny",
                                               max_image_pixels=10**12)
    try:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{port}"))
        request = predict_request({"image_bytes": np.array(
            [encoded_images(rng, 1)[0], png_bomb(20000, 20000)], dtype=object)})
        errors = []
        grown = peak_rss_growth_mb(lambda: errors.append(call_error(stub.Predict, request)))
        code, details = errors[0]
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert ("image_bytes[1]: image of 20000 x 20000 pixels (400000000 pixels) is over the "
                "limit of 50,000,000 pixels (--max_image_pixels=50000000)") in details, details
        assert grown < 100, grown
    finally:
        server.stop(5)


def test_non_finite_images_are_refused(served):
    _, stub, _ = served
    images = np.full([2, IMAGE_SIZE, IMAGE_SIZE, 3], 100.0, np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        images[1, 3, 4, 2] = bad
        code, details = call_error(stub.Predict, predict_request({"images": images},
                                                                 "predict_images"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert "input 'images' has NaN or infinite values" in details, details
    images[1, 3, 4, 2] = 5.0
    response = stub.Predict(predict_request({"images": images}, "predict_images"))
    assert np.isfinite(tf.make_ndarray(response.outputs["probabilities"])).all()

"""Version churn faults for serving/server.py: a half-copied version completed
later, versions that fail the sanity checks, and a base path that vanishes for a poll.

The poller is slowed down (poll_seconds=1000) and `manager.refresh()` is called by the tests, so
every poll happens exactly when the test says.
"""

import os
import shutil
import threading
import time

import grpc
import numpy as np
import pytest
from tensorflow_serving.apis import prediction_service_pb2_grpc

from imcl_tf import export
from serving import server as serving_server
from test_export import (CLASS_NAMES, FEATURE_DIM, IMAGE_SIZE, encoded_images,
                         tiny_features_model, tiny_image_model)
from test_serving import predict_request


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """Version folders built once: two image models and a features model."""
    base = str(tmp_path_factory.mktemp("staging"))
    dirs = {}
    for name, model, kwargs in [
            ("image0", tiny_image_model(seed=0), dict(input_mode="image", image_size=IMAGE_SIZE)),
            ("image1", tiny_image_model(seed=1), dict(input_mode="image", image_size=IMAGE_SIZE)),
            ("features", tiny_features_model(), dict(input_mode="features",
                                                     feature_dim=FEATURE_DIM))]:
        dirs[name] = export.export_model(model, base, name, class_names=CLASS_NAMES, **kwargs)
    return dirs


def start(tmp_path, staged, **kwargs):
    base = tmp_path / "tiny"
    base.mkdir()
    shutil.copytree(staged["image0"], base / "1")
    server, port = serving_server.start_server(str(base), "tiny", poll_seconds=1000, **kwargs)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{port}"))
    return server, stub, base


def served_version(stub, rng):
    request = predict_request({"image_bytes": np.array(encoded_images(rng, 1), dtype=object)})
    return stub.Predict(request, timeout=60).model_spec.version.value


def test_a_half_copied_version_is_loaded_once_its_copy_completes(tmp_path, staged, rng):
    server, stub, base = start(tmp_path, staged)
    try:
        # The copy has written saved_model.pb and created variables/, nothing inside it yet.
        (base / "2" / "variables").mkdir(parents=True)
        shutil.copy(os.path.join(staged["image1"], "saved_model.pb"), base / "2")
        for _ in range(serving_server.QUICK_LOAD_ATTEMPTS + 3):  # past the quick attempts
            server.manager.refresh()
        state = server.manager.version_statuses()[2]
        assert state.error_code != 0 and state.attempts >= serving_server.QUICK_LOAD_ATTEMPTS
        assert served_version(stub, rng) == 1
        top_mtime = os.stat(base / "2").st_mtime_ns
        # The copy completes: files inside variables/ and new folders, then the top folder's mtime
        # is set back, so only a look inside can notice the change.
        for entry in os.listdir(staged["image1"]):
            source = os.path.join(staged["image1"], entry)
            if entry == "variables":
                for name in os.listdir(source):
                    shutil.copy(os.path.join(source, name), base / "2" / "variables")
            elif os.path.isdir(source):
                shutil.copytree(source, base / "2" / entry)
        os.utime(base / "2", ns=(top_mtime, top_mtime))
        server.manager.refresh()
        assert server.manager.loaded_versions() == [1, 2]
        assert served_version(stub, rng) == 2
    finally:
        server.stop(5)


def test_a_failed_load_is_retried_with_a_delay_not_abandoned(tmp_path, staged, monkeypatch):
    server, _, base = start(tmp_path, staged)
    try:
        (base / "2").mkdir()
        (base / "2" / "saved_model.pb").write_bytes(b"half a file")
        clock = [1000.0]
        monkeypatch.setattr(serving_server.time, "monotonic", lambda: clock[0])
        attempts = []
        for _ in range(12):
            server.manager.refresh()
            attempts.append(server.manager.version_statuses()[2].attempts)
            clock[0] += 1.0  # one poll a second, nothing changes on disk
        quick = serving_server.QUICK_LOAD_ATTEMPTS
        assert attempts[:quick] == list(range(1, quick + 1))  # every poll at first ...
        assert attempts[-1] < 12 and attempts[-1] > quick  # ... then less often, but still
        clock[0] += serving_server.MAX_RETRY_SECONDS
        server.manager.refresh()
        assert server.manager.version_statuses()[2].attempts == attempts[-1] + 1
    finally:
        server.stop(5)


def test_versions_failing_the_sanity_checks_are_not_swapped_in(tmp_path, staged, rng):
    server, stub, base = start(tmp_path, staged)
    try:
        # Version 2: its class-name asset lists 3 names for 4 output columns.
        staging = tmp_path / ".copy-2"
        shutil.copytree(staged["image1"], staging)
        names = staging / "assets" / export.CLASS_NAMES_ASSET
        names.write_text("".join(f"{name}\n" for name in CLASS_NAMES[:3]))
        os.rename(staging, base / "2")
        server.manager.refresh()
        assert server.manager.loaded_versions() == [1]
        assert served_version(stub, rng) == 1
        state = server.manager.version_statuses()[2]
        assert "4 columns but class_names.txt lists 3 class names" in state.error_message
        for _ in range(3):  # the same files are not loaded again and again
            server.manager.refresh()
        assert server.manager.version_statuses()[2].attempts == 1
        # Fixed in place: the change earns a new attempt, which passes.
        (base / "2" / "assets" / export.CLASS_NAMES_ASSET).write_text(
            "".join(f"{name}\n" for name in CLASS_NAMES))
        server.manager.refresh()
        assert server.manager.loaded_versions() == [1, 2]
        assert served_version(stub, rng) == 2

        # Version 3 lacks predict_images, which version 2 (serving now) has.
        shutil.copytree(staged["features"], base / "3")
        server.manager.refresh()
        assert server.manager.loaded_versions() == [1, 2]
        assert served_version(stub, rng) == 2
        message = server.manager.version_statuses()[3].error_message
        assert "lacks signatures ['predict_images'] that version 2 (serving now) has" in message
    finally:
        server.stop(5)


def test_a_vanished_base_path_keeps_the_loaded_versions_serving(tmp_path, staged, rng, caplog):
    server, stub, base = start(tmp_path, staged)
    try:
        away = tmp_path / "away"
        os.rename(base, away)  # a redeploy by mv: the base path is gone for a poll
        with caplog.at_level("WARNING", logger="serving.server"):
            server.manager.refresh()
        assert "is missing; keeping versions [1] of tiny serving" in caplog.text
        assert served_version(stub, rng) == 1
        base.mkdir()  # back, but empty for a poll
        server.manager.refresh()
        assert served_version(stub, rng) == 1
        base.rmdir()
        os.rename(away, base)
        server.manager.refresh()
        assert server.manager.loaded_versions() == [1]

        # A new base path whose only version is broken does not unload the working one either.
        replacement = tmp_path / "replacement"
        (replacement / "5").mkdir(parents=True)
        (replacement / "5" / "saved_model.pb").write_bytes(b"broken")
        shutil.rmtree(base)
        os.rename(replacement, base)
        server.manager.refresh()
        assert server.manager.loaded_versions() == [1]
        assert served_version(stub, rng) == 1
        # Once a new version loads, the removed one goes.
        shutil.copytree(staged["image1"], base / "6")
        server.manager.refresh()
        assert server.manager.loaded_versions() == [6]
    finally:
        server.stop(5)


@pytest.mark.slow
def test_requests_during_a_base_path_move_all_succeed(tmp_path, staged, rng):
    """The issue's reproduction: the poller runs every 50 ms while the base path is moved away
    and back; no request may fail (it was 300 of 834 NOT_FOUND)."""
    base = tmp_path / "tiny"
    base.mkdir()
    shutil.copytree(staged["image0"], base / "1")
    server, port = serving_server.start_server(str(base), "tiny", poll_seconds=0.05)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{port}"))
    request = predict_request({"image_bytes": np.array(encoded_images(rng, 1), dtype=object)})
    stop, errors, done = threading.Event(), [], [0]

    def worker():
        while not stop.is_set():
            try:
                stub.Predict(request, timeout=60)
                done[0] += 1
            except grpc.RpcError as err:
                errors.append(err.code())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        for _ in range(5):
            os.rename(base, tmp_path / "away")
            time.sleep(0.3)  # several polls without a base path
            os.rename(tmp_path / "away", base)
            time.sleep(0.1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        server.stop(5)
    assert errors == [] and done[0] > 0

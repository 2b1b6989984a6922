"""Training under faults (issue 13): one training per run folder, divergence, exact resume inside
an evaluation interval, --deterministic runs, moved run folders, interrupted exports.

Every run is tiny (16x16 images, a few steps of the small CNN).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from imcl_tf.training import run_files
from imcl_tf.training.config import TrainConfig
from imcl_tf.training.run_files import RUN_LOCK, RunError, hold_run_lock
from imcl_tf.training.trainer import run
from test_train_common import REPO_ROOT, write_dataset

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO_ROOT}

HOLDER = '''
import fcntl, os, sys, time
f = open(os.path.join(sys.argv[1], "run.lock"), "a+")
fcntl.flock(f, fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(f"pid {os.getpid()} on testhost"); f.flush()
print("locked", flush=True)
time.sleep(120)
'''


def hold_from_another_process(model_dir):
    os.makedirs(model_dir, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, model_dir], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_training_on_the_same_folder_stops_at_once(tmp_path):
    data_dir = write_dataset(str(tmp_path / "data"), num_train=8, num_val=4, num_shards=1)
    model_dir = str(tmp_path / "run")
    holder = hold_from_another_process(model_dir)
    try:
        config = TrainConfig(data_dir=data_dir, model_dir=model_dir, method="logistic",
                             train_steps=2, batch_size=4, verbose=0)
        with pytest.raises(RunError, match=rf"--model_dir='{model_dir}' is in use by another "
                                           rf"training \(pid {holder.pid} on testhost\)"):
            run(config)
        assert sorted(os.listdir(model_dir)) == [RUN_LOCK]  # nothing of the second run
        result = subprocess.run(
            [sys.executable, "-m", "imcl_tf.train", f"--data_dir={data_dir}",
             f"--model_dir={model_dir}", "--method=logistic", "--train_steps=2",
             "--batch_size=4", "--verbose=0"], cwd=REPO_ROOT, env=ENV, capture_output=True,
            text=True)
        assert result.returncode == 1
        assert "is in use by another training" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        holder.kill()
        holder.wait()
    with hold_run_lock(model_dir):  # released with its process: a restart goes ahead
        with hold_run_lock(model_dir):  # and a two-stage run re-enters its own folder
            assert os.path.realpath(model_dir) in run_files._held_locks
    assert not run_files._held_locks


# ---- divergence ---------------------------------------------------------------------------------


def test_divergence_rule():
    from imcl_tf.training.divergence import diverged
    assert diverged(float("nan"), None) and diverged(float("inf"), 0.7)
    assert not diverged(5e4, None)  # no reference yet: only non-finite losses count
    assert not diverged(999.0, 0.7) and diverged(1001.0, 0.7)  # the floor of 1
    assert not diverged(2.9e3, 3.0) and diverged(3.1e3, 3.0)


@pytest.mark.slow
def test_a_learning_rate_of_1e6_stops_with_status_1_and_exports_nothing(tmp_path):
    from imcl_tf.training.run_files import SUMMARY_JSON, read_json
    data_dir = write_dataset(str(tmp_path / "data"), num_train=16, num_val=8, num_shards=1)
    model_dir, export_dir = str(tmp_path / "run"), str(tmp_path / "exports")
    result = subprocess.run(
        [sys.executable, "-m", "imcl_tf.train", f"--data_dir={data_dir}",
         f"--model_dir={model_dir}", "--method=logistic", "--train_steps=40", "--eval_every=20",
         "--checkpoint_every=2", "--batch_size=4", "--learning_rate=1e6", "--verbose=0",
         f"--export_dir={export_dir}", "--export_model_name=tiny"],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "imcl_tf.train: error: training diverged at step" in result.stderr
    assert "--learning_rate=1e+06" in result.stderr and "--export_diverged" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(export_dir)
    summary = read_json(os.path.join(model_dir, SUMMARY_JSON))
    diverged = summary["diverged"]
    assert diverged["step"] < 20 and diverged["loss"] > 1e3 * max(diverged["reference_loss"], 1)
    # No checkpoint of the diverged step was written.
    import tensorflow as tf
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, "checkpoints"))
    assert latest is None or int(latest.rsplit("-", 1)[1]) < diverged["step"]


def test_export_diverged_forces_the_export(tmp_path):
    from imcl_tf import export
    data_dir = write_dataset(str(tmp_path / "data"), num_train=16, num_val=8, num_shards=1)
    export_dir = str(tmp_path / "exports")
    config = TrainConfig(data_dir=data_dir, model_dir=str(tmp_path / "run"), method="logistic",
                         train_steps=30, eval_every=30, batch_size=4, learning_rate=1e6,
                         verbose=0, export_dir=export_dir, export_model_name="tiny",
                         export_diverged=True)
    summary = run(config)
    assert summary["diverged"]["step"] < 30
    assert "training diverged" in summary["diverged"]["message"]
    assert export.list_versions(os.path.join(export_dir, "tiny")) == [1]


# ---- --deterministic, and resuming inside an evaluation interval --------------------------------


@pytest.fixture
def op_determinism_restored():
    from tensorflow.python.framework import config as tf_config
    was = tf_config.is_op_determinism_enabled()
    yield
    if not was:
        tf_config.disable_op_determinism()  # --deterministic stays on for the process otherwise


def checkpoint_values(model_dir, step):
    import tensorflow as tf
    reader = tf.train.load_checkpoint(os.path.join(model_dir, "checkpoints", f"ckpt-{step}"))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map()
            if key.startswith(("model/", "optimizer/")) and "save_counter" not in key}


class Killed(Exception):
    """What the fault injection raises in place of a SIGKILL: only the checkpoints survive."""


@pytest.mark.slow
def test_deterministic_runs_are_identical_and_a_resume_mid_interval_is_the_same_run(
        tmp_path, monkeypatch, op_determinism_restored):
    from imcl_tf.training.callbacks import TrainingMonitor
    data_dir = write_dataset(str(tmp_path / "data"), num_train=24, num_val=8, num_shards=3)
    options = dict(data_dir=data_dir, method="imcl", train_steps=12, eval_every=8,
                   checkpoint_every=2, batch_size=4, dictionary_per_class=2,
                   calibration_batches=1, refresh_every=3, augment=True, seed=3, verbose=0,
                   deterministic=True)
    first, second, resumed = (str(tmp_path / name) for name in ("first", "second", "resumed"))
    run(TrainConfig(model_dir=first, **options))
    run(TrainConfig(model_dir=second, **options))
    reference = checkpoint_values(first, 12)
    assert len(reference) > 20
    for key, value in checkpoint_values(second, 12).items():
        np.testing.assert_array_equal(value, reference[key], key)  # same seed, same run

    # Killed at step 5, inside the first interval (0-8): the newest checkpoint is step 4.
    original = TrainingMonitor.on_train_batch_end

    def dying(self, batch, logs=None):
        original(self, batch, logs)
        if int(self.model.optimizer.iterations.numpy()) == 5:
            raise Killed()
    monkeypatch.setattr(TrainingMonitor, "on_train_batch_end", dying)
    with pytest.raises(Killed):
        run(TrainConfig(model_dir=resumed, **options))
    monkeypatch.setattr(TrainingMonitor, "on_train_batch_end", original)
    import tensorflow as tf
    assert tf.train.latest_checkpoint(os.path.join(resumed, "checkpoints")).endswith("ckpt-4")
    summary = run(TrainConfig(model_dir=resumed, **options))
    assert summary["start_step"] == 4
    compared = 0
    for key, value in checkpoint_values(resumed, 12).items():
        np.testing.assert_array_equal(value, reference[key], key)
        compared += 1
    assert compared == len(reference)


# ---- moved run folders, interrupted exports, options checked before training --------------------


def test_a_moved_run_folder_resumes(tmp_path, monkeypatch):
    import shutil
    data_dir = write_dataset(str(tmp_path / "data"), num_train=8, num_val=4, num_shards=1)
    graph = tmp_path / "graph.npy"
    np.save(graph, np.eye(5, dtype=np.float32))
    options = dict(data_dir=data_dir, method="logistic", eval_every=2, batch_size=4, verbose=0)
    old = str(tmp_path / "old" / "run")
    run(TrainConfig(model_dir=old, train_steps=2, label_graph=str(graph), **options))
    new = str(tmp_path / "new")
    shutil.move(old, new)
    monkeypatch.chdir(tmp_path)  # the same graph file by a relative path
    summary = run(TrainConfig(model_dir=new, train_steps=4, label_graph="graph.npy", **options))
    assert (summary["start_step"], summary["steps_this_run"]) == (2, 2)
    with pytest.raises(ValueError, match="--label_graph"):  # another file is another run
        np.save(tmp_path / "other.npy", np.eye(5, dtype=np.float32))
        run(TrainConfig(model_dir=new, train_steps=6, label_graph="other.npy", **options))


def test_options_that_would_fail_late_are_refused_before_training(tmp_path):
    data_dir = write_dataset(str(tmp_path / "data"), num_train=8, num_val=4, num_shards=1)
    config = TrainConfig(data_dir=data_dir, model_dir=str(tmp_path / "run"), verbose=0,
                         export_dir=str(tmp_path / "exports"), export_model_name="../evil")
    with pytest.raises(ValueError, match="--export_model_name: must be a folder name"):
        config.validate()
    import json
    path = os.path.join(data_dir, "dataset.json")
    with open(path) as f:
        obj = json.load(f)
    obj["splits"]["val"]["num_examples"] = 0
    obj["splits"]["val"]["shard_sizes"] = [0]
    with open(path, "w") as f:
        json.dump(obj, f)
    config = TrainConfig(data_dir=data_dir, model_dir=str(tmp_path / "run"), verbose=0)
    with pytest.raises(ValueError, match="--val_split: the 'val' split .* is empty"):
        config.validate()


def test_a_kill_right_after_the_export_does_not_export_the_model_again(tmp_path, monkeypatch):
    from imcl_tf import export
    data_dir = write_dataset(str(tmp_path / "data"), num_train=8, num_val=4, num_shards=1)
    export_dir = str(tmp_path / "exports")
    config = TrainConfig(data_dir=data_dir, model_dir=str(tmp_path / "run"), method="logistic",
                         train_steps=2, batch_size=4, verbose=0, export_dir=export_dir,
                         export_model_name="tiny")
    original = export.export_from_model_dir

    def export_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise Killed()  # after the version folder's rename, before summary.json
    monkeypatch.setattr(export, "export_from_model_dir", export_then_die)
    with pytest.raises(Killed):
        run(config)
    monkeypatch.setattr(export, "export_from_model_dir", original)
    assert export.list_versions(os.path.join(export_dir, "tiny")) == [1]
    summary = run(config)
    assert summary["export"] == os.path.join(export_dir, "tiny", "1")
    assert export.list_versions(os.path.join(export_dir, "tiny")) == [1]
    summary = run(TrainConfig(**{**config.__dict__, "train_steps": 4}))  # trained on: new version
    assert export.list_versions(os.path.join(export_dir, "tiny")) == [1, 2]

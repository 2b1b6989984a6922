"""A training run killed with SIGKILL resumes at its last checkpoint with the same state.

The first run is `python -m imcl_tf.train` in a subprocess, killed right after its first
checkpoint; the restart happens in this process so that its state can be compared, variable by
variable, with what the checkpoint holds before it trains a single further step.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from imcl_tf.training.config import TrainConfig
from imcl_tf.training.run_files import CHECKPOINT_DIR, LOG_DIR, RUN_CONFIG, read_json
from imcl_tf.training.trainer import _Trainer
from test_train_common import REPO_ROOT, read_events, write_dataset

TRAIN_STEPS = 60


def wait_for_checkpoint(process, folder, timeout=600):
    """Polls until the checkpoint pointer names a checkpoint; the process must still be running."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            return None
        if tf.train.latest_checkpoint(folder):
            return True
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint in {folder} after {timeout} s")


@pytest.mark.slow
def test_killed_run_resumes_at_its_checkpoint_with_the_same_state(tmp_path):
    data_dir = write_dataset(str(tmp_path / "data"), num_train=48, num_val=8)
    model_dir = str(tmp_path / "run")
    options = dict(data_dir=data_dir, model_dir=model_dir, method="imcl", train_steps=TRAIN_STEPS,
                   eval_every=30, checkpoint_every=3, log_every=1, batch_size=8,
                   dictionary_per_class=3, calibration_batches=1, refresh_every=4, seed=5,
                   optimizer="adam", verbose=0)
    command = [sys.executable, "-m", "imcl_tf.train"] + [
        f"--{name}={value}" for name, value in options.items()]
    with open(tmp_path / "first_run.log", "w") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=log,
                                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        try:
            checkpoints = os.path.join(model_dir, CHECKPOINT_DIR)
            running = wait_for_checkpoint(process, checkpoints)
            assert running, "the first run ended before it could be killed:\n" + open(
                tmp_path / "first_run.log").read()[-3000:]
            os.kill(process.pid, signal.SIGKILL)
        finally:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL

    latest = tf.train.latest_checkpoint(checkpoints)
    killed_at = int(latest.rsplit("-", 1)[1])
    assert 0 < killed_at < TRAIN_STEPS
    # A checkpoint the kill interrupted never reaches the pointer file (CheckpointManager writes
    # it last), so leftovers of a newer, half-written one must be ignored on restart.
    for suffix in (".index", ".data-00000-of-00001"):
        with open(os.path.join(checkpoints, f"ckpt-{TRAIN_STEPS - 1}{suffix}"), "wb") as f:
            f.write(b"half written")
    reader = tf.train.load_checkpoint(latest)
    saved = reader.get_variable_to_shape_map()

    config = TrainConfig(**options)
    config.validate()
    trainer = _Trainer(config)
    trainer.setup()
    assert trainer.resumed_from == latest
    assert trainer.start_step == killed_at
    optimizer = trainer.model.optimizer
    assert int(optimizer.iterations.numpy()) == killed_at
    # Every optimizer variable (Adam's moments included) and every weight is the checkpoint's.
    compared = 0
    for collection, variables in (("_variables", optimizer.variables),
                                  ("_trainable_variables", optimizer._trainable_variables)):
        for index, variable in enumerate(variables):
            key = f"optimizer/{collection}/{index}/.ATTRIBUTES/VARIABLE_VALUE"
            if key in saved:
                np.testing.assert_array_equal(variable.numpy(), reader.get_tensor(key), key)
                compared += 1
    slots = [v for v in optimizer.variables if "momentum" in v.path or "velocity" in v.path]
    assert slots and any(np.abs(v.numpy()).sum() > 0 for v in slots)  # real, trained moments
    assert compared > 2 * len(trainer.model.trainable_variables)
    bank = trainer.model.method.bank
    np.testing.assert_array_equal(bank.features.numpy(), reader.get_tensor(
        "model/method/bank/features/.ATTRIBUTES/VARIABLE_VALUE"))
    # The bank's images are not in the checkpoint; the restart re-read them from the shards.
    assert not any("bank/inputs" in name for name in saved)
    assert bank.has_inputs and bank.inputs.shape[0] == bank.size
    np.testing.assert_array_equal(trainer.model.method.lambda_y.numpy(), reader.get_tensor(
        "model/method/lambda_y/.ATTRIBUTES/VARIABLE_VALUE"))

    trainer.fit()
    summary = trainer.finish()
    assert int(optimizer.iterations.numpy()) == TRAIN_STEPS
    assert (summary["start_step"], summary["steps_this_run"]) == (killed_at,
                                                                  TRAIN_STEPS - killed_at)
    run_config = read_json(os.path.join(model_dir, RUN_CONFIG))
    assert run_config["resumed"][-1]["at_step"] == killed_at
    assert run_config["resolved"]["lambda_y"] == pytest.approx(float(reader.get_tensor(
        "model/method/lambda_y/.ATTRIBUTES/VARIABLE_VALUE")))
    # The restarted session logged the steps after the checkpoint, not from step 1 again.
    events = read_events(os.path.join(model_dir, LOG_DIR, "train"))
    steps = [step for step, _ in events["loss/bce"]]
    assert steps[-(TRAIN_STEPS - killed_at):] == list(range(killed_at + 1, TRAIN_STEPS + 1))
    assert tf.train.latest_checkpoint(checkpoints).endswith(f"ckpt-{TRAIN_STEPS}")

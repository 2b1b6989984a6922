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

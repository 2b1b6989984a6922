"""The files of a run folder (`model_dir`): their names, and JSON written atomically and read back.

A run folder holds:
  run_config.json   the resolved configuration (every option, step counts, calibrated lambdas)
  checkpoints/      tf.train.CheckpointManager checkpoints (model, optimizer, schedule state);
                    a killed run restarts from the newest one
  best.keras        the model with the best validation mAP so far, latest.keras the final one
  model_config.json what evaluate/export need (class names, input mode, image size)
  logs/             TensorBoard: train/ (losses, lambdas, learning rate, OMP and label-graph
                    statistics), validation/ (mAP and best mAP, validation losses, per-class AP
                    table and histogram, PR curves, label-graph heat map, images with predicted
                    labels, frequency groups against --control_model_dir), and the hparams
                    session
  frequency_groups_val.png  with --control_model_dir: the latest frequency-group chart
  summary.json      the run's summary (also printed at the end)
  export.json       the export version written for the final step (not exported twice)
  run.lock          held (fcntl.flock) by the training that uses the folder: a second training
                    on the same folder stops at once instead of mixing its files in
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from typing import Any, Iterator

import numpy as np

CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
RUN_CONFIG = "run_config.json"
SUMMARY_JSON = "summary.json"
LOGISTIC_STAGE_DIR = "logistic_stage"
FREQUENCY_CHART = "frequency_groups_val.png"
RUN_LOCK = "run.lock"
EXPORT_RECORD = "export.json"  # the version an export is writing (a resumed run reuses it)


class RunError(RuntimeError):
    """A training that cannot go on (folder in use, diverged): the message says what to do."""


_held_locks: set[str] = set()  # run folders this process holds (a two-stage run re-enters)


@contextlib.contextmanager
def hold_run_lock(model_dir: str) -> Iterator[None]:
    """Holds `<model_dir>/run.lock` (an exclusive fcntl.flock) for the duration of the block.

    The lock goes with the process: a killed training releases it, so a restart resumes at once.
    Re-entering for a folder this process already holds is a no-op.

    Raises:
      RunError when another process holds the folder, naming its pid and host.
    """
    os.makedirs(model_dir, exist_ok=True)
    key = os.path.realpath(model_dir)
    if key in _held_locks:
        yield
        return
    path = os.path.join(model_dir, RUN_LOCK)
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunError(f"--model_dir={model_dir!r} is in use by another training "
                           f"({holder}); wait for it to end, or train into another --model_dir. "
                           "Two trainings in one folder would mix their checkpoints and "
                           "models.") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        _held_locks.add(key)
        try:
            yield
        finally:
            _held_locks.discard(key)
            fcntl.flock(handle, fcntl.LOCK_UN)
    finally:
        handle.close()


def read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically (temporary name, then rename): a reader never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_json_default)
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)

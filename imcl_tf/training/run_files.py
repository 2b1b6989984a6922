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
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
RUN_CONFIG = "run_config.json"
SUMMARY_JSON = "summary.json"
LOGISTIC_STAGE_DIR = "logistic_stage"
FREQUENCY_CHART = "frequency_groups_val.png"


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

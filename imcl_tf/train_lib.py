"""The training run behind `python -m imcl_tf.train`: configuration, loop, checkpoints, logging.

`run(TrainConfig(...))` does everything the CLI does and returns a summary dict, so tests, the
demo driver and the benchmarks drive training without going through absl flags.

A run folder (`model_dir`) holds:
  run_config.json   the resolved configuration (every option, step counts, calibrated lambdas)
  checkpoints/      tf.train.CheckpointManager checkpoints (model, optimizer, schedule state);
                    a killed run restarts from the newest one
  best.keras        the model with the best validation mAP so far, latest.keras the final one
  model_config.json what evaluate/export need (class names, input mode, image size)
  logs/             TensorBoard: train/ (losses, lambdas, learning rate, OMP and label-graph
                    statistics), validation/ (mAP, per-class AP, PR curves, frequency groups),
                    and the hparams session
  summary.json      the run's summary (also printed at the end)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from imcl_tf import data as data_lib
from imcl_tf import label_graph as graph_lib
from imcl_tf import memory, metrics, models

CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
RUN_CONFIG = "run_config.json"
SUMMARY_JSON = "summary.json"
LOGISTIC_STAGE_DIR = "logistic_stage"
FREQUENCY_CHART = "frequency_groups_val.png"
OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
STRATEGIES = ("default", "mirrored", "multi_worker")
LR_SCHEDULES = ("constant", "plateau")
PLATEAU_FACTOR = 0.8  # the official code's LearningRate helper always multiplies by 0.8


def _field(default, help_text, choices=None):
    metadata = {"help": help_text}
    if choices:
        metadata["choices"] = list(choices)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """Every training option; each is also a flag of `python -m imcl_tf.train`."""
    data_dir: str = _field("", "Dataset folder written by tfrecords_tools (has dataset.json).")
    model_dir: str = _field("", "Run folder: checkpoints, TensorBoard logs, best/latest models.")
    method: str = _field("imcl", "imcl (smoothness loss) or logistic (masked BCE baseline).",
                         models.METHODS)
    backbone: str = _field("small_cnn", "Feature extractor (features: a linear adapter over the "
                                        "dataset's precomputed embeddings).", models.BACKBONES)
    backbone_weights: str = _field("none", "none, imagenet, or a Keras weights file.")
    image_size: int = _field(0, "Square input size; 0 takes dataset.json's image_size hint.")
    batch_size: int = _field(32, "Global batch size (split across replicas).")
    train_steps: int = _field(0, "Optimizer steps; 0 means use --epochs.")
    epochs: float = _field(1.0, "Passes over the training split when --train_steps=0.")
    eval_every: int = _field(0, "Validate, log and keep the best model every this many steps "
                                "(0: ten evaluations per run).")
    checkpoint_every: int = _field(100, "Write a resumable checkpoint every this many steps (and "
                                        "at every evaluation).")
    log_every: int = _field(10, "Write training scalars to TensorBoard every this many steps.")
    learning_rate: float = _field(1e-3, "Base learning rate.")
    optimizer: str = _field("adam", "Optimizer; rmsprop is the paper's RMSProp(rho 0.9, momentum "
                                    "0.9, epsilon 1.0).", OPTIMIZERS)
    lr_schedule: str = _field("constant", "constant, or plateau: the paper's EMA plateau rule "
                                          "(x0.8 when the EMA of validation mAP drops).",
                              LR_SCHEDULES)
    plateau_alpha: float = _field(0.3, "EMA weight of the plateau rule.")
    plateau_patience: int = _field(2, "Evaluations to wait after a decay.")
    plateau_min_lr: float = _field(0.0, "The plateau rule decays only while the learning rate is "
                                        ">= this floor (0: 1e-3 x --learning_rate, the official "
                                        "floor).")
    plateau_start_step: int = _field(0, "No plateau decay before this step (validation mAP "
                                        "fluctuates early, method spec 5.3).")
    k: int = _field(3, "Neighbours per image (OMP sparsity).")
    lambda_y: float = _field(1.0, "Label-side smoothness multiplier (scaled by --balance).")
    lambda_f: float = _field(0.5, "Feature-side smoothness multiplier (scaled by --balance).")
    balance: str = _field("loss_ratio", "loss_ratio: lambda = multiplier * L_c / L_term on "
                                        "calibration batches; none: lambda = multiplier.",
                          models.BALANCE_MODES)
    calibration_batches: int = _field(10, "Batches averaged by --balance=loss_ratio.")
    feature_loss: bool = _field(True, "Add lambda_f * L_f to the loss (it always guides the OMP).")
    atom_gradient: bool = _field(True, "The smoothness residuals also train the neighbours' label "
                                       "states, as the official code does (false: neighbours are "
                                       "fixed teachers of the query).")
    dictionary_size: int = _field(0, "Cap on the bank size (0: no cap).")
    dictionary_per_class: int = _field(10, "Bank images per class with a known positive "
                                           "(0: the whole training split).")
    refresh_every: int = _field(100, "Re-encode the bank's features every this many steps.")
    label_state_refresh_every: int = _field(1, "Recompute the bank atoms' label states that the "
                                               "OMP selects with (classifier + graph over all "
                                               "atoms) every this many steps; 1 is exact.")
    omp_jit_compile: bool = _field(True, "Run the OMP XLA-compiled inside the step (false: "
                                         "plain TensorFlow ops, where XLA is unavailable).")
    neighbour_mode: str = _field("cached", "cached: neighbour features from the bank; forward: "
                                           "neighbours re-run through the backbone.",
                                 models.NEIGHBOUR_MODES)
    refit_mode: str = _field("reuse_support_refit", "Forward mode's coefficients: "
                                                    "reuse_support_refit re-solves them by NNLS "
                                                    "on the OMP's support with the fresh "
                                                    "neighbour features; reuse_all keeps the "
                                                    "OMP's (from the cached bank).",
                             models.REFIT_MODES)
    label_graph: str = _field("identity", "identity, cooccurrence (known training positives), or "
                                          "a .npy file of shape [L, L].")
    label_graph_top_k: int = _field(0, "Co-occurrence graph: keep the top k related labels per "
                                       "class (0: all).")
    learn_label_graph: bool = _field(True, "Train the graph's non-zero entries.")
    clip_label_graph: bool = _field(True, "Clip the graph to [0, 1] after every step.")
    asym_c: float = _field(2.0, "Asymmetry c >= 1 of the label-state function sigma_c.")
    head_weight_decay: float = _field(0.0, "L2 factor on the classifier kernel (CUB: 1e-4).")
    freeze_batchnorm: bool = _field(False, "Keep BatchNorm layers frozen (inference mode).")
    augment: bool = _field(False, "Random resized crop and flip of training images.")
    warm_start: str = _field("", "A logistic run's model_dir to start from, 'auto' to train that "
                                 "baseline first (into <model_dir>/logistic_stage), or empty.")
    warm_start_steps: int = _field(0, "Steps of the automatic logistic stage (0: --train_steps).")
    val_split: str = _field("val", "Split used for validation mAP and the best model (empty: no "
                                   "validation, the last model is kept as best).")
    strategy: str = _field("default", "tf.distribute strategy: default (one device), mirrored "
                                      "(all local GPUs, else all logical CPUs), multi_worker "
                                      "(TF_CONFIG).", STRATEGIES)
    mixed_precision: bool = _field(False, "mixed_float16 compute; OMP and losses stay float32.")
    seed: int = _field(0, "Seed of initialisation, data order and bank choice.")
    export_dir: str = _field("", "Export base for TensorFlow Serving (<export_dir>/<model_name>/"
                                 "<version>); empty: no export.")
    export_model_name: str = _field("imcl", "Model name inside --export_dir.")
    verify_data: bool = _field(True, "Check dataset.json against its shards before training.")
    verbose: int = _field(1, "Keras progress: 0 silent, 1 progress bar with ETA (one line per "
                             "interval when stdout is not a terminal), 2 one line per interval.")

    def validate_options(self) -> None:
        """Checks the options on their own (no file is read); raises ValueError naming the flag."""
        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            value = getattr(self, field.name)
            if choices and value not in choices:
                _bad(field.name, f"must be one of {', '.join(choices)}; received {value!r}.")
        if not self.data_dir:
            _bad("data_dir", "is required (a dataset folder written by tfrecords_tools).")
        if not self.model_dir:
            _bad("model_dir", "is required (where checkpoints, logs and models go).")
        if self.k < 1:
            _bad("k", f"must be >= 1, received {self.k}.")
        if self.dictionary_size and self.k > self.dictionary_size:
            _bad("k", f"must be at most --dictionary_size={self.dictionary_size}, received "
                      f"{self.k}.")
        if self.batch_size < 1:
            _bad("batch_size", f"must be >= 1, received {self.batch_size}.")
        if self.train_steps < 0:
            _bad("train_steps", f"must be >= 0, received {self.train_steps}.")
        if self.train_steps == 0 and not self.epochs > 0:
            _bad("epochs", f"must be > 0 when --train_steps=0, received {self.epochs}.")
        for name in ("eval_every", "image_size", "dictionary_size", "dictionary_per_class",
                     "warm_start_steps", "label_graph_top_k", "plateau_patience",
                     "plateau_start_step"):
            if getattr(self, name) < 0:
                _bad(name, f"must be >= 0, received {getattr(self, name)}.")
        for name in ("checkpoint_every", "log_every", "refresh_every", "calibration_batches",
                     "label_state_refresh_every"):
            if getattr(self, name) < 1:
                _bad(name, f"must be >= 1, received {getattr(self, name)}.")
        if not self.learning_rate > 0:
            _bad("learning_rate", f"must be > 0, received {self.learning_rate}.")
        if self.plateau_min_lr < 0:
            _bad("plateau_min_lr", f"must be >= 0, received {self.plateau_min_lr}.")
        for name in ("lambda_y", "lambda_f"):
            if not getattr(self, name) >= 0:
                _bad(name, f"multipliers must be >= 0, received {getattr(self, name)}.")
        if not self.asym_c >= 1:
            _bad("asym_c", f"must be >= 1, received {self.asym_c}.")
        if self.head_weight_decay < 0:
            _bad("head_weight_decay", f"must be >= 0, received {self.head_weight_decay}.")
        if not 0 < self.plateau_alpha <= 1:
            _bad("plateau_alpha", f"must be in (0, 1], received {self.plateau_alpha}.")
        if self.verbose not in (0, 1, 2):
            _bad("verbose", f"must be 0, 1 or 2, received {self.verbose}.")
        if self.label_graph not in graph_lib.GRAPH_KINDS and not self.label_graph.endswith(".npy"):
            _bad("label_graph", f"must be identity, cooccurrence or a .npy file, received "
                                f"{self.label_graph!r}.")
        if self.backbone_weights == "imagenet" and self.backbone in ("small_cnn", "features"):
            _bad("backbone_weights", f"--backbone={self.backbone} has no imagenet weights; use "
                                     "none or a weights file.")
        if self.warm_start == "auto" and self.method != "imcl":
            _bad("warm_start", "'auto' trains a logistic baseline first; it needs --method=imcl.")
        if self.export_dir and not self.export_model_name:
            _bad("export_model_name", "is required with --export_dir.")

    def validate(self) -> None:
        """Checks the options against the dataset, the warm start and an existing run folder.

        Raises ValueError naming the first bad flag, the value received and what to do.
        """
        self.validate_options()
        if not os.path.exists(os.path.join(self.data_dir, data_lib.DATASET_JSON)):
            _bad("data_dir", f"{self.data_dir!r} has no {data_lib.DATASET_JSON}; build the dataset "
                             "with python -m tfrecords_tools.<converter> first.")
        info = data_lib.load_dataset_info(self.data_dir)
        if "train" not in info.splits:
            _bad("data_dir", f"the dataset has no 'train' split (it has {sorted(info.splits)}).")
        if info.split("train").num_examples < 1:
            _bad("data_dir", f"the train split of {self.data_dir!r} is empty.")
        if self.val_split and self.val_split not in info.splits:
            _bad("val_split", f"{self.val_split!r} is not a split of {self.data_dir!r} (it has "
                              f"{sorted(info.splits)}); pick one of those, or --val_split= to "
                              "train without validation.")
        if (self.backbone == "features") != (info.mode == "features"):
            _bad("backbone", f"{self.backbone!r} does not fit a dataset of mode {info.mode!r}: use "
                             "--backbone=features exactly for features-mode datasets.")
        if info.mode == "image" and not (self.image_size or info.image_size):
            _bad("image_size", "is 0 and dataset.json has no image_size hint; set --image_size.")
        if self.augment and info.mode != "image":
            _bad("augment", "applies to images; this is a features-mode dataset.")
        if self.backbone_weights not in ("none", "imagenet") and not os.path.exists(
                self.backbone_weights):
            _bad("backbone_weights", f"{self.backbone_weights!r} is neither none, imagenet nor an "
                                     "existing weights file.")
        if self.label_graph.endswith(".npy"):
            if not os.path.exists(self.label_graph):
                _bad("label_graph", f"{self.label_graph!r}: no such file.")
            shape = np.load(self.label_graph, mmap_mode="r").shape
            if shape != (info.num_classes, info.num_classes):
                _bad("label_graph", f"{self.label_graph!r} has shape {shape}, the dataset has "
                                    f"{info.num_classes} classes: it must be "
                                    f"[{info.num_classes}, {info.num_classes}].")
        if self.warm_start not in ("", "auto"):
            self._validate_warm_start(info)
        if self.strategy == "multi_worker":
            workers = _cluster_size()
            shards = len(info.split("train").shards)
            if shards < workers:
                _bad("strategy", f"multi_worker with {workers} workers needs at least {workers} "
                                 f"train shards; {self.data_dir!r} has {shards}. Rebuild the "
                                 f"dataset with --num_shards >= {workers}.")
        self._validate_resume()

    def _validate_warm_start(self, info: data_lib.DatasetInfo) -> None:
        if not os.path.exists(os.path.join(self.warm_start, models.MODEL_CONFIG_JSON)):
            _bad("warm_start", f"{self.warm_start!r} is not the model_dir of a finished run "
                               f"(no {models.MODEL_CONFIG_JSON}).")
        source = models.read_model_info(self.warm_start)
        names = list(source.get("class_names", []))
        if len(names) != info.num_classes:
            _bad("warm_start", f"the run in {self.warm_start!r} has {len(names)} classes but the "
                               f"dataset has {info.num_classes}; warm-start from a run trained "
                               "on the same classes.")
        if names != list(info.class_names):
            _bad("warm_start", f"the run in {self.warm_start!r} has other class names (or order) "
                               f"than {self.data_dir!r}, e.g. {names[:3]} against "
                               f"{list(info.class_names)[:3]}.")
        if source.get("backbone") != self.backbone:
            _bad("warm_start", f"the run in {self.warm_start!r} used backbone "
                               f"{source.get('backbone')!r}, this one {self.backbone!r}.")

    def _validate_resume(self) -> None:
        """A model_dir with a checkpoint must be resumed with the settings it was written with."""
        previous = _read_json(os.path.join(self.model_dir, RUN_CONFIG))
        has_checkpoint = os.path.exists(os.path.join(self.model_dir, CHECKPOINT_DIR, "checkpoint"))
        if not previous or not has_checkpoint:
            return
        before = dict(previous.get("config", {}))
        now = dataclasses.asdict(self)
        if now["warm_start"] == "auto":  # the stage-2 run records where the baseline went
            now["warm_start"] = os.path.join(self.model_dir, LOGISTIC_STAGE_DIR)
        changed = [name for name in now if name not in RESUMABLE_CHANGES and name in before
                   and before[name] != now[name]]
        if changed:
            details = ", ".join(f"--{name}={before[name]!r} (now {now[name]!r})"
                                for name in changed)
            _bad(changed[0], f"{self.model_dir!r} holds a run checkpointed with {details}; it "
                             "can only be resumed with the same settings. Use a new "
                             "--model_dir (or delete this one) to train with other settings.")


# Options that may change when a checkpointed run is resumed: how long and how it is watched,
# where the data and exports are, and how it is distributed (checkpoints are strategy-agnostic).
RESUMABLE_CHANGES = frozenset({
    "data_dir", "train_steps", "epochs", "eval_every", "checkpoint_every", "log_every",
    "warm_start_steps", "strategy", "export_dir", "export_model_name", "verify_data", "verbose",
})


def _bad(flag: str, message: str) -> None:
    raise ValueError(f"--{flag}: {message}")


# ---- the run -------------------------------------------------------------------------------------


def run(config: TrainConfig) -> dict[str, Any]:
    """Trains as configured (resuming from model_dir's checkpoint if any); returns a summary.

    With `warm_start="auto"` the logistic baseline is trained first into
    <model_dir>/logistic_stage and IMCL starts from it (the paper's two-stage recipe).
    """
    started = time.time()
    config.validate()
    if config.warm_start == "auto":
        stage_dir = os.path.join(config.model_dir, LOGISTIC_STAGE_DIR)
        logistic = dataclasses.replace(
            config, method="logistic", model_dir=stage_dir, warm_start="", export_dir="",
            train_steps=config.warm_start_steps or config.train_steps)
        logging.info("Stage 1/2: logistic baseline into %s", stage_dir)
        stage_summary = run(logistic)
        logging.info("Stage 2/2: IMCL warm-started from %s", stage_dir)
        summary = run(dataclasses.replace(config, warm_start=stage_dir))
        summary["logistic_stage"] = stage_summary
        summary["wall_seconds"] = round(time.time() - started, 1)
        if _is_chief_process(config.strategy):
            _write_json(summary["summary_file"], summary)
        return summary
    policy = keras.mixed_precision.global_policy()
    try:
        summary = _Trainer(config).train()
    finally:
        keras.mixed_precision.set_global_policy(policy)  # the caller's policy, not ours
    summary["wall_seconds"] = round(time.time() - started, 1)
    if summary["is_chief"]:
        _write_json(summary["summary_file"], summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run report: steps, validation mAP, final losses, lambdas and every path."""
    lines = []
    stage = summary.get("logistic_stage")
    if stage:
        lines += [_format_one(stage, "stage 1/2: logistic baseline"), ""]
        lines.append(_format_one(summary, "stage 2/2: IMCL warm-started from the baseline"))
    else:
        lines.append(_format_one(summary, f"{summary['method']} run"))
    if summary.get("wall_seconds") is not None:
        lines.append(f"total time: {_duration(summary['wall_seconds'])}")
    return "\n".join(lines)


def _format_one(summary: dict[str, Any], title: str) -> str:
    steps, start = summary["steps"], summary.get("start_step", 0)
    session = (f"{summary.get('steps_this_run', steps)} in this session, resumed at step {start}"
               if start else f"{summary.get('steps_this_run', steps)} in this session")
    lines = [f"{title}: {steps} steps ({session})"]
    if summary.get("best_val_mAP") is not None:
        lines.append(f"  validation mAP   best {_number(summary['best_val_mAP'])} at step "
                     f"{summary['best_step']}, last {_number(summary.get('last_val_mAP'))} "
                     f"(all classes {_number(summary.get('last_val_mAP_all_classes'))})")
    else:
        lines.append("  validation       none (no --val_split); the last model is kept as best")
    logs = summary.get("final_train_logs") or {}
    losses = [f"{key} {_number(logs[key])}" for key in ("loss", "bce", "loss_y", "loss_f")
              if key in logs]
    if losses:
        lines.append("  training loss    " + "  ".join(losses) + "  (mean of the last interval)")
    if "omp_valid_fraction" in logs:
        lines.append(f"  OMP              valid neighbours {logs['omp_valid_fraction']:.1%}, label "
                     f"residual {_number(logs.get('residual_y_before'))} -> "
                     f"{_number(logs.get('residual_y_after'))}, feature residual "
                     f"{_number(logs.get('residual_f_before'))} -> "
                     f"{_number(logs.get('residual_f_after'))}")
    resolved = summary.get("resolved") or {}
    if "lambda_y" in resolved:
        lines.append(f"  smoothness       lambda_y {_number(resolved['lambda_y'])}  lambda_f "
                     f"{_number(resolved['lambda_f'])}")
    if resolved.get("warm_start"):
        lines.append(f"  warm start       {resolved['warm_start']}")
    files = summary.get("files") or {}
    for key, label in (("model_dir", "run folder"), ("best_model", "best model"),
                       ("latest_model", "final model"), ("run_config", "configuration"),
                       ("tensorboard", "TensorBoard"), ("export", "SavedModel")):
        if files.get(key):
            value = files[key]
            if key == "tensorboard":
                value = f"tensorboard --logdir {value}"
            lines.append(f"  {label:16s} {value}")
    return "\n".join(lines)


def _number(value) -> str:
    if value is None:
        return "n/a"
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Trainer:
    """One training run; see `run`. `setup`, `fit` and `finish` are its three phases."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.info = data_lib.load_dataset_info(config.data_dir)
        self.image_size = (config.image_size or self.info.image_size) if self.info.mode == "image" \
            else None
        self.strategy = _make_strategy(config.strategy)
        self.is_chief = _is_chief(self.strategy)
        self.num_replicas = self.strategy.num_replicas_in_sync
        if config.batch_size % self.num_replicas:
            _bad("batch_size", f"{config.batch_size} is not a multiple of the "
                               f"{self.num_replicas} replicas of --strategy={config.strategy}.")
        self.distributed = config.strategy != "default"
        self.num_train = self.info.split("train").num_examples
        steps_per_epoch = max(1, self.num_train // config.batch_size)
        self.train_steps = config.train_steps or max(1, int(round(config.epochs * steps_per_epoch)))
        self.eval_every = config.eval_every or max(1, math.ceil(self.train_steps / 10))
        self.has_val = bool(config.val_split)
        self.chief_checkpoints = os.path.join(config.model_dir, CHECKPOINT_DIR)
        # A non-chief worker must save checkpoints too (they may involve collectives), but into a
        # private temporary folder that is deleted at the end: model_dir is the chief's.
        self.work_dir = config.model_dir if self.is_chief else tempfile.mkdtemp(
            prefix=f"imcl_worker{_task_id()}_")
        self.start_step = 0
        self.resumed_from = None
        self.resolved: dict[str, Any] = {}
        self.val_history: list[tuple[int, float]] = []
        self.last_val: dict[str, Any] | None = None

    def train(self) -> dict[str, Any]:
        try:
            self.setup()
            self.fit()
            return self.finish()
        finally:
            if not self.is_chief:
                shutil.rmtree(self.work_dir, ignore_errors=True)

    # -- setup --

    def setup(self) -> None:
        """Builds the model; restores the newest checkpoint or initialises a new run."""
        config = self.config
        os.makedirs(self.work_dir, exist_ok=True)
        if config.verify_data and self.is_chief:
            data_lib.verify_dataset(config.data_dir)
        self._build()
        latest = tf.train.latest_checkpoint(self.chief_checkpoints)
        previous = _read_json(os.path.join(config.model_dir, RUN_CONFIG)) or {}
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            self.resumed_from = latest
            self.resolved = previous.get("resolved", {})
            self.start_step = int(self.model.optimizer.iterations.numpy())
            if config.method == "imcl":  # the bank's inputs are not in checkpoints: re-read them
                self.model.restore_bank_inputs(iter_split_subset(
                    config.data_dir, "train", self.bank_indices, self.image_size))
            logging.info("Resumed from %s at step %d of %d", latest, self.start_step,
                         self.train_steps)
        else:
            self.resolved = self._initialise_new_run()
        self._write_run_config(previous)
        self.monitor = TrainingMonitor(self)
        self.callbacks = [self.monitor]
        if config.method == "imcl":
            self.callbacks.insert(0, BankRefresh(config.refresh_every))

    def _build(self):
        config = self.config
        keras.utils.set_random_seed(config.seed)
        keras.mixed_precision.set_global_policy("mixed_float16" if config.mixed_precision
                                                else "float32")
        input_shape = ((self.image_size, self.image_size, 3) if self.info.mode == "image"
                       else (int(self.info.embedding_dim),))
        train_labels = None
        bank_indices = None
        if config.method == "imcl" or config.label_graph == "cooccurrence":
            train_labels, _ = read_split_labels(config.data_dir, "train")
        if config.method == "imcl":
            bank_indices = memory.select_dictionary(
                train_labels, config.dictionary_per_class, config.dictionary_size, config.seed)
            if config.k > len(bank_indices):
                _bad("k", f"{config.k} is more than the {len(bank_indices)} images of the "
                          "dictionary bank; lower --k or raise --dictionary_per_class / "
                          "--dictionary_size.")
        graph = graph_lib.build_label_graph(config.label_graph, self.info.num_classes,
                                            train_labels, config.label_graph_top_k or None)
        with self.strategy.scope(), _local_byte_variables(self.strategy):
            model = models.IMCLModel(
                num_classes=self.info.num_classes, input_shape_=input_shape,
                backbone=config.backbone, backbone_weights=config.backbone_weights,
                method=config.method,
                dictionary_size=0 if bank_indices is None else len(bank_indices),
                k=config.k, multiplier_y=config.lambda_y, multiplier_f=config.lambda_f,
                balance=config.balance, asym_c=config.asym_c,
                learn_label_graph=config.learn_label_graph,
                clip_label_graph=config.clip_label_graph, neighbour_mode=config.neighbour_mode,
                feature_loss=config.feature_loss, freeze_batchnorm=config.freeze_batchnorm,
                head_weight_decay=config.head_weight_decay, label_graph_init=graph,
                atom_gradient=config.atom_gradient, refit_mode=config.refit_mode,
                omp_jit_compile=config.omp_jit_compile,
                label_state_refresh_every=config.label_state_refresh_every)
            optimizer = make_optimizer(config.optimizer, config.learning_rate)
            model.compile(optimizer=optimizer, jit_compile=False)
            model.optimizer.build(model.trainable_variables)
            self.schedule = _PlateauState()
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            _prepare_multi_worker_fit(model, self.strategy, input_shape, config.batch_size,
                                      self.info.num_classes)
        self.model = model
        self.bank_indices = bank_indices
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=model.optimizer,
                                              schedule=self.schedule)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(self.work_dir, CHECKPOINT_DIR), max_to_keep=2)
        # One traced prediction function for every validation (a new one per call retraces).
        self._predict = tf.function(lambda x: tf.sigmoid(model(x, training=False)),
                                    reduce_retracing=True)

    def _initialise_new_run(self) -> dict[str, Any]:
        """Warm start, bank filling and lambda calibration: only for a run that is not resuming."""
        config, model = self.config, self.model
        resolved: dict[str, Any] = {}
        if config.warm_start:
            source, _ = models.load_model_dir(config.warm_start, "best")
            model.backbone.set_weights(source.backbone.get_weights())
            model.head.set_weights(source.head.get_weights())
            resolved["warm_start"] = config.warm_start
        if config.method == "imcl":
            model.fill_bank(iter_split_subset(config.data_dir, "train", self.bank_indices,
                                              self.image_size))
            resolved["dictionary_size"] = int(len(self.bank_indices))
            resolved.update(model.calibrate_lambdas(
                self._dataset("train", training=True, seed=config.seed + 7919),
                config.calibration_batches))
            logging.info("Resolved smoothness weights: %s", resolved)
        return resolved

    def _write_run_config(self, previous: dict[str, Any]) -> None:
        run_config = {
            "config": dataclasses.asdict(self.config), "train_steps": self.train_steps,
            "eval_every": self.eval_every, "resolved": self.resolved,
            "num_replicas": self.num_replicas, "dataset": {
                "num_classes": self.info.num_classes, "num_train": self.num_train,
                "mode": self.info.mode, "image_size": self.image_size,
                "labels": self.info.labels},
            "created": previous.get("created", data_lib.utc_now()) if self.resumed_from
            else data_lib.utc_now(),
            "resumed": list(previous.get("resumed", [])) if self.resumed_from else [],
        }
        if self.resumed_from:
            run_config["resumed"].append({"at_step": self.start_step, "time": data_lib.utc_now()})
        if self.is_chief:
            _write_json(os.path.join(self.work_dir, RUN_CONFIG), run_config)

    def _dataset(self, split, training, seed=None):
        """A non-distributed pipeline with the global batch size (evaluation, calibration).

        Evaluation pipelines keep a fixed element order, so every validation sees the same
        batches and a saved model reproduces its logged mAP exactly (batch composition changes
        float rounding, and near-tied scores can then swap ranks).
        """
        return data_lib.make_dataset(
            self.config.data_dir, split, batch_size=self.config.batch_size,
            image_size=self.image_size, training=training, augment=training and self.config.augment,
            seed=self.config.seed if seed is None else seed, repeat=training,
            drop_remainder=training, deterministic=not training)

    def _train_dataset(self, seed):
        """The training pipeline; under a strategy each worker reads its own shard FILES."""
        if not self.distributed:
            return self._dataset("train", training=True, seed=seed)
        config = self.config

        def per_worker(input_context):
            return data_lib.make_dataset(
                config.data_dir, "train", batch_size=config.batch_size,
                image_size=self.image_size, training=True, augment=config.augment, seed=seed,
                repeat=True, drop_remainder=True, input_context=input_context)

        return self.strategy.distribute_datasets_from_function(per_worker)

    # -- loop --

    def fit(self) -> None:
        """Trains interval by interval up to train_steps; validates and checkpoints after each."""
        config, model = self.config, self.model
        step = int(model.optimizer.iterations.numpy())
        self.clock = _Clock(step, self.train_steps)
        while step < self.train_steps:
            interval_end = min((step // self.eval_every + 1) * self.eval_every, self.train_steps)
            # A seed per interval start: a resumed run continues with the order it would have had.
            dataset = self._train_dataset(seed=config.seed + step)
            self.clock.start_interval()
            model.fit(dataset, epochs=1, steps_per_epoch=interval_end - step,
                      callbacks=self.callbacks, verbose=_keras_verbose(config.verbose),
                      shuffle=False)
            step = int(model.optimizer.iterations.numpy())
            self.clock.end_training(step)
            self._end_of_interval(step)
            self.clock.end_interval()
            if self.is_chief:
                if config.verbose:
                    print(self._progress_line(step), flush=True)
                else:
                    logging.info("%s", self._progress_line(step))

    def _progress_line(self, step: int) -> str:
        line = f"step {step}/{self.train_steps} ({step / self.train_steps:.0%})"
        logs = self.monitor.last_logs
        if "loss" in logs:
            line += f" | loss {_number(logs['loss'])}"
        if self.last_val is not None:
            line += (f" | val mAP {_number(self.last_val['mAP'])} (best "
                     f"{_number(self.schedule.best_map.numpy())} at step "
                     f"{int(self.schedule.best_step.numpy())})")
        return line + " | " + self.clock.describe(step, self.eval_every)

    def _end_of_interval(self, step):
        val = self.validate() if self.has_val else None
        self.last_val = val
        self.monitor.log_validation(step, val)
        if val is not None:
            self.val_history.append((step, float(val["mAP"])))
            improved = val["mAP"] > float(self.schedule.best_map.numpy())
            if improved:
                self.schedule.best_map.assign(val["mAP"])
                self.schedule.best_step.assign(step)
                if self.is_chief:
                    models.save_model_file(self.model, os.path.join(self.work_dir,
                                                                    models.BEST_MODEL))
            if self.config.lr_schedule == "plateau":
                self.schedule.update(val["mAP"], self.model.optimizer, self.config, step)
        self.manager.save(checkpoint_number=step)

    def validate(self) -> dict[str, Any]:
        scores, labels = predict_scores(self.model, self._dataset(self.config.val_split,
                                                                  training=False),
                                        self._predict)
        per_class = metrics.per_class_ap(scores, labels)
        result = metrics.map_metrics(scores, labels, per_class)
        result["per_class_ap"] = per_class
        result["scores"], result["labels"] = scores, labels
        return result

    # -- end --

    def finish(self) -> dict[str, Any]:
        config, model = self.config, self.model
        final_step = int(model.optimizer.iterations.numpy())
        best_path = os.path.join(self.work_dir, models.BEST_MODEL)
        latest_path = os.path.join(self.work_dir, models.LATEST_MODEL)
        previous = _read_json(os.path.join(config.model_dir, SUMMARY_JSON)) or {}
        trained = final_step > self.start_step or not os.path.exists(latest_path)
        summary = {
            "model_dir": config.model_dir, "method": config.method, "steps": self.train_steps,
            "start_step": self.start_step, "steps_this_run": final_step - self.start_step,
            "is_chief": self.is_chief, "num_replicas": self.num_replicas,
            "best_val_mAP": float(self.schedule.best_map.numpy()) if self.has_val else None,
            "best_step": int(self.schedule.best_step.numpy()) if self.has_val else None,
            "last_val_mAP": float(self.last_val["mAP"]) if self.last_val else
            previous.get("last_val_mAP"),
            "last_val_mAP_all_classes": float(self.last_val["mAP_all_classes"]) if self.last_val
            else previous.get("last_val_mAP_all_classes"),
            "val_history": self.val_history,
            "resumed_from": self.resumed_from, "resolved": self.resolved,
            "final_train_logs": self.monitor.last_logs or previous.get("final_train_logs", {}),
            "summary_file": os.path.join(config.model_dir, SUMMARY_JSON),
        }
        if not self.is_chief:
            return summary  # the chief writes every file
        if trained:
            models.save_model_file(model, latest_path)
            # Without validation (or if no evaluation was ever finite) the last model is the best.
            if not self.has_val or not os.path.exists(best_path):
                models.save_model_file(model, best_path)
        models.write_model_info(self.work_dir, {
            "class_names": self.info.class_names, "input_mode": self.info.mode,
            "image_size": self.image_size, "feature_dim": self.info.embedding_dim,
            "backbone": config.backbone, "method": config.method, "data_dir": config.data_dir,
            "train_steps": self.train_steps, "seed": config.seed,
            "dataset_labels": self.info.labels,
        })
        files = {"model_dir": config.model_dir, "best_model": best_path,
                 "latest_model": latest_path,
                 "run_config": os.path.join(config.model_dir, RUN_CONFIG),
                 "tensorboard": os.path.join(config.model_dir, LOG_DIR)}
        if config.export_dir:
            earlier = (previous.get("files") or {}).get("export")
            if not trained and earlier and os.path.isdir(earlier):
                files["export"] = earlier  # a finished run that was only re-opened
            else:
                from imcl_tf import export
                files["export"] = export.export_from_model_dir(
                    self.work_dir, config.export_dir, config.export_model_name, checkpoint="best")
        summary["files"] = files
        summary["best_model"], summary["tensorboard"] = best_path, files["tensorboard"]
        summary["export"] = files.get("export")
        self.monitor.close()
        return summary


class _Clock:
    """Wall time of training and evaluation, for the progress line's speed and ETA.

    The speed is that of the latest interval: the first one also pays for tracing the train
    step (tens of seconds for IMCL on a small CPU), which would inflate the ETA for the whole run.
    """

    def __init__(self, start_step: int, total_steps: int):
        self.total_steps = total_steps
        self.started = time.time()
        self.intervals: list[tuple[int, float, float]] = []  # (steps, train s, evaluation s)
        self._mark = self.started
        self._step = start_step
        self._train_seconds = 0.0

    def start_interval(self):
        self._mark = time.time()

    def end_training(self, step):
        now = time.time()
        self._train_seconds = now - self._mark
        self._steps = step - self._step
        self._step = step
        self._mark = now

    def end_interval(self):
        self.intervals.append((self._steps, self._train_seconds, time.time() - self._mark))

    def describe(self, step: int, eval_every: int) -> str:
        steps, train_seconds, eval_seconds = self.intervals[-1]
        per_step = train_seconds / max(steps, 1)
        remaining = self.total_steps - step
        eta = remaining * per_step + math.ceil(remaining / eval_every) * eval_seconds
        return (f"{per_step:.3f} s/step | elapsed {_duration(time.time() - self.started)} | "
                f"ETA {_duration(eta)}")


def _keras_verbose(verbose: int) -> int:
    """A progress bar on a terminal; in a log file its carriage returns pile up, so one line."""
    if verbose == 1 and not (hasattr(sys.stdout, "isatty") and sys.stdout.isatty()):
        return 2
    return verbose


# ---- callbacks -----------------------------------------------------------------------------------


class BankRefresh(keras.callbacks.Callback):
    """Re-encodes the dictionary bank with the current network every `refresh_every` steps.

    Runs between steps, in the strategy's cross-replica context: the new features are assigned
    to every replica's copy of the bank, so all replicas select neighbours from the same bank.
    """

    def __init__(self, refresh_every: int):
        super().__init__()
        self.refresh_every = refresh_every
        self.refreshes = 0

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step > 0 and step % self.refresh_every == 0:
            self.model.refresh_bank()
            self.refreshes += 1


class TrainingMonitor(keras.callbacks.Callback):
    """TensorBoard logging (train/ and validation/ under model_dir/logs) and resumable checkpoints.

    Train scalars: every loss component, the resolved lambdas, learning rate, OMP statistics and
    label-graph statistics. Validation: mAP (three conventions), per-class AP histogram, PR curves,
    and, when warm-started from a baseline, the frequency-group chart of the gain over it.
    Only the chief writes: the writers of other workers are no-ops.
    """

    def __init__(self, trainer: _Trainer):
        super().__init__()
        self.trainer = trainer
        self.last_logs: dict[str, float] = {}
        if trainer.is_chief:
            log_dir = os.path.join(trainer.work_dir, LOG_DIR)
            self.train_writer = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
            self.val_writer = tf.summary.create_file_writer(os.path.join(log_dir, "validation"))
            self.run_writer = tf.summary.create_file_writer(log_dir)
            self._write_hparams()
        else:
            self.train_writer = self.val_writer = self.run_writer = tf.summary.create_noop_writer()
        self.baseline_ap = None
        self.train_positive_counts = None

    def _write_hparams(self):
        """The run's options for TensorBoard's HParams dashboard, with validation mAP as metric."""
        from tensorboard.plugins.hparams import api as hparams_api
        config = dataclasses.asdict(self.trainer.config)
        hparams = {key: value for key, value in config.items()
                   if isinstance(value, (bool, int, float, str))}
        for key in ("lambda_y", "lambda_f"):
            if key in self.trainer.resolved:
                hparams[f"resolved_{key}"] = float(self.trainer.resolved[key])
        with self.run_writer.as_default():
            hparams_api.hparams_config(
                hparams=[hparams_api.HParam(key) for key in sorted(hparams)],
                metrics=[hparams_api.Metric("metrics/mAP", group="validation",
                                            display_name="validation mAP")])
            hparams_api.hparams(hparams, trial_id=os.path.basename(
                os.path.normpath(self.trainer.config.model_dir)))
        self.run_writer.flush()

    def on_train_batch_end(self, batch, logs=None):
        trainer = self.trainer
        step = int(self.model.optimizer.iterations.numpy())
        logs = {key: float(value) for key, value in (logs or {}).items()}
        self.last_logs = logs
        if step % trainer.config.checkpoint_every == 0:
            trainer.manager.save(checkpoint_number=step)
        if step % trainer.config.log_every and step != trainer.start_step + 1:
            return
        with self.train_writer.as_default(step=step):
            for key, value in logs.items():
                group = "omp" if key.startswith(("omp_", "residual_")) else "loss"
                tf.summary.scalar(f"{group}/{key}", value)
            tf.summary.scalar("optimizer/learning_rate",
                              float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
            if self.model.method == "imcl":
                tf.summary.scalar("lambda/lambda_y", float(self.model.lambda_y.numpy()))
                tf.summary.scalar("lambda/lambda_f", float(self.model.lambda_f.numpy()))
                for key, value in self.model.label_graph.statistics().items():
                    tf.summary.scalar(f"label_graph/{key}", value)
        self.train_writer.flush()

    def log_validation(self, step, val):
        if val is None or not self.trainer.is_chief:
            return
        per_class = val["per_class_ap"]
        with self.val_writer.as_default(step=step):
            for key in ("mAP", "mAP_all_classes", "mAP_label_weighted"):
                tf.summary.scalar(f"metrics/{key}", float(val[key]))
            valid = per_class[np.isfinite(per_class)]
            if valid.size:
                tf.summary.histogram("metrics/per_class_ap", valid)
            write_pr_curves(val["scores"], val["labels"], self.trainer.info.class_names, step)
            chart = self._frequency_chart(per_class)
            if chart is not None:
                tf.summary.image("metrics/frequency_group_gain", chart[None], max_outputs=1)
        self.val_writer.flush()
        logging.info("step %d: validation mAP %.4f (all classes %.4f)", step, val["mAP"],
                     val["mAP_all_classes"])

    def _frequency_chart(self, per_class_ap):
        """The supplement's Fig. 1 (left) against the warm-start baseline, as an image tensor."""
        trainer = self.trainer
        if not trainer.config.warm_start:
            return None
        if self.baseline_ap is None:
            baseline, _ = models.load_model_dir(trainer.config.warm_start, "best")
            scores, labels = predict_scores(baseline, trainer._dataset(trainer.config.val_split,
                                                                       training=False))
            self.baseline_ap = metrics.per_class_ap(scores, labels)
            train_labels, _ = read_split_labels(trainer.config.data_dir, "train")
            self.train_positive_counts = (train_labels > 0).sum(0)
        num_groups = min(10, len(per_class_ap))
        groups = metrics.frequency_groups(self.train_positive_counts, per_class_ap,
                                          self.baseline_ap, num_groups)
        png = os.path.join(trainer.work_dir, FREQUENCY_CHART)
        metrics.plot_frequency_groups(groups, png)
        with open(png, "rb") as f:
            return tf.image.decode_png(f.read(), channels=4)

    def close(self):
        for writer in (self.train_writer, self.val_writer, self.run_writer):
            writer.close()


def write_pr_curves(scores, labels, class_names, step, max_classes=10, num_thresholds=51):
    """PR curves of the first classes (known entries only) for TensorBoard's PR-curve plugin.

    At threshold t an entry is predicted positive when its score >= t; thresholds are
    linspace(0, 1, num_thresholds). Writes to the default summary writer.
    """
    from tensorboard.plugins.pr_curve import summary as pr_summary
    thresholds = np.linspace(0.0, 1.0, num_thresholds)
    for index in range(min(max_classes, scores.shape[1])):
        known = labels[:, index] != 0
        positive = labels[known, index] > 0
        class_scores = scores[known, index]
        predicted = class_scores[None, :] >= thresholds[:, None]  # [T, n]
        tp = (predicted & positive[None]).sum(1).astype(np.float64)
        fp = (predicted & ~positive[None]).sum(1).astype(np.float64)
        fn = positive.sum() - tp
        tn = (~positive).sum() - fp
        precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 1.0)
        recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
        proto = pr_summary.raw_data_pb(
            name=f"pr_curve/{index:03d}_{class_names[index]}", true_positive_counts=tp,
            false_positive_counts=fp, true_negative_counts=tn, false_negative_counts=fn,
            precision=precision, recall=recall, num_thresholds=num_thresholds)
        tf.summary.experimental.write_raw_pb(proto.SerializeToString(), step=step)


class _PlateauState(tf.Module):
    """State of the paper's EMA-plateau learning-rate rule (method spec 5.3), checkpointed."""

    def __init__(self):
        super().__init__()
        self.ema = tf.Variable(0.0, trainable=False, dtype=tf.float64)
        self.cooldown = tf.Variable(0, trainable=False, dtype=tf.int64)
        self.best_map = tf.Variable(-1.0, trainable=False, dtype=tf.float64)
        self.best_step = tf.Variable(0, trainable=False, dtype=tf.int64)

    def update(self, val_map, optimizer, config, step):
        """E <- (1 - a) E + a mAP; if E dropped, the floor allows and no cooldown: lr x 0.8."""
        previous = float(self.ema.numpy())
        ema = (1 - config.plateau_alpha) * previous + config.plateau_alpha * val_map
        self.ema.assign(ema)
        learning_rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        floor = config.plateau_min_lr or 1e-3 * config.learning_rate
        if (ema < previous and learning_rate >= floor
                and int(self.cooldown.numpy()) <= 0 and step >= config.plateau_start_step):
            optimizer.learning_rate.assign(learning_rate * PLATEAU_FACTOR)
            self.cooldown.assign(config.plateau_patience)
            logging.info("plateau: learning rate %.3g -> %.3g", learning_rate,
                         learning_rate * PLATEAU_FACTOR)
        self.cooldown.assign_sub(1)


# ---- data helpers --------------------------------------------------------------------------------


def predict_scores(model, dataset, predict=None) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores [N, L] and label rows [N, L] of a finite (inputs, labels, ids) dataset."""
    if predict is None:
        predict = tf.function(lambda x: tf.sigmoid(model(x, training=False)),
                              reduce_retracing=True)
    scores, labels = [], []
    for inputs, batch_labels, _ in dataset:
        scores.append(predict(inputs).numpy())
        labels.append(batch_labels.numpy())
    return np.concatenate(scores), np.concatenate(labels)


def read_split_labels(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Label rows [N, L] and id hashes [N] of a split, in shard order, without decoding images."""
    info = data_lib.load_dataset_info(data_dir)
    dataset = _records(data_dir, split, info).map(
        lambda parsed: (parsed["labels"], data_lib.id_hash(parsed["id"])))
    labels, ids = [], []
    for batch_labels, batch_ids in dataset.batch(4096):
        labels.append(batch_labels.numpy())
        ids.append(batch_ids.numpy())
    return np.concatenate(labels), np.concatenate(ids)


def read_split_subset(data_dir: str, split: str, indices: np.ndarray, image_size: int | None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inputs, label rows and id hashes of the records at `indices` (shard order) of a split."""
    parts = list(zip(*iter_split_subset(data_dir, split, indices, image_size)))
    return tuple(np.concatenate(part) for part in parts)


def iter_split_subset(data_dir: str, split: str, indices: np.ndarray, image_size: int | None,
                      chunk_size: int = 256):
    """`read_split_subset` in chunks of `chunk_size` records: (inputs, labels, ids) arrays."""
    info = data_lib.load_dataset_info(data_dir)
    wanted = np.zeros(info.split(split).num_examples, bool)
    wanted[np.asarray(indices, np.int64)] = True
    wanted = tf.constant(wanted)
    dataset = _records(data_dir, split, info).enumerate().filter(
        lambda index, parsed: tf.gather(wanted, index))

    def prepare(index, parsed):
        if info.mode == "image":
            inputs = data_lib.decode_image(parsed["image"], image_size, parsed["id"])
        else:
            inputs = parsed["embedding"]
        return inputs, parsed["labels"], data_lib.id_hash(parsed["id"])

    for batch in dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(chunk_size):
        yield tuple(values.numpy() for values in batch)


def _records(data_dir, split, info):
    split_info = info.split(split)
    paths = [os.path.join(data_dir, name) for name in split_info.shards]
    return tf.data.TFRecordDataset(paths).map(
        lambda record: data_lib.parse_example(record, info.num_classes, info.mode,
                                              info.embedding_dim))


# ---- small helpers -------------------------------------------------------------------------------


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """The optimizer named by --optimizer."""
    if name == "rmsprop":  # the recipe of the paper's runs (method spec 5.3)
        return keras.optimizers.RMSprop(learning_rate, rho=0.9, momentum=0.9, epsilon=1.0)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    raise ValueError(f"--optimizer: must be one of {', '.join(OPTIMIZERS)}; received {name!r}.")


# One strategy object per process: MultiWorkerMirroredStrategy configures the collective runtime
# once, and the two stages of --warm_start=auto must share it.
_STRATEGIES: dict[str, tf.distribute.Strategy] = {}


def _make_strategy(name: str) -> tf.distribute.Strategy:
    if name == "default":
        return tf.distribute.get_strategy()
    if name not in _STRATEGIES:
        if name == "mirrored":
            devices = ([d.name for d in tf.config.list_logical_devices("GPU")]
                       or [d.name for d in tf.config.list_logical_devices("CPU")])
            _STRATEGIES[name] = tf.distribute.MirroredStrategy(devices)
        elif name == "multi_worker":
            _cluster_size()  # a clear error before TensorFlow's own
            _STRATEGIES[name] = tf.distribute.MultiWorkerMirroredStrategy()
        else:
            raise ValueError(f"--strategy: must be one of {', '.join(STRATEGIES)}; received "
                             f"{name!r}.")
    return _STRATEGIES[name]


@contextlib.contextmanager
def _local_byte_variables(strategy: tf.distribute.Strategy):
    """Under MultiWorkerMirroredStrategy, creates uint8/int8 variables as plain local variables.

    The strategy broadcasts every new variable's initial value from the chief, but its collective
    ops have no uint8/int8 kernels ("Value for attr 'T' of uint8 is not in the list of allowed
    values"). The only such variables are the dictionary bank's stored images and label rows:
    non-trainable, never updated by a step, and filled by `fill_bank` with the same training
    records on every worker, so a local copy per worker is all they need.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        yield
        return
    from tensorflow.python.ops import resource_variable_ops  # the creator below the strategy's

    def creator(next_creator, **kwargs):
        dtype = kwargs.get("dtype")
        if dtype is not None and tf.as_dtype(dtype) in (tf.uint8, tf.int8):
            return resource_variable_ops.default_variable_creator_v2(None, **kwargs)
        return next_creator(**kwargs)

    with tf.variable_creator_scope(creator):
        yield


def _prepare_multi_worker_fit(model: keras.Model, strategy: tf.distribute.Strategy,
                              input_shape: tuple[int, ...], batch_size: int,
                              num_classes: int) -> None:
    """Works around two places where Keras' `fit` fails with several workers.

    1. `fit` starts with `_maybe_symbolic_build`, which passes the whole (inputs, labels, ids)
       sample batch to `strategy.reduce`; MultiWorkerMirroredStrategy cannot reduce a nested
       structure ("Attempt to convert a value (PerReplica...) to a Tensor"). The reduced batch
       only serves as a shape template, so the same build is done here from a batch spec and
       `fit`'s is turned off.
    2. The logs of every step are reduced across workers with `strategy.reduce("MEAN", v,
       axis=0)`, which fails for scalars ("Invalid reduction dimension 0 for input with 0
       dimensions"). The train step's logs get a leading axis of 1 so the reduction returns the
       scalar mean (the loss trackers are already summed over replicas, so it is their value).
    """
    sample = (tf.TensorSpec((batch_size,) + tuple(input_shape), tf.float32),
              tf.TensorSpec((batch_size, num_classes), tf.float32),
              tf.TensorSpec((batch_size,), tf.int64))
    with strategy.scope():
        model._symbolic_build(data_batch=sample)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    train_step = model.train_step

    def train_step_with_vector_logs(data):
        return {name: tf.reshape(value, [1]) for name, value in train_step(data).items()}

    model.train_step = train_step_with_vector_logs


def _tf_config() -> dict[str, Any]:
    text = os.environ.get("TF_CONFIG", "")
    if not text:
        _bad("strategy", "multi_worker needs the TF_CONFIG environment variable (the cluster "
                         "spec and this worker's task), e.g. TF_CONFIG='{\"cluster\": {\"worker\": "
                         "[\"host1:12345\", \"host2:12345\"]}, \"task\": {\"type\": \"worker\", "
                         "\"index\": 0}}'.")
    try:
        tf_config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--strategy: TF_CONFIG is not valid JSON ({e}); received {text!r}.")
    if not isinstance(tf_config, dict) or "cluster" not in tf_config or "task" not in tf_config:
        _bad("strategy", f"TF_CONFIG needs 'cluster' and 'task' entries; received {text!r}.")
    return tf_config


def _cluster_size() -> int:
    """Workers (chief included) in TF_CONFIG's cluster."""
    cluster = _tf_config()["cluster"]
    size = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    if size < 1:
        _bad("strategy", f"TF_CONFIG's cluster has no worker or chief; received {cluster!r}.")
    return size


def _task_id() -> int:
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    return int(tf_config.get("task", {}).get("index", 0))


def _is_chief_task() -> bool:
    """The chief of TF_CONFIG: task 'chief', or worker 0 when the cluster has no chief."""
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    task = tf_config.get("task", {})
    if "chief" in tf_config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0


def _is_chief(strategy) -> bool:
    """Only the chief writes logs, checkpoints and exports (architecture.md section 8)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    return _is_chief_task()


def _is_chief_process(strategy_name: str) -> bool:
    return strategy_name != "multi_worker" or _is_chief_task()


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, obj: Any) -> None:
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

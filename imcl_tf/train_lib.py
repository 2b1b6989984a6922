"""The training run behind `python -m imcl_tf.train`: configuration, loop, checkpoints, logging.

`run(TrainConfig(...))` does everything the CLI does and returns a summary dict, so tests, the
demo driver and the benchmarks drive training without going through absl flags.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
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
    backbone: str = _field("small_cnn", "Feature extractor.", models.BACKBONES)
    backbone_weights: str = _field("none", "none, imagenet, or a Keras weights file.")
    image_size: int = _field(0, "Square input size; 0 takes dataset.json's image_size hint.")
    batch_size: int = _field(32, "Global batch size (split across replicas).")
    train_steps: int = _field(0, "Optimizer steps; 0 means use --epochs.")
    epochs: float = _field(1.0, "Passes over the training split when --train_steps=0.")
    eval_every: int = _field(0, "Validate, log and keep the best model every this many steps "
                                "(0: ten evaluations per run).")
    checkpoint_every: int = _field(100, "Write a resumable checkpoint every this many steps.")
    log_every: int = _field(10, "Write training scalars to TensorBoard every this many steps.")
    learning_rate: float = _field(1e-3, "Base learning rate.")
    optimizer: str = _field("adam", "Optimizer (the paper used rmsprop).",
                            ("adam", "adamw", "rmsprop", "sgd"))
    lr_schedule: str = _field("constant", "constant, or plateau: the paper's EMA plateau rule "
                                          "(x0.8 when the EMA of validation mAP drops).",
                              ("constant", "plateau"))
    plateau_alpha: float = _field(0.3, "EMA weight of the plateau rule.")
    plateau_patience: int = _field(2, "Evaluations to wait after a decay.")
    k: int = _field(3, "Neighbours per image (OMP sparsity).")
    lambda_y: float = _field(1.0, "Label-side smoothness multiplier (scaled by --balance).")
    lambda_f: float = _field(0.5, "Feature-side smoothness multiplier (scaled by --balance).")
    balance: str = _field("loss_ratio", "loss_ratio: lambda = multiplier * L_c / L_term on "
                                        "calibration batches; none: lambda = multiplier.",
                          models.BALANCE_MODES)
    calibration_batches: int = _field(10, "Batches averaged by --balance=loss_ratio.")
    feature_loss: bool = _field(True, "Add lambda_f * L_f to the loss (it always guides the OMP).")
    dictionary_size: int = _field(0, "Cap on the bank size (0: no cap).")
    dictionary_per_class: int = _field(10, "Bank images per class with a known positive "
                                           "(0: the whole training split).")
    refresh_every: int = _field(100, "Re-encode the bank's features every this many steps.")
    neighbour_mode: str = _field("cached", "cached: neighbour features from the bank; forward: "
                                           "neighbours re-run through the backbone.",
                                 models.NEIGHBOUR_MODES)
    label_graph: str = _field("identity", "identity, cooccurrence (known training positives), or "
                                          "a .npy file.")
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
    val_split: str = _field("val", "Split used for validation mAP and the best model.")
    strategy: str = _field("default", "tf.distribute strategy.",
                           ("default", "mirrored", "multi_worker"))
    mixed_precision: bool = _field(False, "mixed_float16 compute; OMP and losses stay float32.")
    seed: int = _field(0, "Seed of initialisation, data order and bank choice.")
    export_dir: str = _field("", "Export base for TensorFlow Serving (<export_dir>/<model_name>/"
                                 "<version>); empty: no export.")
    export_model_name: str = _field("imcl", "Model name inside --export_dir.")
    verify_data: bool = _field(True, "Check dataset.json against its shards before training.")
    verbose: int = _field(1, "Keras progress: 0 silent, 1 progress bar, 2 one line per interval.")

    def validate(self) -> None:
        """Raises ValueError naming the first bad option and what to do."""
        def bad(flag, message):
            raise ValueError(f"--{flag}: {message}")
        if not self.data_dir:
            bad("data_dir", "is required (a dataset folder written by tfrecords_tools).")
        if not os.path.exists(os.path.join(self.data_dir, data_lib.DATASET_JSON)):
            bad("data_dir", f"{self.data_dir!r} has no {data_lib.DATASET_JSON}; build the dataset "
                            "with python -m tfrecords_tools.<converter> first.")
        if not self.model_dir:
            bad("model_dir", "is required (where checkpoints, logs and models go).")
        if self.k < 1:
            bad("k", f"must be >= 1, received {self.k}.")
        if self.batch_size < 1:
            bad("batch_size", f"must be >= 1, received {self.batch_size}.")
        if self.train_steps < 0:
            bad("train_steps", f"must be >= 0, received {self.train_steps}.")
        if self.train_steps == 0 and self.epochs <= 0:
            bad("epochs", f"must be > 0 when --train_steps=0, received {self.epochs}.")
        for name in ("eval_every", "image_size", "dictionary_size", "dictionary_per_class",
                     "warm_start_steps", "label_graph_top_k"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0, received {getattr(self, name)}.")
        for name in ("checkpoint_every", "log_every", "refresh_every", "calibration_batches"):
            if getattr(self, name) < 1:
                bad(name, f"must be >= 1, received {getattr(self, name)}.")
        if self.learning_rate <= 0:
            bad("learning_rate", f"must be > 0, received {self.learning_rate}.")
        if self.lambda_y < 0 or self.lambda_f < 0:
            bad("lambda_y", f"multipliers must be >= 0, received lambda_y={self.lambda_y}, "
                            f"lambda_f={self.lambda_f}.")
        if self.asym_c < 1:
            bad("asym_c", f"must be >= 1, received {self.asym_c}.")
        if not 0 < self.plateau_alpha <= 1:
            bad("plateau_alpha", f"must be in (0, 1], received {self.plateau_alpha}.")
        if self.label_graph not in ("identity", "cooccurrence") and not (
                self.label_graph.endswith(".npy") and os.path.exists(self.label_graph)):
            bad("label_graph", f"must be identity, cooccurrence or an existing .npy file, "
                               f"received {self.label_graph!r}.")
        if self.backbone_weights not in ("none", "imagenet") and not os.path.exists(
                self.backbone_weights):
            bad("backbone_weights", f"{self.backbone_weights!r} is neither none, imagenet nor an "
                                    "existing weights file.")
        if self.warm_start == "auto" and self.method != "imcl":
            bad("warm_start", "'auto' trains a logistic baseline first; it needs --method=imcl.")
        if self.warm_start not in ("", "auto"):
            if not os.path.exists(os.path.join(self.warm_start, models.MODEL_CONFIG_JSON)):
                bad("warm_start", f"{self.warm_start!r} is not the model_dir of a finished run "
                                  f"(no {models.MODEL_CONFIG_JSON}).")
        info = data_lib.load_dataset_info(self.data_dir)
        if "train" not in info.splits:
            bad("data_dir", f"the dataset has no 'train' split (it has {sorted(info.splits)}).")
        if (self.backbone == "features") != (info.mode == "features"):
            bad("backbone", f"{self.backbone!r} does not fit a dataset of mode {info.mode!r}: use "
                            "--backbone=features exactly for features-mode datasets.")
        if info.mode == "image" and not (self.image_size or info.image_size):
            bad("image_size", "is 0 and dataset.json has no image_size hint; set --image_size.")
        if self.warm_start not in ("", "auto"):
            source = models.read_model_info(self.warm_start)
            if len(source.get("class_names", [])) != info.num_classes:
                bad("warm_start", f"the run in {self.warm_start!r} has "
                                  f"{len(source.get('class_names', []))} classes but the dataset "
                                  f"has {info.num_classes}.")
            if source.get("backbone") != self.backbone:
                bad("warm_start", f"the run in {self.warm_start!r} used backbone "
                                  f"{source.get('backbone')!r}, this one {self.backbone!r}.")


# ---- the run ------------------------------------------------------------------------------------


def run(config: TrainConfig) -> dict[str, Any]:
    """Trains as configured (resuming from model_dir's checkpoint if any); returns a summary."""
    config.validate()
    if config.warm_start == "auto":
        stage_dir = os.path.join(config.model_dir, LOGISTIC_STAGE_DIR)
        logistic = dataclasses.replace(
            config, method="logistic", model_dir=stage_dir, warm_start="", export_dir="",
            train_steps=config.warm_start_steps or config.train_steps)
        logging.info("Stage 1/2: logistic baseline into %s", stage_dir)
        stage_summary = run(logistic)
        config = dataclasses.replace(config, warm_start=stage_dir)
        logging.info("Stage 2/2: IMCL warm-started from %s", stage_dir)
        summary = run(config)
        summary["logistic_stage"] = stage_summary
        _write_json(os.path.join(config.model_dir, SUMMARY_JSON), summary)
        return summary
    return _Trainer(config).train()


class _Trainer:
    """One training run; see `run`."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.info = data_lib.load_dataset_info(config.data_dir)
        self.image_size = (config.image_size or self.info.image_size) if self.info.mode == "image" \
            else None
        self.strategy = _make_strategy(config.strategy)
        self.is_chief = _is_chief(self.strategy)
        self.num_train = self.info.split("train").num_examples
        if self.num_train == 0:
            raise ValueError(f"--data_dir: the train split of {config.data_dir!r} is empty.")
        steps_per_epoch = max(1, self.num_train // config.batch_size)
        self.train_steps = config.train_steps or max(1, int(round(config.epochs * steps_per_epoch)))
        self.eval_every = config.eval_every or max(1, math.ceil(self.train_steps / 10))
        self.has_val = config.val_split in self.info.splits
        self.work_dir = config.model_dir if self.is_chief else os.path.join(
            config.model_dir, ".worker", str(_task_id()))

    # -- setup --

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
            train_labels, train_ids = read_split_labels(config.data_dir, "train")
        if config.method == "imcl":
            bank_indices = memory.select_dictionary(
                train_labels, config.dictionary_per_class, config.dictionary_size, config.seed)
        graph = graph_lib.build_label_graph(config.label_graph, self.info.num_classes,
                                            train_labels, config.label_graph_top_k or None)
        with self.strategy.scope():
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
                head_weight_decay=config.head_weight_decay, label_graph_init=graph)
            optimizer = _make_optimizer(config.optimizer, config.learning_rate)
            model.compile(optimizer=optimizer, jit_compile=False)
            optimizer.build(model.trainable_variables)
            self.schedule = _PlateauState()
        self.model = model
        self.bank_indices = bank_indices
        self.checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer,
                                              schedule=self.schedule)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(self.work_dir, CHECKPOINT_DIR), max_to_keep=2)

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
            inputs, labels, ids = read_split_subset(config.data_dir, "train", self.bank_indices,
                                                    self.image_size)
            model.fill_bank(inputs, labels, ids)
            resolved.update(model.calibrate_lambdas(
                self._dataset("train", training=True, seed=config.seed + 7919),
                config.calibration_batches))
            logging.info("Resolved smoothness weights: %s", resolved)
        return resolved

    def _dataset(self, split, training, seed=None):
        return data_lib.make_dataset(
            self.config.data_dir, split, batch_size=self.config.batch_size,
            image_size=self.image_size, training=training, augment=training and self.config.augment,
            seed=self.config.seed if seed is None else seed, repeat=training,
            drop_remainder=training)

    # -- loop --

    def train(self) -> dict[str, Any]:
        config = self.config
        os.makedirs(self.work_dir, exist_ok=True)
        if config.verify_data and self.is_chief:
            data_lib.verify_dataset(config.data_dir)
        self._build()
        model = self.model
        resumed_from = self.manager.latest_checkpoint
        run_info = self._read_run_info()
        if resumed_from:
            self.checkpoint.restore(resumed_from).assert_existing_objects_matched()
            logging.info("Resumed from %s at step %d", resumed_from,
                         int(model.optimizer.iterations.numpy()))
        else:
            run_info["resolved"] = self._initialise_new_run()
            self._write_run_info(run_info)
        monitor = TrainingMonitor(self, run_info.get("resolved", {}))
        callbacks = [monitor]
        if config.method == "imcl":
            callbacks.insert(0, BankRefresh(config.refresh_every))

        step = int(model.optimizer.iterations.numpy())
        while step < self.train_steps:
            interval_end = min((step // self.eval_every + 1) * self.eval_every, self.train_steps)
            dataset = self._dataset("train", training=True, seed=config.seed + step)
            model.fit(dataset, epochs=1, steps_per_epoch=interval_end - step, callbacks=callbacks,
                      verbose=config.verbose, shuffle=False)
            step = int(model.optimizer.iterations.numpy())
            self._end_of_interval(monitor, step)
        return self._finish(monitor, resumed_from)

    def _end_of_interval(self, monitor, step):
        val = self.validate() if self.has_val else None
        monitor.log_validation(step, val)
        if val is not None:
            improved = val["mAP"] > float(self.schedule.best_map.numpy())
            if improved:
                self.schedule.best_map.assign(val["mAP"])
                self.schedule.best_step.assign(step)
                if self.is_chief:
                    models.save_model_file(self.model, os.path.join(self.work_dir,
                                                                    models.BEST_MODEL))
            if self.config.lr_schedule == "plateau":
                self.schedule.update(val["mAP"], self.model.optimizer, self.config)
        self.manager.save(checkpoint_number=step)

    def validate(self) -> dict[str, Any]:
        scores, labels = predict_scores(self.model, self._dataset(self.config.val_split,
                                                                  training=False))
        result = metrics.map_metrics(scores, labels)
        result["per_class_ap"] = metrics.per_class_ap(scores, labels)
        result["scores"], result["labels"] = scores, labels
        return result

    def _finish(self, monitor, resumed_from) -> dict[str, Any]:
        config, model = self.config, self.model
        latest_path = os.path.join(self.work_dir, models.LATEST_MODEL)
        models.save_model_file(model, latest_path)
        best_path = os.path.join(self.work_dir, models.BEST_MODEL)
        if not os.path.exists(best_path):
            shutil.copyfile(latest_path, best_path)  # no validation split: the last model is best
        info = {
            "class_names": self.info.class_names, "input_mode": self.info.mode,
            "image_size": self.image_size, "feature_dim": self.info.embedding_dim,
            "backbone": config.backbone, "method": config.method, "data_dir": config.data_dir,
            "train_steps": self.train_steps, "seed": config.seed,
            "dataset_labels": self.info.labels,
        }
        if self.is_chief:
            models.write_model_info(self.work_dir, info)
        summary = {
            "model_dir": config.model_dir, "method": config.method, "steps": self.train_steps,
            "best_val_mAP": float(self.schedule.best_map.numpy()) if self.has_val else None,
            "best_step": int(self.schedule.best_step.numpy()) if self.has_val else None,
            "resumed_from": resumed_from, "resolved": monitor.resolved,
            "final_train_logs": monitor.last_logs, "tensorboard": os.path.join(config.model_dir,
                                                                               LOG_DIR),
            "best_model": best_path,
        }
        if config.export_dir and self.is_chief:
            from imcl_tf import export
            summary["export"] = export.export_from_model_dir(
                self.work_dir, config.export_dir, config.export_model_name, checkpoint="best")
        summary["summary_file"] = os.path.join(config.model_dir, SUMMARY_JSON)
        if self.is_chief:
            _write_json(summary["summary_file"], summary)
        else:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        return summary

    def _read_run_info(self) -> dict[str, Any]:
        path = os.path.join(self.work_dir, RUN_CONFIG)
        previous = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                previous = json.load(f)
        return {"config": dataclasses.asdict(self.config), "train_steps": self.train_steps,
                "eval_every": self.eval_every, "resolved": previous.get("resolved", {})}

    def _write_run_info(self, run_info):
        if self.is_chief:
            _write_json(os.path.join(self.work_dir, RUN_CONFIG), run_info)


# ---- callbacks -----------------------------------------------------------------------------------


class BankRefresh(keras.callbacks.Callback):
    """Re-encodes the dictionary bank with the current network every `refresh_every` steps."""

    def __init__(self, refresh_every: int):
        super().__init__()
        self.refresh_every = refresh_every

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step > 0 and step % self.refresh_every == 0:
            self.model.refresh_bank()


class TrainingMonitor(keras.callbacks.Callback):
    """TensorBoard logging (train/ and validation/ under model_dir/logs) and resumable checkpoints.

    Train scalars: every loss component, the resolved lambdas, learning rate, OMP statistics and
    label-graph statistics. Validation: mAP (both conventions), per-class AP histogram, PR curves,
    and, when warm-started from a baseline, the frequency-group chart of the gain over it.
    """

    def __init__(self, trainer: _Trainer, resolved: dict[str, Any]):
        super().__init__()
        self.trainer = trainer
        self.resolved = resolved
        self.last_logs: dict[str, float] = {}
        log_dir = os.path.join(trainer.work_dir, LOG_DIR)
        self.train_writer = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
        self.val_writer = tf.summary.create_file_writer(os.path.join(log_dir, "validation"))
        self.baseline_ap = None
        self.train_positive_counts = None
        self._write_hparams()

    def _write_hparams(self):
        from tensorboard.plugins.hparams import api as hparams_api
        config = dataclasses.asdict(self.trainer.config)
        hparams = {key: value for key, value in config.items()
                   if isinstance(value, (bool, int, float, str))}
        with self.train_writer.as_default():
            hparams_api.hparams(hparams, trial_id=os.path.basename(
                os.path.normpath(self.trainer.config.model_dir)))

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        logs = {key: float(value) for key, value in (logs or {}).items()}
        self.last_logs = logs
        if step % self.trainer.config.checkpoint_every == 0:
            self.trainer.manager.save(checkpoint_number=step)
        if step % self.trainer.config.log_every and step != 1:
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
        if val is None:
            return
        per_class = val["per_class_ap"]
        with self.val_writer.as_default(step=step):
            for key in ("mAP", "mAP_all_classes", "mAP_label_weighted"):
                tf.summary.scalar(f"metrics/{key}", float(val[key]))
            valid = per_class[np.isfinite(per_class)]
            if valid.size:
                tf.summary.histogram("metrics/per_class_ap", valid)
            _write_pr_curves(val["scores"], val["labels"], self.trainer.info.class_names, step)
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
        png = os.path.join(trainer.work_dir, "frequency_groups_val.png")
        metrics.plot_frequency_groups(groups, png)
        with open(png, "rb") as f:
            return tf.image.decode_png(f.read(), channels=4)


def _write_pr_curves(scores, labels, class_names, step, max_classes=10):
    """PR curves of the first classes (known entries only) for TensorBoard's PR-curve plugin."""
    from tensorboard.plugins.pr_curve import summary as pr_summary
    num_thresholds = 51
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

    def update(self, val_map, optimizer, config):
        previous = float(self.ema.numpy())
        ema = (1 - config.plateau_alpha) * previous + config.plateau_alpha * val_map
        self.ema.assign(ema)
        learning_rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        floor = 1e-3 * config.learning_rate
        if ema < previous and learning_rate >= floor and int(self.cooldown.numpy()) <= 0:
            optimizer.learning_rate.assign(learning_rate * 0.8)
            self.cooldown.assign(config.plateau_patience)
            logging.info("plateau: learning rate %.3g -> %.3g", learning_rate,
                         learning_rate * 0.8)
        self.cooldown.assign_sub(1)


# ---- data helpers ---------------------------------------------------------------------------------


def predict_scores(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Sigmoid scores [N, L] and label rows [N, L] of a finite (inputs, labels, ids) dataset."""
    scores, labels = [], []
    predict = tf.function(lambda x: tf.sigmoid(model(x, training=False)), reduce_retracing=True)
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
    info = data_lib.load_dataset_info(data_dir)
    wanted = tf.constant(np.asarray(indices, np.int64))
    dataset = _records(data_dir, split, info).enumerate().filter(
        lambda index, parsed: tf.reduce_any(tf.equal(index, wanted)))

    def prepare(index, parsed):
        if info.mode == "image":
            inputs = data_lib.decode_image(parsed["image"], image_size, parsed["id"])
        else:
            inputs = parsed["embedding"]
        return inputs, parsed["labels"], data_lib.id_hash(parsed["id"])

    parts = [[], [], []]
    for batch in dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(256):
        for part, values in zip(parts, batch):
            part.append(values.numpy())
    return tuple(np.concatenate(part) for part in parts)


def _records(data_dir, split, info):
    split_info = info.split(split)
    paths = [os.path.join(data_dir, name) for name in split_info.shards]
    return tf.data.TFRecordDataset(paths).map(
        lambda record: data_lib.parse_example(record, info.num_classes, info.mode,
                                              info.embedding_dim))


# ---- small helpers -----------------------------------------------------------------------------------


def _make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    if name == "rmsprop":  # the recipe of the paper's runs (method spec 5.3)
        return keras.optimizers.RMSprop(learning_rate, rho=0.9, momentum=0.9, epsilon=1.0)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    return keras.optimizers.Adam(learning_rate)


def _make_strategy(name: str) -> tf.distribute.Strategy:
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                             "(cluster spec and this worker's task).")
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _task_id() -> int:
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    return int(tf_config.get("task", {}).get("index", 0))


def _is_chief(strategy) -> bool:
    """Only the chief writes logs, checkpoints and exports (architecture.md section 8)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    task = tf_config.get("task", {})
    cluster = tf_config.get("cluster", {})
    if "chief" in cluster:
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def _write_json(path: str, obj: Any) -> None:
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


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"method: {summary['method']}  steps: {summary['steps']}",
             f"best validation mAP: {summary.get('best_val_mAP')} (step {summary.get('best_step')})"]
    for key, value in sorted((summary.get("resolved") or {}).items()):
        lines.append(f"  {key}: {value}")
    lines += [f"best model: {summary['best_model']}", f"TensorBoard: {summary['tensorboard']}"]
    if summary.get("export"):
        lines.append(f"export: {summary['export']}")
    return "\n".join(lines)

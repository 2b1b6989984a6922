"""The training run behind `imcl-train`: `run(config)` and the trainer it drives.

`run(TrainConfig(...))` does everything the CLI does and returns a summary dict, so tests, the
demo driver and the benchmarks drive training without going through absl flags. The run folder
it writes is described in `imcl_tf.training.run_files`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from imcl_tf import data as data_lib
from imcl_tf import methods, metrics, models
from imcl_tf.methods.base import RunContext
from imcl_tf.training.callbacks import TrainingMonitor
from imcl_tf.training.config import TrainConfig
from imcl_tf.training.divergence import RUN_CONFIG_KEY, DivergenceGuard
from imcl_tf.training.distribution import (is_chief, is_chief_process, local_byte_variables,
                                           make_strategy, prepare_multi_worker_fit, task_id)
from imcl_tf.training.errors import bad_flag
from imcl_tf.training.optimizer import PlateauState, make_part_optimizers, part_learning_rates
from imcl_tf.training.progress import Clock, LiveBar, LiveBarCallback, shows_live_bar
from imcl_tf.training.report import format_number
from imcl_tf.training.run_files import (CHECKPOINT_DIR, EXPORT_RECORD, LOG_DIR,
                                        LOGISTIC_STAGE_DIR, RUN_CONFIG,
                                        SUMMARY_JSON, RunError, hold_run_lock, read_json,
                                        write_json)
from imcl_tf.training.split_reading import iter_split_subset, read_split_labels
from imcl_tf.training.summaries import PREDICTION_GRID_IMAGES
from imcl_tf.training.validation import ValidationPass


def run(config: TrainConfig) -> dict[str, Any]:
    """Trains as configured (resuming from model_dir's checkpoint if any); returns a summary.

    With `warm_start="auto"` the logistic baseline is trained first into
    <model_dir>/logistic_stage and IMCL starts from it (the paper's two-stage recipe).
    """
    started = time.time()
    config.validate()
    if not is_chief_process(config.strategy):
        return _run(config, started)
    with hold_run_lock(config.model_dir):  # one training per folder (RunError otherwise)
        return _run(config, started)


def _run(config: TrainConfig, started: float) -> dict[str, Any]:
    if config.warm_start == "auto":
        stage_dir = os.path.join(config.model_dir, LOGISTIC_STAGE_DIR)
        logistic = dataclasses.replace(
            config, method="logistic", method_options={}, model_dir=stage_dir, warm_start="",
            export_dir="", train_steps=config.warm_start_steps or config.train_steps)
        logging.info("Stage 1/2: logistic baseline into %s", stage_dir)
        stage_summary = run(logistic)
        logging.info("Stage 2/2: %s warm-started from %s", config.method, stage_dir)
        summary = run(dataclasses.replace(config, warm_start=stage_dir))
        summary["logistic_stage"] = stage_summary
        summary["wall_seconds"] = round(time.time() - started, 1)
        if is_chief_process(config.strategy):
            write_json(summary["summary_file"], summary)
        return summary
    policy = keras.mixed_precision.global_policy()
    try:
        summary = _Trainer(config).train()
    finally:
        keras.mixed_precision.set_global_policy(policy)  # the caller's policy, not ours
    summary["wall_seconds"] = round(time.time() - started, 1)
    if summary["is_chief"]:
        write_json(summary["summary_file"], summary)
    return summary


class _Trainer:
    """One training run; see `run`. `setup`, `fit` and `finish` are its three phases."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.info = data_lib.load_dataset_info(config.data_dir)
        self.image_size = (config.image_size or self.info.image_size) if self.info.mode == "image" \
            else None
        self.strategy = make_strategy(config.strategy)
        self.is_chief = is_chief(self.strategy)
        self.num_replicas = self.strategy.num_replicas_in_sync
        if config.batch_size % self.num_replicas:
            bad_flag("batch_size", f"{config.batch_size} is not a multiple of the "
                                   f"{self.num_replicas} replicas of --strategy={config.strategy}.")
        self.distributed = config.strategy != "default"
        self.num_train = self.info.split("train").num_examples
        steps_per_epoch = max(1, self.num_train // config.batch_size)
        self.train_steps = config.train_steps or max(1, int(round(config.epochs * steps_per_epoch)))
        self.eval_every = config.eval_every or max(1, math.ceil(self.train_steps / 10))
        self.has_val = bool(config.val_split)
        # Image-class columns the method wants after the labels (IMCL's --class_label_weight);
        # set once the method is built.
        self.image_classes = 0
        self.chief_checkpoints = os.path.join(config.model_dir, CHECKPOINT_DIR)
        # A non-chief worker must save checkpoints too (they may involve collectives), but into a
        # private temporary folder that is deleted at the end: model_dir is the chief's.
        self.work_dir = config.model_dir if self.is_chief else tempfile.mkdtemp(
            prefix=f"imcl_worker{task_id()}_")
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
            # Headers too: a record that is not an image, or a decompression bomb, is named
            # (file and record) before training starts instead of stopping it midway.
            data_lib.verify_dataset(config.data_dir, max_image_pixels=config.max_image_pixels)
        self._build()
        latest = tf.train.latest_checkpoint(self.chief_checkpoints)
        previous = read_json(os.path.join(config.model_dir, RUN_CONFIG)) or {}
        if latest:
            self.checkpoint.restore(latest).assert_existing_objects_matched()
            self.resumed_from = latest
            self.resolved = previous.get("resolved", {})
            self.start_step = int(self.model.optimizer.iterations.numpy())
            # What checkpoints do not hold (IMCL's bank inputs) is rebuilt by the method.
            self.model.method.restore(self.model, self.run_context)
            logging.info("Resumed from %s at step %d of %d", latest, self.start_step,
                         self.train_steps)
        else:
            self.resolved = self._initialise_new_run()
        self._write_run_config(previous)
        self.monitor = TrainingMonitor(self)
        reference = previous.get(RUN_CONFIG_KEY) if self.resumed_from else None
        self.guard = DivergenceGuard(reference, on_reference=self._keep_divergence_reference)
        # The guard runs first: the monitor saves no checkpoint of a diverged step.
        self.callbacks = (self.model.method.callbacks(self.model, self.run_context)
                          + [self.guard, self.monitor])

    def _build(self):
        config = self.config
        if config.deterministic:
            # Op kernels with a deterministic variant use it (process-wide, cannot be undone);
            # the training pipeline keeps its order below, and every seed comes from --seed.
            tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(config.seed)
        keras.mixed_precision.set_global_policy("mixed_float16" if config.mixed_precision
                                                else "float32")
        input_shape = ((self.image_size, self.image_size, 3) if self.info.mode == "image"
                       else (int(self.info.embedding_dim),))
        rates = part_learning_rates(config)
        # BatchNorm frozen when fine-tuning trained weights (docs/method.md §5): then the
        # query's features (training mode) and the bank's (inference mode) are the same function
        # of the image and the smoothness terms compare like with like.
        self.freeze_batchnorm = config.freeze_batchnorm and (
            bool(config.warm_start) or config.backbone_weights != "none")
        self.run_context = RunContext(
            config, self.info, self.image_size, self.strategy, dataset=self._dataset,
            read_train_subset=self._read_train_subset,
            read_train_labels=lambda: read_split_labels(config.data_dir, "train"),
            warm_started=bool(config.warm_start))
        with self.strategy.scope(), local_byte_variables(self.strategy):
            # The method, from the registry, with its options and whatever it reads of the
            # training split (IMCL: the bank's images and the co-occurrence graph).
            method = methods.get(config.method).from_run(self.run_context)
            self.image_classes = method.image_classes
            model = models.IMCLModel(
                num_classes=self.info.num_classes, input_shape_=input_shape,
                backbone=config.backbone, backbone_weights=config.backbone_weights,
                method_instance=method, freeze_batchnorm=self.freeze_batchnorm,
                head_weight_decay=config.head_weight_decay)
            if rates.backbone == 0:
                model.backbone.trainable = False  # frozen: no gradient, no optimizer slots
            optimizer, part_optimizers = make_part_optimizers(
                config, rates, graph_learnable="graph" in model.parts
                and bool(model.part_variables("graph")))
            model.compile(optimizer=optimizer, jit_compile=False)
            model.set_part_optimizers(part_optimizers)
            model.optimizer.build(model.main_optimizer_variables())
            self.schedule = PlateauState()
        if isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            prepare_multi_worker_fit(model, self.strategy, input_shape, config.batch_size,
                                     self.info.num_classes)
        self.model = model
        # Base learning rate of each part as trained (0: frozen or fixed), for run_config.json.
        self.learning_rates = {
            "backbone": rates.backbone if model.backbone.trainable else 0.0,
            "head": rates.head,
            "graph": rates.graph if "graph" in model.parts and model.part_variables("graph")
            else 0.0}
        # Each part's optimizer is checkpointed beside the model's (head) one.
        self.checkpoint = tf.train.Checkpoint(
            model=model, optimizer=model.optimizer, schedule=self.schedule,
            **{f"{part}_optimizer": each for part, each in model.part_optimizers.items()})
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(self.work_dir, CHECKPOINT_DIR), max_to_keep=2)
        # One traced validation step for every validation (a new one per call retraces).
        self._validation = ValidationPass(
            model, num_images=PREDICTION_GRID_IMAGES if self.info.mode == "image" else 0)

    def _initialise_new_run(self) -> dict[str, Any]:
        """Warm start, bank filling and lambda calibration: only for a run that is not resuming."""
        config, model = self.config, self.model
        resolved: dict[str, Any] = {}
        if config.warm_start:
            source, _ = models.load_model_dir(config.warm_start, "best")
            model.backbone.set_weights(source.backbone.get_weights())
            model.head.set_weights(source.head.get_weights())
            resolved["warm_start"] = config.warm_start
        # The method's own start: IMCL fills its bank and calibrates its lambdas.
        resolved.update(model.method.prepare(model, self.run_context))
        return resolved

    def _read_train_subset(self, indices):
        """The training records at `indices`, in chunks (see RunContext.read_train_subset)."""
        return iter_split_subset(self.config.data_dir, "train", indices, self.image_size,
                                 self.image_classes, self.config.max_image_pixels)

    @property
    def divergence(self) -> dict[str, Any] | None:
        """The DivergenceGuard's record of the diverged step, or None."""
        guard = getattr(self, "guard", None)
        return guard.divergence if guard is not None else None

    def _keep_divergence_reference(self, loss: float) -> None:
        """Records the first step's loss in run_config.json, for the guard of a resumed run."""
        if not self.is_chief:
            return
        path = os.path.join(self.work_dir, RUN_CONFIG)
        run_config = read_json(path) or {}
        run_config[RUN_CONFIG_KEY] = loss
        write_json(path, run_config)

    def _write_run_config(self, previous: dict[str, Any]) -> None:
        run_config = {
            "config": dataclasses.asdict(self.config), "train_steps": self.train_steps,
            "eval_every": self.eval_every, "resolved": self.resolved,
            "freeze_batchnorm": self.freeze_batchnorm, "learning_rates": self.learning_rates,
            "num_replicas": self.num_replicas, "dataset": {
                "num_classes": self.info.num_classes, "num_train": self.num_train,
                "mode": self.info.mode, "image_size": self.image_size,
                "labels": self.info.labels},
            "created": previous.get("created", data_lib.utc_now()) if self.resumed_from
            else data_lib.utc_now(),
            "resumed": list(previous.get("resumed", [])) if self.resumed_from else [],
        }
        if self.resumed_from and RUN_CONFIG_KEY in previous:
            run_config[RUN_CONFIG_KEY] = previous[RUN_CONFIG_KEY]
        if self.resumed_from:
            run_config["resumed"].append({"at_step": self.start_step, "time": data_lib.utc_now()})
        if self.is_chief:
            write_json(os.path.join(self.work_dir, RUN_CONFIG), run_config)

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
            drop_remainder=training, deterministic=not training or self.config.deterministic,
            max_image_pixels=self.config.max_image_pixels,
            image_classes=self.image_classes if training else 0)

    def _train_dataset(self, seed, skip=0):
        """The training pipeline, `skip` batches in; under a strategy each worker reads its own
        shard FILES."""
        if not self.distributed:
            return self._dataset("train", training=True, seed=seed).skip(skip)
        config = self.config

        def per_worker(input_context):
            return data_lib.make_dataset(
                config.data_dir, "train", batch_size=config.batch_size,
                image_size=self.image_size, training=True, augment=config.augment, seed=seed,
                repeat=True, drop_remainder=True, deterministic=config.deterministic,
                max_image_pixels=config.max_image_pixels, input_context=input_context,
                image_classes=self.image_classes).skip(skip)

        return self.strategy.distribute_datasets_from_function(per_worker)

    # -- loop --

    def fit(self) -> None:
        """Trains interval by interval up to train_steps; validates and checkpoints after each."""
        config, model = self.config, self.model
        step = int(model.optimizer.iterations.numpy())
        self.clock = Clock(step, self.train_steps)
        # One display per run: an interval line after each validation and, with --verbose=1 on a
        # terminal, a live bar between them (Keras' own bar is off: verbose=0 below).
        bar = LiveBar(self.train_steps) if self.is_chief and shows_live_bar(config.verbose) \
            else None
        callbacks = self.callbacks + ([LiveBarCallback(bar)] if bar else [])
        while step < self.train_steps:
            interval_start = step // self.eval_every * self.eval_every
            interval_end = min(interval_start + self.eval_every, self.train_steps)
            # A seed per interval start, and the batches this interval already trained on
            # skipped: a run resumed inside an interval continues with the same input order
            # (exactly so with --deterministic).
            dataset = self._train_dataset(seed=config.seed + interval_start,
                                          skip=step - interval_start)
            self.clock.start_interval()
            if bar:
                bar.start_interval(step)
            model.fit(dataset, epochs=1, steps_per_epoch=interval_end - step,
                      callbacks=callbacks, verbose=0, shuffle=False)
            step = int(model.optimizer.iterations.numpy())
            if self.divergence is not None:
                # No evaluation, no checkpoint: the last checkpoint stays the last sound state.
                logging.warning("%s", self.guard.message(config.learning_rate,
                                                         self._last_checkpoint_step()))
                break
            self.clock.end_training(step)
            self._end_of_interval(step)
            self.clock.end_interval()
            if bar:
                bar.clear()
                bar.val_map = None if self.last_val is None else float(self.last_val["mAP"])
            if self.is_chief:
                if config.verbose:
                    print(self._progress_line(step), flush=True)
                else:
                    logging.info("%s", self._progress_line(step))

    def _export(self, final_step: int, trained: bool, previous: dict[str, Any]) -> str:
        """Exports the best model once per trained state; returns the version folder.

        The version about to be written is recorded in export.json first: a run killed after
        the export's final rename, before summary.json, finds it there when it is restarted and
        does not export the same model again as a new version.
        """
        from imcl_tf import export
        config = self.config
        record_path = os.path.join(self.work_dir, EXPORT_RECORD)
        record = read_json(record_path) or {}
        model_base = os.path.join(config.export_dir, config.export_model_name)
        if (record.get("step") == final_step and not trained
                and os.path.realpath(record.get("model_base", "")) == os.path.realpath(model_base)
                and os.path.isdir(record.get("version_dir", ""))):
            return record["version_dir"]  # exported before the kill: the same model
        earlier = (previous.get("files") or {}).get("export")
        if not trained and earlier and os.path.isdir(earlier):
            return earlier  # a finished run that was only re-opened
        version = export.next_version(model_base)
        version_dir = os.path.join(model_base, str(version))
        write_json(record_path, {"step": final_step, "model_base": model_base,
                                 "version_dir": version_dir})
        return export.export_from_model_dir(self.work_dir, config.export_dir,
                                            config.export_model_name, checkpoint="best",
                                            version=version)

    def _last_checkpoint_step(self) -> int | None:
        latest = tf.train.latest_checkpoint(os.path.join(self.work_dir, CHECKPOINT_DIR))
        return int(latest.rsplit("-", 1)[1]) if latest else None

    def _progress_line(self, step: int) -> str:
        line = f"step {step}/{self.train_steps} ({step / self.train_steps:.0%})"
        logs = self.monitor.last_logs
        if "loss" in logs:
            line += f" | loss {format_number(logs['loss'])}"
        if self.last_val is not None:
            line += (f" | val mAP {format_number(self.last_val['mAP'])} (best "
                     f"{format_number(self.schedule.best_map.numpy())} at step "
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
                self.schedule.update(val["mAP"], self.model.optimizer, self.config, step,
                                     others=list(self.model.part_optimizers.values()))
        self.manager.save(checkpoint_number=step)

    def validate(self) -> dict[str, Any]:
        passed = self._validation(self._dataset(self.config.val_split, training=False))
        scores, labels = passed["scores"], passed["labels"]
        per_class = metrics.per_class_ap(scores, labels)
        result = metrics.map_metrics(scores, labels, per_class)
        result["per_class_ap"] = per_class
        result.update(passed)
        return result

    # -- end --

    def finish(self) -> dict[str, Any]:
        config, model = self.config, self.model
        final_step = int(model.optimizer.iterations.numpy())
        best_path = os.path.join(self.work_dir, models.BEST_MODEL)
        latest_path = os.path.join(self.work_dir, models.LATEST_MODEL)
        previous = read_json(os.path.join(config.model_dir, SUMMARY_JSON)) or {}
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
        if self.divergence is not None:
            message = self.guard.message(config.learning_rate, self._last_checkpoint_step())
            summary["diverged"] = {**self.divergence, "message": message}
            if not config.export_diverged:
                self.monitor.close()
                if self.is_chief:
                    write_json(summary["summary_file"], summary)
                raise RunError(message)
            logging.warning("--export_diverged: exporting a diverged run.")
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
            files["export"] = self._export(final_step, trained, previous)
        summary["files"] = files
        summary["best_model"], summary["tensorboard"] = best_path, files["tensorboard"]
        summary["export"] = files.get("export")
        self.monitor.close()
        return summary

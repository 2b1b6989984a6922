"""The Keras callbacks of a training run: bank refresh, and TensorBoard logging plus checkpoints."""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from imcl_tf import metrics, models
from imcl_tf.training.run_files import FREQUENCY_CHART, LOG_DIR
from imcl_tf.training.scoring import predict_scores
from imcl_tf.training.split_reading import read_split_labels
from imcl_tf.training.summaries import write_pr_curves

if TYPE_CHECKING:
    from imcl_tf.training.trainer import _Trainer


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
        if step % trainer.config.checkpoint_every == 0 and trainer.divergence is None:
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

"""The Keras callback of every training run: TensorBoard logging plus checkpoints.

(A method's own callbacks, e.g. IMCL's bank refresh, live in its module.)
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import keras
import numpy as np
import tensorflow as tf

from imcl_tf import data as data_lib
from imcl_tf import metrics, models
from imcl_tf.label_graph import LabelGraph
from imcl_tf.training.class_choice import frequency_extremes, parse_class_list
from imcl_tf.training.hparams import BEST_MAP_TAG, curated_hparams, write_hparams
from imcl_tf.training.run_files import FREQUENCY_CHART, LOG_DIR
from imcl_tf.training.scoring import predict_scores
from imcl_tf.training.split_reading import count_split_labels
from imcl_tf.training.summaries import (ap_table_markdown, write_ap_table, write_label_graph,
                                        write_pr_curves, write_prediction_grid)

if TYPE_CHECKING:
    from imcl_tf.training.trainer import _Trainer


class TrainingMonitor(keras.callbacks.Callback):
    """TensorBoard logging (train/ and validation/ under model_dir/logs) and resumable checkpoints.

    train/: every loss part (no scalar twice: the OMP's after-residuals are L_y and L_f, and a
    logistic run's total loss is its BCE), the lambdas, learning rate, OMP statistics and, while
    the label graph learns, its statistics. validation/ at every evaluation: mAP (three
    conventions) and the best so far (the HParams metric), the validation losses under the
    train/ tags (masked BCE and IMCL's L_y and L_f), per-class AP as a histogram and a named
    table, PR curves of --pr_classes, the label graph as a heat map (IMCL with a graph), a grid
    of validation images with true and predicted labels (image mode), and with
    --control_model_dir the frequency-group chart against that control. The log root holds the
    HParams session (`imcl_tf.training.hparams`). Only the chief writes: the writers of other
    workers are no-ops.

    The validation losses are measured in inference mode (BatchNorm on its moving statistics),
    the training ones in training mode against a bank encoded in inference mode, so early in a
    run, before the moving statistics settle, the training L_f can be far above the validation
    one.
    """

    def __init__(self, trainer: _Trainer):
        super().__init__()
        self.trainer = trainer
        self.last_logs: dict[str, float] = {}
        self.control_ap = None
        self.control_names = None
        if not trainer.is_chief:
            self.train_writer = self.val_writer = self.run_writer = tf.summary.create_noop_writer()
            return
        config = trainer.config
        log_dir = os.path.join(trainer.work_dir, LOG_DIR)
        self.train_writer = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
        self.val_writer = tf.summary.create_file_writer(os.path.join(log_dir, "validation"))
        self.run_writer = tf.summary.create_file_writer(log_dir)
        self.train_positives, known, num_train = count_split_labels(config.data_dir, "train")
        self.pr_classes = (parse_class_list(config.pr_classes, trainer.info.class_names)
                           if config.pr_classes else frequency_extremes(self.train_positives))
        known_ratio = known.sum() / max(1, num_train * trainer.info.num_classes)
        write_hparams(self.run_writer, curated_hparams(
            config, train_steps=trainer.train_steps, image_size=trainer.image_size,
            known_ratio=known_ratio, resolved=trainer.resolved),
            trial_id=os.path.basename(os.path.normpath(config.model_dir)))

    def _skipped_logs(self) -> set[str]:
        """Keras logs that repeat another scalar exactly (written once, under the other name)."""
        skipped = {"residual_y_after", "residual_f_after"}  # = loss_y and loss_f by definition
        if tuple(self.model.method.TERMS) == ("bce",) and self.model.head_weight_decay == 0:
            skipped.add("loss")  # = bce
        return skipped

    def on_train_batch_end(self, batch, logs=None):
        trainer = self.trainer
        step = int(self.model.optimizer.iterations.numpy())
        logs = {key: float(value) for key, value in (logs or {}).items()}
        self.last_logs = logs
        if step % trainer.config.checkpoint_every == 0 and trainer.divergence is None:
            trainer.manager.save(checkpoint_number=step)
        first = step == trainer.start_step + 1
        if step % trainer.config.log_every and not first:
            return
        skipped = self._skipped_logs()
        with self.train_writer.as_default(step=step):
            for key, value in logs.items():
                if key in skipped:
                    continue
                group = "omp" if key.startswith(("omp_", "residual_")) else "loss"
                tf.summary.scalar(f"{group}/{key}", value)
            tf.summary.scalar("optimizer/learning_rate",
                              float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
            for tag, value in self.model.method.scalars().items():
                tf.summary.scalar(tag, value)
            graph = _label_graph(self.model)
            if graph is not None and (graph.learnable or first):  # a fixed graph's never change
                for key, value in graph.statistics().items():
                    if key != "num_parameters" or first:  # constant: written once
                        tf.summary.scalar(f"label_graph/{key}", value)
        self.train_writer.flush()

    def log_validation(self, step, val):
        if val is None or not self.trainer.is_chief:
            return
        trainer = self.trainer
        class_names = trainer.info.class_names
        per_class = val["per_class_ap"]
        control_ap = self._control_ap()
        with self.val_writer.as_default(step=step):
            for key in ("mAP", "mAP_all_classes", "mAP_label_weighted"):
                tf.summary.scalar(f"metrics/{key}", float(val[key]))
            best = float(trainer.schedule.best_map.numpy())
            if val["mAP"] > best:  # the trainer records the new best after this call
                best = float(val["mAP"])
            if best >= 0:
                tf.summary.scalar(BEST_MAP_TAG, best)
            for key, value in val["losses"].items():
                tf.summary.scalar(f"loss/{key}", value)  # beside the train run's same tags
            valid = per_class[np.isfinite(per_class)]
            if valid.size:
                tf.summary.histogram("metrics/per_class_ap", valid)
            write_ap_table(ap_table_markdown(per_class, val["labels"], class_names,
                                             self.train_positives, control_ap), step)
            write_pr_curves(val["scores"], val["labels"], class_names, step, self.pr_classes)
            graph = _label_graph(trainer.model)
            if graph is not None and graph.structure != "identity":
                write_label_graph(graph, class_names, self.train_positives, step)
            if val.get("images") is not None:
                write_prediction_grid(val["images"], val["labels"], val["scores"], class_names,
                                      step)
            if control_ap is not None:
                chart = self._frequency_chart(per_class, control_ap)
                tf.summary.image("metrics/frequency_group_gain", chart[None], max_outputs=1)
        self.val_writer.flush()  # (the progress line reports the validation mAP)

    def _control_ap(self):
        """Per-class validation AP of --control_model_dir's best model (computed once), or None."""
        trainer = self.trainer
        control_dir = trainer.config.control_model_dir
        if not control_dir:
            return None
        if self.control_ap is None:
            control, info = models.load_model_dir(control_dir, "best")
            dataset = data_lib.make_dataset(
                trainer.config.data_dir, trainer.config.val_split,
                batch_size=trainer.config.batch_size, image_size=info.get("image_size"),
                training=False, deterministic=True)
            scores, labels = predict_scores(control, dataset)
            self.control_ap = metrics.per_class_ap(scores, labels)
            self.control_names = metrics.comparison_names(trainer.config.method,
                                                          info.get("method", ""))
        return self.control_ap

    def _frequency_chart(self, per_class_ap, control_ap):
        """The supplement's Fig. 1 (left) against the control run, as an image tensor."""
        trainer = self.trainer
        num_groups = min(10, len(per_class_ap))
        groups = metrics.frequency_groups(self.train_positives, per_class_ap, control_ap,
                                          num_groups)
        png = os.path.join(trainer.work_dir, FREQUENCY_CHART)
        metrics.plot_frequency_groups(groups, png, *self.control_names)
        with open(png, "rb") as f:
            return tf.image.decode_png(f.read(), channels=4)

    def close(self):
        for writer in (self.train_writer, self.val_writer, self.run_writer):
            writer.close()


def _label_graph(model):
    """The method's label graph (an imcl_tf.label_graph.LabelGraph), if it has one."""
    graph = getattr(model.method, "label_graph", None)
    return graph if isinstance(graph, LabelGraph) else None

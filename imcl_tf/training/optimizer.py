"""The optimizers of a run (one per model part) and the paper's EMA-plateau learning-rate schedule.

A model has three parts with their own learning rates, as the official runs have (docs/method.md §5;
Open Images end-to-end: backbone 1e-8, head 1e-3, graph 0.5): the backbone, the head (the
classifier, and any other trainable weight) and the label graph. The graph always gets an optimizer
of its own (--graph_optimizer, RMSProp in the official code) so that its step scales with its
gradient and therefore with lambda_y: under Adam the step would be about the learning rate whatever
lambda_y is.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf
from absl import logging

from imcl_tf.choices import LR_SCHEDULES, OPTIMIZERS

PLATEAU_FACTOR = 0.8  # the official code's LearningRate helper always multiplies by 0.8
PARTS = ("backbone", "head", "graph")
# RMSProp of the official code (tf.compat.v1.train.RMSPropOptimizer, the Open Images checkpoint's
# recipe): decay 0.9, momentum 0.9, epsilon 1.0.
RMSPROP_DECAY, RMSPROP_MOMENTUM, RMSPROP_EPSILON = 0.9, 0.9, 1.0


@keras.saving.register_keras_serializable(package="imcl_tf")
class OfficialRMSprop(keras.optimizers.RMSprop):
    """Keras RMSprop whose mean-square accumulator starts at 1, as TF1's RMSPropOptimizer does.

    The update is TF1's (and Keras'): ms <- rho ms + (1 - rho) g^2,
    mom <- momentum mom + lr g / sqrt(ms + epsilon), w <- w - mom. Keras starts ms at 0, TF1 at 1;
    with epsilon 1.0 that changes the first steps by up to sqrt(2), so the official start is kept.
    """

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        for velocity in self._velocities:
            velocity.assign(tf.ones_like(velocity))


def make_optimizer(name: str, learning_rate: float, flag: str = "optimizer"
                   ) -> keras.optimizers.Optimizer:
    """The optimizer named by --optimizer (or --graph_optimizer: `flag` names it in errors)."""
    if name == "rmsprop":  # the recipe of the paper's runs (docs/method.md §4)
        return OfficialRMSprop(learning_rate, rho=RMSPROP_DECAY, momentum=RMSPROP_MOMENTUM,
                               epsilon=RMSPROP_EPSILON)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    raise ValueError(f"--{flag}: must be one of {', '.join(OPTIMIZERS)}; received {name!r}.")


@dataclasses.dataclass(frozen=True)
class PartLearningRates:
    """Base learning rate of each part; 0 freezes the part (no gradient, no optimizer)."""
    backbone: float
    head: float
    graph: float


def part_learning_rates(config) -> PartLearningRates:
    """The per-part base learning rates of a TrainConfig: a negative value means --learning_rate."""
    def resolve(value):
        return config.learning_rate if value < 0 else value
    return PartLearningRates(backbone=resolve(config.backbone_learning_rate),
                             head=resolve(config.head_learning_rate),
                             graph=resolve(config.graph_learning_rate))


def make_part_optimizers(config, rates: PartLearningRates, graph_learnable: bool):
    """(head optimizer, {part: optimizer}) for the backbone and graph parts that train.

    The head's optimizer is the model's own (`model.optimizer`, whose step counter is the run's);
    the backbone gets one of the same kind (--optimizer) with its own rate when that differs
    from the head's (with the same rate it shares the head's: the same update, one set of slots)
    and none when it is frozen; the graph gets --graph_optimizer with its rate when it is learned.
    """
    head = make_optimizer(config.optimizer, rates.head)
    parts = {}
    if rates.backbone > 0 and rates.backbone != rates.head:
        parts["backbone"] = make_optimizer(config.optimizer, rates.backbone)
    if graph_learnable and rates.graph > 0:
        parts["graph"] = make_optimizer(config.graph_optimizer, rates.graph, "graph_optimizer")
    return head, parts


class PlateauState(tf.Module):
    """State of the paper's EMA-plateau learning-rate rule (docs/method.md §4), checkpointed."""

    def __init__(self):
        super().__init__()
        self.ema = tf.Variable(0.0, trainable=False, dtype=tf.float64)
        self.cooldown = tf.Variable(0, trainable=False, dtype=tf.int64)
        self.best_map = tf.Variable(-1.0, trainable=False, dtype=tf.float64)
        self.best_step = tf.Variable(0, trainable=False, dtype=tf.int64)

    def update(self, val_map, optimizer, config, step, others=()):
        """E <- (1 - a) E + a mAP; if E dropped, the floor allows and no cooldown: lr x 0.8.

        `optimizer` is the head's (model.optimizer): the floor (--plateau_min_lr, or 1e-3 x its
        base rate) is checked on its rate. The optimizers in `others` (the backbone's and graph's)
        are scaled by the same factor, so the parts keep their ratios, as in the official code.
        """
        previous = float(self.ema.numpy())
        ema = (1 - config.plateau_alpha) * previous + config.plateau_alpha * val_map
        self.ema.assign(ema)
        learning_rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        floor = config.plateau_min_lr or 1e-3 * part_learning_rates(config).head
        if (ema < previous and learning_rate >= floor
                and int(self.cooldown.numpy()) <= 0 and step >= config.plateau_start_step):
            for each in (optimizer, *others):
                rate = float(keras.ops.convert_to_numpy(each.learning_rate))
                each.learning_rate.assign(rate * PLATEAU_FACTOR)
            self.cooldown.assign(config.plateau_patience)
            logging.info("plateau: learning rate %.3g -> %.3g", learning_rate,
                         learning_rate * PLATEAU_FACTOR)
        self.cooldown.assign_sub(1)

"""The optimizer named by --optimizer and the paper's EMA-plateau learning-rate schedule."""

from __future__ import annotations

import keras
import tensorflow as tf
from absl import logging

from imcl_tf.choices import LR_SCHEDULES, OPTIMIZERS

PLATEAU_FACTOR = 0.8  # the official code's LearningRate helper always multiplies by 0.8


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """The optimizer named by --optimizer."""
    if name == "rmsprop":  # the recipe of the paper's runs (docs/method.md §4)
        return keras.optimizers.RMSprop(learning_rate, rho=0.9, momentum=0.9, epsilon=1.0)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate)
    raise ValueError(f"--optimizer: must be one of {', '.join(OPTIMIZERS)}; received {name!r}.")


class PlateauState(tf.Module):
    """State of the paper's EMA-plateau learning-rate rule (docs/method.md §4), checkpointed."""

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

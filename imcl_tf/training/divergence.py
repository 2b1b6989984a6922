"""Divergence: a training whose loss explodes is stopped, and is not exported unless forced.

The rule: the run has diverged at the first step whose training loss (the running mean Keras
logs within an evaluation interval) is not finite, or is more than DIVERGENCE_FACTOR times
max(the loss of the run's first step, 1). A loss does not grow a thousand-fold from its
starting value in a healthy run (the masked BCE starts near log 2 per known label and falls),
while a learning rate far too high (--learning_rate=1e6) drives it to 1e10 within a few steps
and keeps it finite. The floor of 1 keeps a run that starts at a tiny loss from being called
diverged over noise. The first step's loss is kept in run_config.json, so a resumed run is
judged against the same reference.
"""

from __future__ import annotations

import math
from typing import Any

import keras

DIVERGENCE_FACTOR = 1e3
REFERENCE_FLOOR = 1.0
RUN_CONFIG_KEY = "divergence_reference_loss"  # in run_config.json


def diverged(loss: float, reference: float | None) -> bool:
    """Whether `loss` breaks the rule above against the first step's loss `reference`."""
    if not math.isfinite(loss):
        return True
    if reference is None:
        return False
    return loss > DIVERGENCE_FACTOR * max(reference, REFERENCE_FLOOR)


class DivergenceGuard(keras.callbacks.Callback):
    """Stops `model.fit` at the first diverged step and records it in `self.divergence`.

    `reference` is the first step's loss of an earlier session of the run (None for a new run:
    the first batch seen sets it); `on_reference(value)` is called when it is set, to keep it.
    """

    def __init__(self, reference: float | None = None, on_reference=None):
        super().__init__()
        self.reference = reference
        self.on_reference = on_reference
        self.divergence: dict[str, Any] | None = None

    def on_train_batch_end(self, batch, logs=None):
        if not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        step = int(self.model.optimizer.iterations.numpy())
        if self.reference is None and math.isfinite(loss):
            self.reference = loss
            if self.on_reference is not None:
                self.on_reference(loss)
        if diverged(loss, self.reference):
            self.divergence = {"step": step, "loss": loss, "reference_loss": self.reference,
                               "factor": DIVERGENCE_FACTOR}
            self.model.stop_training = True

    def message(self, learning_rate: float, last_checkpoint_step: int | None) -> str:
        """What happened and what to do, for the error and the summary."""
        d = self.divergence
        if not math.isfinite(d["loss"]):
            what = f"the loss is {d['loss']}"
        else:
            what = (f"the loss {d['loss']:.3g} is over {DIVERGENCE_FACTOR:g} x max(the first "
                    f"step's loss {d['reference_loss']:.3g}, {REFERENCE_FLOOR:g})")
        kept = (f"; the last checkpoint (step {last_checkpoint_step}) is from before it"
                if last_checkpoint_step else "")
        return (f"training diverged at step {d['step']}: {what}. The learning rate "
                f"(--learning_rate={learning_rate:g}) is probably too high: lower it and train "
                f"into a new --model_dir{kept}. Nothing was exported (--export_diverged "
                "exports anyway).")

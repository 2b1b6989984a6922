"""The progress display of a run: speed and ETA (Clock) and the Keras verbosity to use."""

from __future__ import annotations

import math
import sys
import time

from imcl_tf.training.report import format_duration


class Clock:
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
        return (f"{per_step:.3f} s/step | elapsed {format_duration(time.time() - self.started)} | "
                f"ETA {format_duration(eta)}")


def keras_verbose(verbose: int) -> int:
    """A progress bar on a terminal; in a log file its carriage returns pile up, so one line."""
    if verbose == 1 and not (hasattr(sys.stdout, "isatty") and sys.stdout.isatty()):
        return 2
    return verbose

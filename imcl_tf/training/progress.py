"""The progress display of a run: one line per evaluation interval (speed and ETA from Clock)
and, on a terminal, one live bar for the whole run (LiveBar, fed by LiveBarCallback).

Keras' own progress bar is off (it restarted at every interval and repeated the numbers).
"""

from __future__ import annotations

import math
import sys
import time

import keras

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


def shows_live_bar(verbose: int, stream=None) -> bool:
    """--verbose=1 on a terminal: a live bar between the interval lines (in a log file the
    carriage returns would pile up, so there only the lines)."""
    stream = sys.stdout if stream is None else stream
    return verbose == 1 and hasattr(stream, "isatty") and stream.isatty()


class LiveBar:
    """One progress bar for the whole run, redrawn in place on a terminal (Keras-style):

        step 140/300 [=========>..........] 47% | loss 0.4321 | val mAP 0.6123 | ETA 0:00:38

    It continues across evaluation intervals (no restart at 0), shows the latest validation mAP,
    and is wiped before an interval line is printed. Redraws at most every `min_seconds`.
    """

    def __init__(self, total_steps: int, stream=None, width: int = 24, min_seconds: float = 0.25):
        self.total_steps = max(total_steps, 1)
        self.stream = sys.stdout if stream is None else stream
        self.width = width
        self.min_seconds = min_seconds
        self.val_map: float | None = None
        self._drawn = 0
        self._last_draw = 0.0
        self._rate_mark: tuple[int, float] | None = None

    def start_interval(self, step: int) -> None:
        self._rate_mark = (step, time.time())

    def update(self, step: int, loss: float | None = None) -> None:
        now = time.time()
        if now - self._last_draw < self.min_seconds and step < self.total_steps:
            return
        self._last_draw = now
        self.draw(self.text(step, loss, now))

    def text(self, step: int, loss: float | None, now: float) -> str:
        done = min(step / self.total_steps, 1.0)
        filled = int(done * self.width)
        bar = "=" * filled + (">" if filled < self.width else "") + "." * max(
            self.width - filled - 1, 0)
        text = f"step {step}/{self.total_steps} [{bar}] {done:.0%}"
        if loss is not None and math.isfinite(loss):
            text += f" | loss {loss:.4f}"
        if self.val_map is not None:
            text += f" | val mAP {self.val_map:.4f}"
        if self._rate_mark and step > self._rate_mark[0]:
            per_step = (now - self._rate_mark[1]) / (step - self._rate_mark[0])
            text += f" | ETA {format_duration(per_step * (self.total_steps - step))}"
        return text

    def draw(self, text: str) -> None:
        padding = " " * max(self._drawn - len(text), 0)
        self.stream.write("\r" + text + padding)
        self.stream.flush()
        self._drawn = len(text)

    def clear(self) -> None:
        """Wipes the bar so that a normal line can be printed in its place."""
        if self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self.stream.flush()
            self._drawn = 0


class LiveBarCallback(keras.callbacks.Callback):
    """Feeds a LiveBar with the optimizer step and the loss after every batch."""

    def __init__(self, bar: LiveBar):
        super().__init__()
        self.bar = bar

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        self.bar.update(int(self.model.optimizer.iterations.numpy()),
                        None if loss is None else float(loss))

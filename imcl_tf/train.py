"""Training application: `python -m imcl_tf.train --flagfile=configs/<name>.flags [--flag=...]`.

Trains the logistic baseline or IMCL (optionally both: `--method=imcl --warm_start=auto` runs the
paper's two-stage recipe), validates by mAP at every evaluation interval, logs to TensorBoard
under model_dir, checkpoints so that a killed run resumes where it was, keeps the best model by
validation mAP and exports it as a SavedModel for TensorFlow Serving.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

from absl import app, flags, logging

from imcl_tf import train_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines one absl flag per TrainConfig field (defaults and help come from the dataclass)."""
    for field in dataclasses.fields(train_lib.TrainConfig):
        if field.name in FLAGS:
            continue
        default = field.default
        help_text = field.metadata.get("help", field.name)
        choices = field.metadata.get("choices")
        if choices:
            flags.DEFINE_enum(field.name, default, choices, help_text)
        elif isinstance(default, bool):
            flags.DEFINE_bool(field.name, default, help_text)
        elif isinstance(default, int):
            flags.DEFINE_integer(field.name, default, help_text)
        elif isinstance(default, float):
            flags.DEFINE_float(field.name, default, help_text)
        else:
            flags.DEFINE_string(field.name, default, help_text)


def config_from_flags() -> train_lib.TrainConfig:
    values = {f.name: FLAGS[f.name].value for f in dataclasses.fields(train_lib.TrainConfig)}
    return train_lib.TrainConfig(**values)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}; every option is a "
                             "--flag (see --helpfull).")
    config = config_from_flags()
    try:
        config.validate()
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    started = time.time()
    summary = train_lib.run(config)
    summary["wall_seconds"] = round(time.time() - started, 1)
    print(train_lib.format_summary(summary))
    print(json.dumps({"summary_file": summary.get("summary_file")}))


def run_cli() -> None:
    define_flags()
    logging.set_verbosity(logging.INFO)
    app.run(main)


if __name__ == "__main__":
    sys.exit(run_cli())

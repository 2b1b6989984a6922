"""Training application: `python -m imcl_tf.train --flagfile=configs/<name>.flags [--flag=...]`.

Trains the logistic baseline or IMCL (optionally both: `--method=imcl --warm_start=auto` runs the
paper's two-stage recipe), validates by mAP at every evaluation interval, logs to TensorBoard
under model_dir, checkpoints so that a killed run resumes where it was, keeps the best model by
validation mAP and exports it as a SavedModel for TensorFlow Serving.

Every option is a flag (one per `TrainConfig` field; `--helpfull` lists them). Flags are
read left to right and the last value wins, so `--flagfile=configs/cub.flags --k=5` overrides the
file's k. A flagfile may include another with a `--flagfile=...` line; a relative path there is
looked up next to the including file first, then in the working directory.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Sequence

from absl import app, flags, logging

from imcl_tf.training.config import TrainConfig
from imcl_tf.training.report import format_summary
from imcl_tf.training.run_files import RunError
from imcl_tf.training.trainer import run

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines one absl flag per TrainConfig field (defaults and help come from the dataclass).

    `flag_values` lets tests parse into a fresh FlagValues; a flag already defined is kept.
    """
    for field in dataclasses.fields(TrainConfig):
        if field.name in flag_values:
            continue
        default = field.default
        help_text = field.metadata.get("help", field.name)
        choices = field.metadata.get("choices")
        kwargs = {"flag_values": flag_values}
        if choices:
            flags.DEFINE_enum(field.name, default, choices, help_text, **kwargs)
        elif isinstance(default, bool):
            flags.DEFINE_bool(field.name, default, help_text, **kwargs)
        elif isinstance(default, int):
            flags.DEFINE_integer(field.name, default, help_text, **kwargs)
        elif isinstance(default, float):
            flags.DEFINE_float(field.name, default, help_text, **kwargs)
        else:
            flags.DEFINE_string(field.name, default, help_text, **kwargs)


def config_from_flags(flag_values: flags.FlagValues = FLAGS) -> TrainConfig:
    """The TrainConfig of parsed flags."""
    values = {f.name: flag_values[f.name].value for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**values)


def expand_flagfiles(argv: Sequence[str], *, _stack: tuple[str, ...] = ()) -> list[str]:
    """argv with every `--flagfile=PATH` replaced, in place, by the flags that file sets.

    Same syntax as absl's flagfiles (one flag per line; blank lines and lines starting with `#` or
    `//` are skipped) and the same order, so later flags still override earlier ones. A nested
    `--flagfile` with a relative path is resolved against the including file's folder when it
    exists there, so configs can include each other whatever the working directory.

    Raises:
      flags.CantOpenFlagFileError: a file is missing or includes itself (the include chain is
        named).
    """
    expanded: list[str] = []
    arguments = list(argv)
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        path = None
        if argument in ("--flagfile", "-flagfile"):
            if index + 1 >= len(arguments):
                raise flags.CantOpenFlagFileError("--flagfile needs a file name.")
            path = arguments[index + 1]
            index += 1
        elif argument.startswith(("--flagfile=", "-flagfile=")):
            path = argument.split("=", 1)[1]
        index += 1
        if path is None:
            expanded.append(argument)
            continue
        if not path.strip():
            continue  # absl ignores an empty --flagfile= too
        path = _resolve_flagfile(os.path.expanduser(path.strip()), _stack)
        expanded.extend(expand_flagfiles(_flagfile_lines(path), _stack=_stack + (path,)))
    return expanded


def _resolve_flagfile(path: str, stack: tuple[str, ...]) -> str:
    if stack and not os.path.isabs(path):
        beside = os.path.join(os.path.dirname(stack[-1]), path)
        if os.path.exists(beside):
            path = beside
    path = os.path.abspath(path)
    chain = " -> ".join(stack + (path,))
    if path in stack:
        raise flags.CantOpenFlagFileError(f"flagfile includes itself: {chain}.")
    if not os.path.isfile(path):
        raise flags.CantOpenFlagFileError(
            f"flagfile {path!r} does not exist" + (f" (included by {chain})." if stack else "."))
    return path


def _flagfile_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    return [line for line in lines if line and not line.startswith(("#", "//"))]


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """Parses argv (program name first) with flagfiles expanded; returns the positional rest."""
    return flag_values([argv[0]] + expand_flagfiles(argv[1:]))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}; every option is a "
                             "--flag (see --helpfull).")
    config = config_from_flags()
    try:
        config.validate()
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    try:
        summary = run(config)
    except RunError as e:  # the folder is in use, or the run diverged: one line, status 1
        print(f"imcl_tf.train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if summary.get("is_chief", True):
        print(format_summary(summary), flush=True)


def run_cli() -> None:
    define_flags()
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    sys.exit(run_cli())

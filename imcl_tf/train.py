"""Training application: `imcl-train --flagfile=demo [--flag=...]` (or `python -m imcl_tf.train`).

Trains the logistic baseline or IMCL (optionally both: `--method=imcl --warm_start=auto` runs the
paper's two-stage recipe), validates by mAP at every evaluation interval, logs to TensorBoard
under model_dir, checkpoints so that a killed run resumes where it was, keeps the best model by
validation mAP and exports it as a SavedModel for TensorFlow Serving.

Every option is a flag (one per `TrainConfig` field). Flags are read left to right and the last
value wins, so `--flagfile=cub --k=5` overrides the config's k. `--flagfile` takes a path or the
name of a config shipped with the package (demo, cub, coco, openimages, voc, paper_common); a
flagfile may include another with a `--flagfile=...` line, looked up next to the including file
first. `--debug` shows Python tracebacks of errors.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence

from absl import app, flags, logging

from imcl_tf import console, flagfiles
from imcl_tf.methods import registry as method_registry
from imcl_tf.training.config import TrainConfig

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines one absl flag per TrainConfig field (defaults and help come from the dataclass).

    `flag_values` lets tests parse into a fresh FlagValues; a flag already defined is kept.
    """
    declared = [(field.name, field.default, field.metadata.get("help", field.name),
                 field.metadata.get("choices"))
                for field in dataclasses.fields(TrainConfig) if not field.metadata.get("not_a_flag")]
    # Each method's own options (imcl_tf.methods.registry; read without importing TensorFlow).
    declared += [(option.name, option.default, f"[--method={option.method}] {option.help}",
                  option.choices) for option in method_registry.all_options()]
    for name, default, help_text, choices in declared:
        if name in flag_values:
            continue
        kwargs = {"flag_values": flag_values}
        if choices:
            flags.DEFINE_enum(name, default, list(choices), help_text, **kwargs)
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_text, **kwargs)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_text, **kwargs)
        elif isinstance(default, float):
            flags.DEFINE_float(name, default, help_text, **kwargs)
        else:
            flags.DEFINE_string(name, default, help_text, **kwargs)


def config_from_flags(flag_values: flags.FlagValues = FLAGS) -> TrainConfig:
    """The TrainConfig of parsed flags."""
    values = {f.name: flag_values[f.name].value for f in dataclasses.fields(TrainConfig)
              if not f.metadata.get("not_a_flag")}
    # The method options given on the command line (or in a flagfile); the rest take defaults.
    values["method_options"] = {
        option.name: flag_values[option.name].value for option in method_registry.all_options()
        if option.name in flag_values and flag_values[option.name].present}
    return TrainConfig(**values)


def expand_flagfiles(argv: Sequence[str]) -> list[str]:
    """argv with every `--flagfile=PATH` replaced, in place, by the flags that file sets.

    A flagfile is a path or the name of a shipped config (`--flagfile=demo`); a nested
    `--flagfile` is looked up next to the including file first (`imcl_tf.flagfiles`).

    Raises:
      flags.CantOpenFlagFileError: a file is missing or includes itself (the include chain is
        named).
    """
    return [argument.text for argument in flagfiles.expand_flagfiles(argv)]


# Where each flag of the latest parse_flags came from, for error messages (FILE:LINE).
_last_arguments: list[flagfiles.Argument] = []


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = FLAGS) -> list[str]:
    """Parses argv (program name first) with flagfiles expanded; returns the positional rest."""
    _last_arguments[:] = flagfiles.expand_flagfiles(argv[1:])
    return flag_values([argv[0]] + [argument.text for argument in _last_arguments])


def flag_origin(name: str) -> str | None:
    """`FILE:LINE` of the flagfile line that set flag `name` in the latest parse, or None."""
    return flagfiles.origin_of_flag(_last_arguments, name)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments {argv[1:]}; every option is a "
                             "--flag.")
    config = config_from_flags()
    try:
        config.validate_options()  # before TensorFlow is imported: a typo answers at once
        console.import_tensorflow_quietly()
        config.validate()
    except ValueError as e:
        name = str(e).split(":", 1)[0].lstrip("-")
        origin = flag_origin(name)
        raise app.UsageError(f"{origin}: {e}" if origin else str(e)) from e
    from imcl_tf.training.report import format_summary
    from imcl_tf.training.run_files import RunError
    from imcl_tf.training.trainer import run

    try:
        summary = run(config)
    except RunError as e:  # the folder is in use, or the run diverged: one line, status 1
        print(f"imcl_tf.train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    if summary.get("is_chief", True):
        print(format_summary(summary), flush=True)


def run_cli() -> None:
    """The `imcl-train` command."""
    define_flags()
    logging.set_verbosity(logging.INFO)
    console.run_app(main, program="imcl-train", flags_parser=parse_flags,
                    flag_origins=flag_origin, flag_modules=[__name__],
                    needs_tensorflow=False)


if __name__ == "__main__":
    sys.exit(run_cli())

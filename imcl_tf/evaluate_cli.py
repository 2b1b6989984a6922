"""The `imcl-evaluate` command (also `python -m imcl_tf.evaluate`): flags and main.

    imcl-evaluate --model_dir=runs/imcl --data_dir=data/demo --split=test
        [--baseline_model_dir=runs/logistic] [--output_dir=...] [--checkpoint=best]
        [--output=visual]

The evaluation itself is `imcl_tf.evaluate.evaluate_model_dir` (its docstring lists the files
written). This module imports no TensorFlow until the flags and folders are checked, so
`--help` is fast.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app, flags

from imcl_tf import console

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    def define(kind, name, default, help_text, **kwargs):
        if name not in flag_values:
            kind(name=name, default=default, help=help_text, flag_values=flag_values, **kwargs)

    define(flags.DEFINE_string, "model_dir", None, "Training run folder to evaluate (written by "
           "imcl-train).", required=True)
    define(flags.DEFINE_string, "data_dir", None, "Dataset folder (dataset.json + TFRecord "
           "shards).", required=True)
    define(flags.DEFINE_string, "split", "test", "Split of the dataset to evaluate on.")
    define(flags.DEFINE_string, "output_dir", None, "Where the results go; default "
           "<model_dir>/eval/<split>.")
    define(flags.DEFINE_string, "baseline_model_dir", None, "A baseline run (e.g. "
           "--method=logistic) evaluated the same way: adds deltas and frequency groups.")
    define(flags.DEFINE_string, "baseline_name", None, "The baseline's name on the frequency "
           "chart (e.g. 'Logistic (control)'); default its method's name.")
    define(flags.DEFINE_enum, "checkpoint", "best", "Which saved model of the run(s).",
           enum_values=["best", "latest"])
    define(flags.DEFINE_integer, "num_groups", 10, "Frequency groups (5 in the paper, 10 in its "
           "supplement).", lower_bound=1)
    define(flags.DEFINE_integer, "batch_size", 64, "Images per forward pass.", lower_bound=1)
    define(flags.DEFINE_string, "train_split", "train", "Split whose known positives order the "
           "classes into frequency groups.")
    define(flags.DEFINE_string, "output", None, "Which of the run's method outputs scores the "
           "images (--method=latent_noise: relevant or visual); default the one the run saved, "
           "its method's first. The baseline run keeps its own.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}; every option is a --flag.")
    for name in ("model_dir", "baseline_model_dir"):
        path = FLAGS[name].value
        if path and not os.path.isdir(path):
            raise ValueError(f"--{name}={path!r} is not a folder; give the model_dir of a run "
                             "written by imcl-train.")
    if not os.path.isdir(FLAGS.data_dir):
        raise ValueError(f"--data_dir={FLAGS.data_dir!r} is not a folder; give a dataset folder "
                         "written by imcl-data.")
    console.import_tensorflow_quietly()
    from imcl_tf import evaluate

    result = evaluate.evaluate_model_dir(
        FLAGS.model_dir, FLAGS.data_dir, split=FLAGS.split, output_dir=FLAGS.output_dir,
        baseline_model_dir=FLAGS.baseline_model_dir, checkpoint=FLAGS.checkpoint,
        num_groups=FLAGS.num_groups, batch_size=FLAGS.batch_size, train_split=FLAGS.train_split,
        output=FLAGS.output, baseline_name=FLAGS.baseline_name)
    print(evaluate.format_summary(result))


def run_cli() -> None:
    """The `imcl-evaluate` command."""
    define_flags()
    console.run_app(main, program="imcl-evaluate", flag_modules=[__name__],
                    needs_tensorflow=False)


if __name__ == "__main__":
    run_cli()

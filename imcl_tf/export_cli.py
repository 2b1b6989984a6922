"""The `imcl-export` command (also `python -m imcl_tf.export`): flags and main.

    imcl-export --model_dir=runs/demo --export_base=exports --model_name=demo

writes `<export_base>/<model_name>/<version>/`, a SavedModel for TensorFlow Serving
(`imcl_tf.export` describes its signatures). No TensorFlow import until the flags and the run
folder are checked.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app, flags

from imcl_tf import console
from imcl_tf.image_header import DEFAULT_MAX_IMAGE_PIXELS

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    def define(kind, name, default, help_text, **kwargs):
        if name not in flag_values:
            kind(name=name, default=default, help=help_text, flag_values=flag_values, **kwargs)

    define(flags.DEFINE_string, "model_dir", None, "Training run folder to export (written by "
           "imcl-train).", required=True)
    define(flags.DEFINE_string, "export_base", None, "Folder of served models (TF Serving's base "
           "path parent): the export goes to <export_base>/<model_name>/<version>.",
           required=True)
    define(flags.DEFINE_string, "model_name", None, "Served model name.", required=True)
    define(flags.DEFINE_integer, "version", None, "Version number; default 1 + the highest "
           "existing.", lower_bound=1)
    define(flags.DEFINE_enum, "checkpoint", "best", "Which saved model of the run to export.",
           enum_values=["best", "latest"])
    define(flags.DEFINE_integer, "top_k", 5, "K of the top_k_* outputs.", lower_bound=1)
    define(flags.DEFINE_integer, "max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS,
           "The image signatures refuse an image whose header declares more pixels (width x "
           "height), before decoding it.", lower_bound=1)
    define(flags.DEFINE_string, "output", None, "Which of the run's method outputs the "
           "signatures serve (--method=latent_noise: relevant or visual); default the one the "
           "run saved, its method's first.")


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}; every option is a --flag.")
    if not os.path.isdir(FLAGS.model_dir):
        raise ValueError(f"--model_dir={FLAGS.model_dir!r} is not a folder; give the model_dir "
                         "of a run written by imcl-train.")
    console.import_tensorflow_quietly()
    from imcl_tf import export

    version_dir = export.export_from_model_dir(
        FLAGS.model_dir, FLAGS.export_base, FLAGS.model_name, checkpoint=FLAGS.checkpoint,
        version=FLAGS.version, top_k=FLAGS.top_k, max_image_pixels=FLAGS.max_image_pixels,
        output=FLAGS.output)
    print(version_dir)


def run_cli() -> None:
    """The `imcl-export` command."""
    define_flags()
    console.run_app(main, program="imcl-export", flag_modules=[__name__],
                    needs_tensorflow=False)


if __name__ == "__main__":
    run_cli()

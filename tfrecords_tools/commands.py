"""`imcl-data TOOL [--flags]`: every dataset tool behind one command, one subcommand per tool.

    imcl-data                      lists the tools
    imcl-data voc --help           a tool's flags
    imcl-data partial --input_dir=... --output_dir=... --known_ratio=0.3

`python -m tfrecords_tools.<tool>` runs the same code. The list of tools, a usage mistake and a
tool's --help answer without importing TensorFlow (the tools define their flags without it); a
tool itself imports it (quietly) before it starts.
"""

from __future__ import annotations

import importlib
import sys
from typing import Callable, Sequence

from imcl_tf import console

PROGRAM = "imcl-data"

# Subcommand -> (module, one line on what it does). The converters write a dataset folder.
TOOLS = {
    "voc": ("tfrecords_tools.voc", "PASCAL VOC 2007/2012 classification labels -> dataset"),
    "coco": ("tfrecords_tools.coco", "MS-COCO instances (80 object classes) -> dataset"),
    "coco_captions": ("tfrecords_tools.coco_captions",
                      "MS-COCO captions -> caption-word labels (the paper's 1k words)"),
    "cub": ("tfrecords_tools.cub", "CUB-200-2011 attributes (312 labels) -> dataset"),
    "openimages": ("tfrecords_tools.openimages",
                   "Open Images human-verified labels (partial by nature) -> dataset"),
    "manifest": ("tfrecords_tools.manifest",
                 "your own images with a CSV or JSONL list of labels -> dataset"),
    "arrays": ("tfrecords_tools.arrays",
               "precomputed features + a label matrix (.npy/CSV) -> features dataset"),
    "fashion_scenes": ("tfrecords_tools.fashion_scenes",
                       "the demo dataset: scenes of Fashion-MNIST items"),
    "fashion_pretrain": ("tfrecords_tools.fashion_pretrain",
                         "pretrain the demo CNN on Fashion-MNIST items no scene uses"),
    "partial": ("tfrecords_tools.partial",
                "hide labels of a dataset (partial-label protocols, reproducible)"),
    "extract_features": ("tfrecords_tools.extract_features",
                         "image dataset -> features dataset of a fixed backbone"),
    "inspect": ("tfrecords_tools.inspect", "verify a dataset folder and print its statistics"),
}


def usage() -> str:
    width = max(len(name) for name in TOOLS)
    lines = [f"usage: {PROGRAM} TOOL [--flag=value ...]   ({PROGRAM} TOOL --help: the tool's "
             "flags)", "", "tools:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in TOOLS.items()]
    return "\n".join(lines)


_HELP_FLAGS = ("help", "helpshort", "helpfull", "helpxml", "?")


def asks_for_help(arguments: Sequence[str]) -> bool:
    """Whether absl will print a help page and exit for these arguments (no TensorFlow needed)."""
    for argument in arguments:
        if argument == "--":
            break
        if argument.startswith("-") and argument.lstrip("-").split("=")[0] in _HELP_FLAGS:
            return True
    return False


def run_tool(name: str, define_flags: Callable[[], None],
             main: Callable[[Sequence[str]], None]) -> None:
    """Runs a tool's absl `main` as the console commands run theirs (`imcl_tf.console`)."""
    define_flags()
    module = TOOLS[name][0] if name in TOOLS else name
    console.run_app(main, program=f"{PROGRAM} {name}",
                    flag_modules=[module, "tfrecords_tools.common"])


def run_cli(argv: Sequence[str] | None = None) -> None:
    """The `imcl-data` command."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help", "-?"):
        print(usage())
        raise SystemExit(0 if len(argv) >= 2 else 2)
    name = argv[1]
    if name not in TOOLS:
        close = [tool for tool in TOOLS if tool.startswith(name[:3])]
        console.fail(PROGRAM, f"no tool {name!r}" + (f" (did you mean {', '.join(close)}?)"
                                                     if close else "") + "; the tools are "
                     f"{', '.join(TOOLS)}.", console.USAGE_EXIT)
    console.quiet_tensorflow()
    if not asks_for_help(argv[2:]):
        console.import_tensorflow_quietly()
    module = importlib.import_module(TOOLS[name][0])
    sys.argv = [f"{PROGRAM} {name}"] + argv[2:]
    main_module = sys.modules.get("__main__")
    if main_module is not None:  # absl's --help prints the main module's docstring
        main_module.__doc__ = module.__doc__
    run_tool(name, module.define_flags, module.main)


if __name__ == "__main__":
    run_cli()

"""The registry of training methods: one line a method, free of TensorFlow.

Each method is one module of `imcl_tf.methods` (its loss, any head or state of its own, its
options). This file names them; `imcl_tf.methods.get(name)` imports the module and returns its
`Method` class. Adding a method is its module, its tests and one line of METHODS below.

A method's options are declared in its module as a literal tuple

    OPTIONS = (
        ("lsep_negatives", 0, "Sampled negatives per positive (0: all).", None),
        ...
    )

of (flag name, default, help, choices or None[, "required"]); every option becomes a flag of
`imcl-train`. A "required" option must be given (non-empty) to train with its method; the
check is TrainConfig's, made before TensorFlow is imported.
They are read here from the module's source (`ast.literal_eval`, nothing executed), so defining
the flags, and `imcl-train --help`, import no TensorFlow. A flag name starts with the method's
name, so two methods never define the same flag.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib
import importlib.util
from typing import Any


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    module: str  # the module that defines the method's `METHOD` class
    summary: str  # one line: what it does and when to use it (README's table, --help)
    paper: str  # where it comes from


# name -> entry. The order is the order of tables and of --help.
METHODS: dict[str, MethodEntry] = {
    "logistic": MethodEntry(
        "imcl_tf.methods.logistic", "Masked BCE on the known labels only: the baseline, and "
        "the warm start of every other method.", "the IMCL paper's Logistic"),
    "imcl": MethodEntry(
        "imcl_tf.methods.imcl", "BCE plus the smoothness loss: labels and features rebuilt "
        "from a few similar bank images (Joint Nonnegative OMP) through a learnable label "
        "graph.", "Huynh & Elhamifar, CVPR 2020"),
    "fast0tag": MethodEntry(
        "imcl_tf.methods.fast0tag", "Fixed label word vectors ranked along a direction an MLP "
        "predicts per image (pairwise ranking loss on the known labels); needs "
        "--fast0tag_embeddings.", "Fast0Tag: Zhang, Gong & Shah, CVPR 2016"),
    "cnn_rnn": MethodEntry(
        "imcl_tf.methods.cnn_rnn", "An LSTM emits each image's known positives, most frequent "
        "first, conditioned on the image; beam search decodes.",
        "CNN-RNN: Wang et al., CVPR 2016"),
    "lsep": MethodEntry(
        "imcl_tf.methods.lsep", "Log-sum-exp pairwise ranking of known positives above known "
        "negatives: a smooth ranking baseline, when the ranking (mAP) matters more than "
        "calibrated probabilities.", "Li, Song & Luo, CVPR 2017"),
    "wsabie": MethodEntry(
        "imcl_tf.methods.wsabie", "WARP: a margin ranking loss weighted by the estimated rank of "
        "each known positive among the known negatives: a baseline that favours the top of the "
        "ranking.", "Weston, Bengio & Usunier, IJCAI 2011"),
    "curriculum": MethodEntry(
        "imcl_tf.methods.curriculum", "Partial-BCE normalised by the proportion of known "
        "labels, and a curriculum that labels the confidently scored unknown entries between "
        "stages.", "Durand, Mehrasa & Mori, CVPR 2019 (Curriculum Labeling)"),
    "latent_noise": MethodEntry(
        "imcl_tf.methods.latent_noise", "A visual classifier seen through a learned, "
        "image-conditional reporting noise; outputs relevant (reported) and visual.",
        "Misra, Zitnick, Mitchell & Girshick, CVPR 2016 (Latent Noise)"),
}


@dataclasses.dataclass(frozen=True)
class Option:
    """One option of a method (a flag of `imcl-train`)."""
    name: str
    default: Any
    help: str
    choices: tuple[str, ...] | None
    method: str
    required: bool = False


def names() -> tuple[str, ...]:
    return tuple(METHODS)


def entry(name: str) -> MethodEntry:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {names()}.")
    return METHODS[name]


def get(name: str):
    """The `Method` class of method `name` (imports its module, and TensorFlow)."""
    return importlib.import_module(entry(name).module).METHOD


@functools.lru_cache(maxsize=None)
def options(name: str) -> tuple[Option, ...]:
    """The options method `name` declares (its module's OPTIONS), without importing it."""
    module = entry(name).module
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ImportError(f"method {name!r}: module {module} not found.")
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=spec.origin)
    declared: tuple = ()
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "OPTIONS"):
            declared = ast.literal_eval(node.value)
    result = []
    for item in declared:
        option_name, default, help_text, choices, *marks = item
        if marks not in ([], ["required"]):
            raise ValueError(f"method {name!r}: option {option_name!r}: the fifth entry may "
                             f"only be 'required', received {marks!r}.")
        if not option_name.startswith(name + "_"):
            raise ValueError(f"method {name!r}: option {option_name!r} must start with "
                             f"'{name}_' (flag names are shared by every method).")
        result.append(Option(option_name, default, help_text,
                             tuple(choices) if choices else None, name, bool(marks)))
    return tuple(result)


def all_options() -> tuple[Option, ...]:
    """Every registered method's options, in registry order."""
    return tuple(option for name in METHODS for option in options(name))


def option_defaults(name: str) -> dict[str, Any]:
    return {option.name: option.default for option in options(name)}

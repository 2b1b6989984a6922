"""The run's entry in TensorBoard's HParams dashboard: the options that matter, best val mAP.

Only options that change what is learned are listed (not paths, verbosity or logging
intervals), with a few values resolved by the run (steps, bank size, calibrated lambdas, the
measured known-label ratio); a method's own options (its HPARAMS) are left out of other
methods' runs, so their cells stay empty instead of showing values never used. The metric is the best validation mAP so
far (`metrics/best_mAP` of the validation run), not the last one.
"""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf

# The scalar (in the validation run) that the dashboard shows as the run's result.
BEST_MAP_TAG = "metrics/best_mAP"
# Options of every run (TrainConfig field names); each method adds its HPARAMS.
COMMON_OPTIONS = ("method", "backbone", "backbone_weights", "learning_rate", "optimizer",
                  "lr_schedule", "batch_size", "head_weight_decay", "augment", "seed")
# Values the run resolves, in the order they are shown after the options.
RESOLVED = ("dataset", "known_ratio", "image_size", "train_steps", "warm_started",
            "dictionary_size", "resolved_lambda_y", "resolved_lambda_f")
# The dashboard ticks five columns at first: those it is told "differ" between runs, else the
# first five by name. These are marked so (the others are a click away).
SHOWN_FIRST = ("k", "known_ratio", "lambda_y", "learning_rate", "method")


def method_hparams() -> tuple[str, ...]:
    """Every registered method's HPARAMS, in registry order, each once (the dashboard's columns
    are the same for every run)."""
    from imcl_tf import methods
    names: list[str] = []
    for method in methods.names():
        names += [name for name in methods.get(method).HPARAMS if name not in names]
    return tuple(names)


def curated_hparams(config, *, train_steps: int, image_size: int | None, known_ratio: float,
                    resolved: dict[str, Any]) -> dict[str, Any]:
    """{name: bool | int | float | str} of the options and resolved values of one run."""
    from imcl_tf import methods
    from imcl_tf.methods import registry
    method_options = {**registry.option_defaults(config.method), **(config.method_options or {})}
    values: dict[str, Any] = {name: getattr(config, name) for name in COMMON_OPTIONS}
    for name in methods.get(config.method).HPARAMS:
        values[name] = method_options[name] if name in method_options else getattr(config, name)
    for name, value in list(values.items()):  # the dashboard takes bool, number or string
        if not isinstance(value, (bool, int, float, str)):
            values[name] = str(value)
    if "label_graph" in values and values["label_graph"].endswith(".npy"):
        values["label_graph"] = os.path.basename(values["label_graph"])
    if os.path.sep in values["backbone_weights"] or values["backbone_weights"].endswith(".h5"):
        values["backbone_weights"] = os.path.basename(values["backbone_weights"])
    values.update({
        "dataset": os.path.basename(os.path.normpath(config.data_dir)),
        "known_ratio": round(float(known_ratio), 4), "train_steps": int(train_steps),
        "warm_started": bool(config.warm_start)})
    if image_size:
        values["image_size"] = int(image_size)
    if "lambda_y" in resolved:  # IMCL's resolved values
        for key in ("dictionary_size", "lambda_y", "lambda_f"):
            if key in resolved:
                name = key if key == "dictionary_size" else f"resolved_{key}"
                values[name] = resolved[key]
    return values


def write_hparams(writer, hparams: dict[str, Any], trial_id: str) -> None:
    """The dashboard's columns (the same for every run, so runs line up) and this run's values."""
    from tensorboard.plugins.hparams import api as hparams_api
    from tensorboard.plugins.hparams import plugin_data_pb2
    config = hparams_api.hparams_config_pb(
        hparams=[hparams_api.HParam(name)
                 for name in COMMON_OPTIONS + method_hparams() + RESOLVED],
        metrics=[hparams_api.Metric(BEST_MAP_TAG, group="validation",
                                    display_name="best validation mAP")])
    plugin_data = config.value[0].metadata.plugin_data
    content = plugin_data_pb2.HParamsPluginData.FromString(plugin_data.content)
    for info in content.experiment.hparam_infos:
        info.differs = info.name in SHOWN_FIRST
    plugin_data.content = content.SerializeToString()
    with writer.as_default():
        tf.summary.experimental.write_raw_pb(config.SerializeToString(), step=0)
        hparams_api.hparams(hparams, trial_id=trial_id)
    writer.flush()

"""Does IMCL beat the logistic baseline? Test mAP against the share of known training labels.

On the Fashion-MNIST scenes demo dataset, for each known-label ratio (uniform protocol) and seed:
train the logistic baseline to its validation plateau, then from its best checkpoint both IMCL and
a control (the baseline trained for the same extra steps), and evaluate all three on the fully
labelled test split. Writes a table (mean and std per method and of the paired differences), a
PNG of mAP against known ratio, the 10-group frequency chart for one ratio, and every run's
numbers as JSON (rows are cached: an interrupted run resumes where it stopped, and several
processes may share --out, each with its own --ratios). A cached run or row is reused only if it
was trained with the options asked for; another IMCL setting in the same --out runs under its own
`--variant` name, from the same baselines and controls. `--ablations` adds the variants of the
issue at 30 % known.

  python bench/quality.py --out bench/out/quality            # the full table (18 rows)
  python bench/quality.py --quick --out bench/out/quick      # a tiny smoke version
  python bench/quality.py --ablations_only --out bench/out/quality

`--regime transfer` runs the transfer regime of bench/results/transfer_protocol.md instead: the
80-label long-tailed scenes (`fashion_scenes --label_space=item_tint_position
--reserve_pretrain_items`), a small_cnn pretrained on the items no scene uses
(`tfrecords_tools.fashion_pretrain`), and `--mode fixed` (embeddings of the pretrained backbone,
`--backbone=features`) or `--mode finetune` (the pretrained backbone with BatchNorm frozen):

  python bench/quality.py --regime transfer --mode fixed --out bench/out/transfer_fixed
  python bench/quality.py --regime transfer --mode finetune --out bench/out/transfer_finetune

The full table took 93 min on the 2-core development machine, as two processes
(BENCHMARKS.md, quality section).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

# Defaults of a quality run: the demo recipe (configs/demo.flags) at benchmark length.
BASE = dict(backbone="small_cnn", batch_size=32, learning_rate=1e-3, optimizer="adam",
            k=3, lambda_y=0.1, lambda_f=0.1, balance="loss_ratio", dictionary_per_class=10,
            refresh_every=50, label_graph="cooccurrence", learn_label_graph=True,
            clip_label_graph=True, asym_c=2.0, neighbour_mode="cached", verbose=0,
            verify_data=False, log_every=50, checkpoint_every=10_000)

ABLATIONS = {
    "k=1": dict(k=1), "k=5": dict(k=5), "lambda_f=0": dict(lambda_f=0.0),
    "identity graph": dict(label_graph="identity"), "fixed graph": dict(learn_label_graph=False),
    "forward neighbours": dict(neighbour_mode="forward"),
    "whole-split dictionary": dict(dictionary_per_class=0),
    "per_class protocol": dict(_protocol="per_class"),
}

# The transfer regime (bench/results/transfer_protocol.md): sizes and steps per mode. Fixed here,
# before any IMCL run on it; do not change them to favour a method.
TRANSFER = dict(num_train=2000, num_val=500, num_test=1000, scene_seed=1234,
                pretrain_steps=600, pretrain_batch_size=64, pretrain_learning_rate=2e-3,
                pretrain_seed=0)
TRANSFER_MODES = {
    "fixed": dict(logistic_steps=2000, imcl_steps=300, eval_every=100,
                  config=dict(backbone="features", learning_rate=1e-2)),
    # Fixed 2026-12-03 by baseline-only runs with per-part learning rates (transfer_protocol.md).
    "finetune": dict(logistic_steps=1500, imcl_steps=300, eval_every=100,
                     config=dict(backbone="small_cnn", freeze_batchnorm=True, learning_rate=1e-2,
                                 backbone_learning_rate=1e-4)),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Output folder (datasets, runs, results).")
    parser.add_argument("--ratios", default="0.1,0.3,0.5,0.7,0.9,1.0")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--regime", choices=("scratch", "transfer"), default="scratch",
                        help="scratch: the demo scenes, small_cnn from scratch; transfer: "
                             "bench/results/transfer_protocol.md.")
    parser.add_argument("--mode", choices=tuple(TRANSFER_MODES), default="finetune",
                        help="Transfer regime only: fixed features or fine-tuning.")
    parser.add_argument("--num_train", type=int, default=None,
                        help="Default 1200 (scratch) or the transfer protocol's.")
    parser.add_argument("--num_val", type=int, default=None)
    parser.add_argument("--num_test", type=int, default=None)
    parser.add_argument("--logistic_steps", type=int, default=None)
    parser.add_argument("--imcl_steps", type=int, default=None)
    parser.add_argument("--eval_every", type=int, default=None)
    parser.add_argument("--set", action="append", default=[],
                        help="Override a training option for both methods, e.g. --set k=5.")
    parser.add_argument("--imcl_set", action="append", default=[],
                        help="Override a training option for IMCL only.")
    parser.add_argument("--variant", default="main",
                        help="Name of this IMCL setting's rows in results.json and of its run "
                             "folders (imcl_<name>). A cached row must have been trained with the "
                             "options asked for, so a new --imcl_set in the same --out needs a "
                             "new name; the baselines and controls are shared.")
    parser.add_argument("--ablations", action="store_true", help="Also run the ablations.")
    parser.add_argument("--ablations_only", action="store_true")
    parser.add_argument("--ablation_seeds", default="0,1")
    parser.add_argument("--pretrained", default="",
                        help="Transfer regime: reuse this fashion_pretrain weights file (its "
                             ".json report must show the protocol's pretraining) instead of "
                             "pretraining into <out>/pretrained.")
    parser.add_argument("--baselines_only", action="store_true",
                        help="Train only the logistic baselines (what bench/neighbour_targets.py "
                             "needs); no control, no IMCL, no table.")
    parser.add_argument("--select", default="",
                        help="A JSON file {name: {option: value}} of candidate IMCL settings: "
                             "train each from the baselines at --ratios and --seeds and write "
                             "<out>/selection.md with VALIDATION mAP only (no test split is "
                             "read): how the protocol chooses IMCL's options.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke test.")
    args = parser.parse_args(argv)
    args.candidates = _load_candidates(parser, args.select) if args.select else {}
    if args.variant in ABLATIONS or not _slug(args.variant):
        parser.error(f"--variant {args.variant!r}: give a name with letters or digits that is "
                     f"not an ablation's ({sorted(ABLATIONS)}).")
    transfer = args.regime == "transfer"
    defaults = (dict(num_train=TRANSFER["num_train"], num_val=TRANSFER["num_val"],
                     num_test=TRANSFER["num_test"], **{k: v for k, v in
                                                       TRANSFER_MODES[args.mode].items()
                                                       if k != "config"})
                if transfer else dict(num_train=1200, num_val=500, num_test=1000,
                                      logistic_steps=600, imcl_steps=200, eval_every=50))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.pretrain = dict(steps=TRANSFER["pretrain_steps"], num_items=0)
    if args.quick:
        args.num_train, args.num_val, args.num_test = 160, 64, 64
        args.logistic_steps, args.imcl_steps, args.eval_every = 6, 4, 3
        args.ratios, args.seeds, args.ablation_seeds = "0.3", "0", "0"
        args.pretrain = dict(steps=2, num_items=64)
    base = dict(BASE)
    if transfer:
        base.update(TRANSFER_MODES[args.mode]["config"])
    base.update(_parse_sets(args.set))
    imcl_only = _parse_sets(args.imcl_set)
    for name, settings in args.candidates.items():  # every option value, before any training
        _check_candidate(parser, args.select, name, {**base, **imcl_only, **settings})
    os.makedirs(args.out, exist_ok=True)
    started = time.time()
    full_dir = _build_dataset(args) if not transfer else _build_transfer_dataset(args, base)
    results = _load_results(args.out)
    ratios = [float(r) for r in args.ratios.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.select:
        _select(args, full_dir, ratios, seeds, base, imcl_only)
        return 0
    if args.baselines_only:
        for ratio in ratios:
            for seed in seeds:
                print(f"baseline ready: {_train_baseline(args, full_dir, 'uniform', ratio, seed, base)}",
                      flush=True)
        return 0
    if not args.ablations_only:
        for ratio in ratios:
            for seed in seeds:
                _run_pair(args, full_dir, results, args.variant, ratio, seed, base, imcl_only)
        _write_main_report(args, results, ratios, seeds)
    if args.ablations or args.ablations_only:
        ablation_seeds = [int(s) for s in args.ablation_seeds.split(",")]
        for seed in ablation_seeds:
            _run_pair(args, full_dir, results, args.variant, 0.3, seed, base, imcl_only)
            for name, change in ABLATIONS.items():
                _run_pair(args, full_dir, results, name, 0.3, seed, base,
                          {**imcl_only, **change})
        _write_ablation_report(args, results, ablation_seeds)
    print(f"total {time.time() - started:.0f} s; results in {args.out}")
    return 0


def _parse_sets(items):
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                continue
        if value in ("true", "false", "True", "False"):
            value = value.lower() == "true"
        out[key] = value
    return out


def _build_dataset(args) -> str:
    from imcl_tf import data as data_lib
    from tfrecords_tools import fashion_scenes
    full_dir = os.path.join(args.out, "data", "full")
    wanted = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    if not os.path.exists(os.path.join(full_dir, data_lib.DATASET_JSON)):
        fashion_scenes.build(full_dir, seed=1234, num_shards=2, num_examples=wanted)
    info = data_lib.load_dataset_info(full_dir)
    found = {split: info.split(split).num_examples for split in wanted}
    if found != wanted:
        raise SystemExit(f"quality: {full_dir} holds {found} scenes but this run asks for {wanted}; "
                         "cached runs would not match. Use another --out or the sizes it was "
                         "built with.")
    return full_dir


def _build_transfer_dataset(args, base) -> str:
    """The transfer regime's scenes, pretrained backbone and (fixed mode) features; cached.

    Sets base["backbone_weights"] in fine-tuning mode. Returns the dataset to mask.
    """
    from imcl_tf import data as data_lib
    from tfrecords_tools import extract_features, fashion_pretrain, fashion_scenes
    scenes_dir = os.path.join(args.out, "data", "full_scenes")
    wanted = {"train": args.num_train, "val": args.num_val, "test": args.num_test}
    if not os.path.exists(os.path.join(scenes_dir, data_lib.DATASET_JSON)):
        fashion_scenes.build(scenes_dir, seed=TRANSFER["scene_seed"], num_shards=2,
                             num_examples=wanted, label_space="item_tint_position",
                             reserve_pretrain_items=True)
    info = data_lib.load_dataset_info(scenes_dir)
    found = {split: info.split(split).num_examples for split in wanted}
    flags = info.provenance.get("flags", {})
    if found != wanted or flags.get("label_space") != "item_tint_position" or not flags.get(
            "reserve_pretrain_items"):
        raise SystemExit(f"quality: {scenes_dir} is not this run's transfer dataset ({found} "
                         f"scenes, label space {flags.get('label_space')!r}); use another --out.")
    weights = args.pretrained or os.path.join(args.out, "pretrained", "small_cnn.weights.h5")
    if args.pretrained:
        if not os.path.exists(weights + ".json"):
            raise SystemExit(f"quality: --pretrained {weights} has no {weights}.json report; "
                             "write it with tfrecords_tools.fashion_pretrain.")
        with open(weights + ".json") as f:
            report = json.load(f)
        expected = {"steps": args.pretrain["steps"], "batch_size": TRANSFER["pretrain_batch_size"],
                    "learning_rate": TRANSFER["pretrain_learning_rate"],
                    "seed": TRANSFER["pretrain_seed"]}
        differing = {k: report.get(k) for k, v in expected.items() if report.get(k) != v}
        if differing or args.pretrain["num_items"] or report["train_items"] != [40000, 49000]:
            raise SystemExit(f"quality: --pretrained {weights} was not pretrained with the "
                             f"protocol's settings {expected} on all items ({differing}).")
    elif not os.path.exists(weights + ".json"):
        fashion_pretrain.pretrain(weights, steps=args.pretrain["steps"],
                                  num_items=args.pretrain["num_items"],
                                  batch_size=TRANSFER["pretrain_batch_size"],
                                  learning_rate=TRANSFER["pretrain_learning_rate"],
                                  seed=TRANSFER["pretrain_seed"])
    if args.mode == "finetune":
        base["backbone_weights"] = weights
        return scenes_dir
    features_dir = os.path.join(args.out, "data", "full")
    if not os.path.exists(os.path.join(features_dir, data_lib.DATASET_JSON)):
        extract_features.extract(scenes_dir, features_dir, backbone="small_cnn",
                                 backbone_weights=weights)
    return features_dir


def cell_tag(protocol, ratio, seed) -> str:
    """The folder name of a (protocol, ratio, seed) cell under <out>/data and <out>/runs."""
    return f"{protocol}_{int(round(ratio * 100))}_seed{seed}"


def _partial_dir(args, full_dir, protocol, ratio, seed) -> str:
    from imcl_tf import data as data_lib
    from tfrecords_tools import partial
    out = os.path.join(args.out, "data", cell_tag(protocol, ratio, seed))
    if not os.path.exists(os.path.join(out, data_lib.DATASET_JSON)):
        partial.simulate(full_dir, out, protocol=protocol, known_ratio=ratio, seed=seed)
    return out


def _train_baseline(args, full_dir, protocol, ratio, seed, base) -> str:
    """The logistic run of a ratio and seed (shared by every variant); cached. Returns its dir."""
    data_dir = _partial_dir(args, full_dir, protocol, ratio, seed)
    config = _baseline_config(args, cell_tag(protocol, ratio, seed), data_dir, seed, base)
    _reuse_or_train(config, BASELINE_REMEDY)
    return config.model_dir


def _train_control(args, full_dir, protocol, ratio, seed, base) -> str:
    """The control of a ratio and seed: the baseline trained for as many extra steps as IMCL gets,
    so that a gain cannot come from the extra steps alone; cached. Returns its dir."""
    data_dir = _partial_dir(args, full_dir, protocol, ratio, seed)
    _train_baseline(args, full_dir, protocol, ratio, seed, base)
    config = _control_config(args, cell_tag(protocol, ratio, seed), data_dir, seed, base)
    _reuse_or_train(config, CONTROL_REMEDY)
    return config.model_dir


BASELINE_REMEDY = "use another --out (the baselines are shared by every variant)"
CONTROL_REMEDY = "use another --out (the controls are shared by every variant)"


def _baseline_config(args, tag, data_dir, seed, base):
    from imcl_tf.training.config import TrainConfig
    return TrainConfig(data_dir=data_dir, model_dir=os.path.join(args.out, "runs", tag, "logistic"),
                       method="logistic", seed=seed, train_steps=args.logistic_steps,
                       eval_every=args.eval_every, **base)


def _control_config(args, tag, data_dir, seed, base):
    from imcl_tf.training.config import TrainConfig
    return TrainConfig(data_dir=data_dir,
                       model_dir=os.path.join(args.out, "runs", tag, "logistic_extra"),
                       method="logistic", seed=seed,
                       warm_start=os.path.join(args.out, "runs", tag, "logistic"),
                       train_steps=args.imcl_steps, eval_every=args.eval_every, **base)


def _select(args, full_dir, ratios, seeds, base, imcl_only):
    """Trains every candidate IMCL setting of --select at each ratio and seed, from the same
    baseline as the control, and writes <out>/selection.md: best validation mAP, IMCL - control,
    per ratio and overall. The test split is never read, so the choice cannot favour test."""
    from imcl_tf.training.config import TrainConfig
    candidates = args.candidates
    gains = {name: {ratio: [] for ratio in ratios} for name in candidates}
    for ratio in ratios:
        for seed in seeds:
            data_dir = _partial_dir(args, full_dir, "uniform", ratio, seed)
            logistic_dir = _train_baseline(args, full_dir, "uniform", ratio, seed, base)
            control = _best_val_map(_train_control(args, full_dir, "uniform", ratio, seed, base))
            for name, settings in candidates.items():
                run_dir = os.path.join(args.out, "runs", cell_tag("uniform", ratio, seed),
                                       "select_" + _slug(name))
                _reuse_or_train(TrainConfig(
                    data_dir=data_dir, model_dir=run_dir, method="imcl", seed=seed,
                    warm_start=logistic_dir, train_steps=args.imcl_steps,
                    eval_every=args.eval_every, **{**base, **imcl_only, **settings}),
                    "rename the candidate (its runs are select_<name>) or use another --out")
                gain = 100 * (_best_val_map(run_dir) - control)
                gains[name][ratio].append(gain)
                print(f"select {name:28s} ratio {ratio:.1f} seed {seed}: val mAP gain over the "
                      f"control {gain:+.2f}", flush=True)
    overall = {name: float(np.mean([g for cell in by_ratio.values() for g in cell]))
               for name, by_ratio in gains.items()}
    chosen = max(overall, key=overall.get)
    lines = [f"Candidates of {os.path.basename(args.select)}: best validation mAP of IMCL minus "
             f"that of the control (the baseline continued with masked BCE), in points; mean ± "
             f"std over seeds {seeds}. The test split is not read.", "",
             "| candidate | settings | " + " | ".join(f"{r:.0%} known" for r in ratios) +
             " | mean |", "|---|---|" + "---:|" * (len(ratios) + 1)]
    for name, by_ratio in gains.items():
        cells = " | ".join(f"{np.mean(v):+.2f} ± {np.std(v):.2f}" for v in by_ratio.values())
        settings = ", ".join(f"{k}={v}" for k, v in candidates[name].items()) or "(the base)"
        lines.append(f"| {name} | {settings} | {cells} | {overall[name]:+.2f} |")
    lines.append(f"\nChosen (highest mean): **{chosen}**.")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "selection.md"), "w") as f:
        f.write(text)
    print(text)


# Options the protocol sets for every run; a --select candidate may not change them.
HARNESS_OPTIONS = frozenset({"data_dir", "model_dir", "method", "seed", "warm_start",
                             "train_steps", "eval_every"})


def _load_candidates(parser, path):
    """The --select file: {name: {option: value}}, or a usage error naming what is wrong."""
    try:
        with open(path) as f:
            candidates = json.load(f)
    except (OSError, ValueError) as error:
        parser.error(f"--select {path}: cannot read it as JSON ({error}).")
    if not isinstance(candidates, dict) or not candidates or not all(
            isinstance(v, dict) for v in candidates.values()):
        parser.error(f"--select {path}: expected a JSON object "
                     '{"name": {"option": value, ...}, ...} with at least one candidate.')
    import dataclasses
    from imcl_tf.training.config import TrainConfig  # no TensorFlow import
    allowed = {f.name for f in dataclasses.fields(TrainConfig)} - HARNESS_OPTIONS
    for name, settings in candidates.items():
        unknown = sorted(set(settings) - allowed)
        if unknown:
            parser.error(f"--select {path}: candidate {name!r} sets {unknown}, which are not "
                         f"training options this script lets a candidate change (see "
                         f"`imcl-train --help`; {sorted(HARNESS_OPTIONS)} are set by the "
                         "protocol).")
    return candidates


def _check_candidate(parser, path, name, options):
    """A usage error naming the candidate if TrainConfig refuses one of its option values."""
    from imcl_tf.training.config import TrainConfig  # no TensorFlow import
    try:
        TrainConfig(data_dir="-", model_dir="-", method="imcl", **options).validate_options()
    except ValueError as error:
        parser.error(f"--select {path}: candidate {name!r}: {error}")


def _best_val_map(run_dir) -> float:
    with open(os.path.join(run_dir, "summary.json")) as f:
        value = json.load(f).get("best_val_mAP")
    if value is None:
        raise SystemExit(f"quality: {run_dir} has no validation mAP; --select needs a val split.")
    return float(value)


def _run_pair(args, full_dir, results, variant, ratio, seed, base, imcl_only):
    """Logistic run (shared by all variants of a ratio and seed), then IMCL from it; cached."""
    from imcl_tf import evaluate
    from imcl_tf.training.config import TrainConfig
    from imcl_tf.training.trainer import run
    imcl_only = dict(imcl_only)
    protocol = imcl_only.pop("_protocol", "uniform")
    tag = cell_tag(protocol, ratio, seed)
    data_dir = os.path.join(args.out, "data", tag)  # _partial_dir's folder
    imcl_dir = os.path.join(args.out, "runs", tag, "imcl_" + _slug(variant))
    imcl_config = TrainConfig(
        data_dir=data_dir, model_dir=imcl_dir, method="imcl", seed=seed,
        warm_start=os.path.join(args.out, "runs", tag, "logistic"), train_steps=args.imcl_steps,
        eval_every=args.eval_every, **{**base, **imcl_only})
    key = f"{variant}|{ratio}|{seed}"
    if key in results:  # reused without training anything, once its runs' options are checked
        for config, remedy in (
                (_baseline_config(args, tag, data_dir, seed, base), BASELINE_REMEDY),
                (_control_config(args, tag, data_dir, seed, base), CONTROL_REMEDY),
                (imcl_config, f"give this setting another --variant than {variant!r}, or use "
                              "another --out")):
            _check_same_options(config.model_dir, config, remedy)
        return results[key]
    _partial_dir(args, full_dir, protocol, ratio, seed)
    logistic_dir = _train_baseline(args, full_dir, protocol, ratio, seed, base)
    control_dir = _train_control(args, full_dir, protocol, ratio, seed, base)
    # No result row, so an IMCL run folder here is a leftover of an interrupted run.
    _completed_or_cleared(imcl_dir)
    t0 = time.time()
    run(imcl_config)
    imcl_seconds = time.time() - t0
    logistic_eval = evaluate.evaluate_model_dir(logistic_dir, data_dir, "test")
    control_eval = evaluate.evaluate_model_dir(control_dir, data_dir, "test")
    # The frequency-group chart compares IMCL with the control (transfer_protocol.md, Metric).
    imcl_eval = evaluate.evaluate_model_dir(imcl_dir, data_dir, "test",
                                            baseline_model_dir=control_dir,
                                            baseline_name="Logistic (control)")
    result = {"variant": variant, "ratio": ratio, "seed": seed, "protocol": protocol,
              "logistic": {k: logistic_eval[k] for k in ("mAP", "mAP_all_classes", "CF1@0.5")},
              "imcl": {k: imcl_eval[k] for k in ("mAP", "mAP_all_classes", "CF1@0.5")},
              "logistic_extra": {k: control_eval[k] for k in ("mAP", "mAP_all_classes", "CF1@0.5")},
              "imcl_seconds": imcl_seconds, "imcl_dir": imcl_dir,
              "frequency_png": imcl_eval.get("files", {}).get("frequency_groups_png")}
    result["delta_mAP"] = result["imcl"]["mAP"] - result["logistic"]["mAP"]
    result["delta_vs_extra"] = result["imcl"]["mAP"] - result["logistic_extra"]["mAP"]
    print(f"{variant:24s} ratio {ratio:.1f} seed {seed}: logistic {100 * result['logistic']['mAP']:.2f}"
          f"  logistic+extra {100 * result['logistic_extra']['mAP']:.2f}"
          f"  IMCL {100 * result['imcl']['mAP']:.2f}  delta {100 * result['delta_mAP']:+.2f}"
          f" / {100 * result['delta_vs_extra']:+.2f}", flush=True)
    results[key] = result
    _save_results(args.out, results)
    return result


# TrainConfig options that do not change what a run computes: where its files are, how it logs.
# Every other option of a cached run must equal the one asked for.
NOT_COMPARED = frozenset({"data_dir", "model_dir", "warm_start", "backbone_weights", "export_dir",
                          "control_model_dir", "verbose", "log_every", "checkpoint_every",
                          "verify_data"})


def _reuse_or_train(config, remedy):
    """Trains `config` into its model_dir, or reuses the completed run there if it was trained
    with the same options (`_check_same_options`; `remedy` says what to do if not)."""
    from imcl_tf.training.trainer import run
    if _completed_or_cleared(config.model_dir):
        _check_same_options(config.model_dir, config, remedy)
    else:
        run(config)


def _check_same_options(run_dir, config, remedy):
    """Exits with a message naming the differing options if the completed run in `run_dir` was
    trained with other options than `config` (outside NOT_COMPARED): a cached run or row must
    never stand for another setting. Runs without a recorded configuration are not checked."""
    import dataclasses
    try:
        with open(os.path.join(run_dir, "run_config.json")) as f:
            before = json.load(f).get("config", {})
    except (OSError, ValueError):
        before = {}
    now = json.loads(json.dumps(dataclasses.asdict(config)))
    changed = sorted(name for name in now if name not in NOT_COMPARED and name in before
                     and before[name] != now[name])
    if changed:
        details = ", ".join(f"{name}={before[name]!r} (asked: {now[name]!r})" for name in changed)
        raise SystemExit(f"quality: {run_dir} was trained with {details}; its results cannot "
                         f"stand for the options asked for. To keep both, {remedy}.")


def _completed_or_cleared(run_dir):
    """True if the run in `run_dir` completed (summary.json is written last), so it is reused.
    Otherwise deletes what an interrupted run left there (best.keras from an early evaluation,
    checkpoints) so it trains again from scratch, and returns False."""
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        return True
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)
    return False


def _slug(text):
    return "".join(c if c.isalnum() else "_" for c in text).strip("_")


def _load_results(out):
    path = os.path.join(out, "results.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _save_results(out, results):
    """Merges `results` into <out>/results.json under a lock: several processes may share <out>
    (e.g. one per group of ratios), each adding its own rows."""
    import fcntl
    path = os.path.join(out, "results.json")
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = _load_results(out)
        merged.update(results)
        results.update(merged)
        with open(path + ".tmp", "w") as f:
            json.dump(merged, f, indent=1, sort_keys=True)
        os.replace(path + ".tmp", path)


def _write_main_report(args, results, ratios, seeds):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lines = ["| known labels | logistic mAP | logistic + extra steps | IMCL mAP | IMCL - logistic "
             "| IMCL - (logistic + extra) |", "|---|---|---|---|---|---|"]
    curve = {"logistic": [], "logistic_extra": [], "imcl": []}
    deltas_below_full = []
    for ratio in ratios:
        rows = [results[f"{args.variant}|{ratio}|{seed}"] for seed in seeds]
        lo = np.array([100 * r["logistic"]["mAP"] for r in rows])
        ex = np.array([100 * r["logistic_extra"]["mAP"] for r in rows])
        im = np.array([100 * r["imcl"]["mAP"] for r in rows])
        delta, delta_extra = im - lo, im - ex
        if ratio < 1.0:
            deltas_below_full.extend(delta_extra.tolist())
        curve["logistic"].append((lo.mean(), lo.std()))
        curve["logistic_extra"].append((ex.mean(), ex.std()))
        curve["imcl"].append((im.mean(), im.std()))
        lines.append(f"| {ratio:.0%} | {lo.mean():.2f} ± {lo.std():.2f} | {ex.mean():.2f} ± "
                     f"{ex.std():.2f} | {im.mean():.2f} ± {im.std():.2f} | {delta.mean():+.2f} ± "
                     f"{delta.std():.2f} | {delta_extra.mean():+.2f} ± {delta_extra.std():.2f} |")
    if deltas_below_full:
        lines.append(f"\nMean gain over (logistic + extra steps), ratios below 100 %: "
                     f"{np.mean(deltas_below_full):+.2f} mAP points "
                     f"({len(deltas_below_full)} paired runs).")
    lines.append(f"\nmAP = mean over classes with a known positive and a known negative test label "
                 f"(percent), mean ± std over seeds {seeds}.")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "quality_table.md"), "w") as f:
        f.write(table + "\n")
    print(table)
    figure, axis = plt.subplots(figsize=(6, 4))
    x = [100 * r for r in ratios]
    for method, label in (("logistic", "Logistic (masked BCE)"),
                          ("logistic_extra", "Logistic + the same extra steps"), ("imcl", "IMCL")):
        mean = np.array([m for m, _ in curve[method]])
        std = np.array([s for _, s in curve[method]])
        axis.errorbar(x, mean, yerr=std, marker="o", capsize=3, label=label)
    axis.set_xlabel("known training labels (%)")
    axis.set_ylabel("test mAP (%)")
    axis.set_title("Fashion-MNIST scenes: mAP vs known labels" if args.regime == "scratch" else
                   f"Transfer regime ({args.mode}): mAP vs known labels")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(args.out, "map_vs_known.png"), dpi=120)
    plt.close(figure)
    chart = results.get(f"{args.variant}|0.3|{seeds[0]}", {}).get("frequency_png")
    if chart and os.path.exists(chart):
        import shutil
        shutil.copyfile(chart, os.path.join(args.out, "frequency_groups_known30.png"))


def _write_ablation_report(args, results, seeds):
    lines = ["| variant (30 % known) | logistic + extra steps | IMCL mAP | IMCL - (logistic + extra) |",
             "|---|---|---|---|"]
    for variant in [args.variant] + list(ABLATIONS):
        rows = [results.get(f"{variant}|0.3|{seed}") for seed in seeds]
        rows = [r for r in rows if r]
        if not rows:
            continue
        lo = np.array([100 * r["logistic_extra"]["mAP"] for r in rows])
        im = np.array([100 * r["imcl"]["mAP"] for r in rows])
        d = im - lo
        name = "default (cached, k=3, co-occurrence, learned)" if variant == "main" else variant
        lines.append(f"| {name} | {lo.mean():.2f} | {im.mean():.2f} | {d.mean():+.2f} ± "
                     f"{d.std():.2f} |")
    table = "\n".join(lines)
    with open(os.path.join(args.out, "ablation_table.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    sys.exit(main())

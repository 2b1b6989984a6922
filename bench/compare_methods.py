"""Every training method from the same logistic stage: the IMCL paper's supplement Tables 1 and 2.

The protocol is bench/results/compare_protocol.md. For each known-label ratio and seed, one
logistic stage is trained (bench/quality.py's baseline). Then every method of the registry
trains the same extra steps, warm-started from that stage: the "logistic" row is the stage
continued (the fair control). Each run's best-validation model is evaluated on the test split,
once per output the method declares. Written to --out: results.json (every run), table1.md
(test mAP per ratio), table2.md (gain over the logistic row), the plot and the results markdown.
Finished runs are reused, so an interrupted comparison continues where it stopped.

  python bench/compare_methods.py --out bench/out/compare_transfer --publish
  python bench/compare_methods.py --regime demo --out bench/out/compare_demo --publish
  python bench/compare_methods.py --quick --out /tmp/compare_quick --methods=logistic,imcl
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import shlex
import shutil
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import quality  # noqa: E402  (the datasets, the pretrained backbone, the logistic stage, the cache)

from imcl_tf.methods import registry  # noqa: E402  (no TensorFlow)
from imcl_tf.training.config import TrainConfig  # noqa: E402  (no TensorFlow)

PROTOCOL = "uniform"
# Fast0Tag needs a vector per label. There are no word vectors here, so each class gets a fixed
# random one (compare_protocol.md), given through this option.
FAST0TAG_EMBEDDINGS = "fast0tag_embeddings"
EMBEDDING_DIM = 32
STAGE = "logistic stage"  # Table 1's reference row: the stage before its extra steps
# --quick: a smoke test of the whole pipeline on a few dozen images.
QUICK = dict(num_train=48, num_val=32, num_test=32, logistic_steps=2, extra_steps=2,
             eval_every=2, ratios="0.3,1.0", seeds="0")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse_args(argv)
    started, load_start = time.time(), os.getloadavg()
    date_start = _utc_now()
    transfer = args.regime == "transfer"
    base = dict(quality.BASE)
    if transfer:
        base.update(quality.TRANSFER_MODES[args.mode]["config"])
    os.makedirs(args.out, exist_ok=True)
    full_dir = (quality._build_transfer_dataset(args, base) if transfer
                else quality._build_dataset(args))
    results = quality._load_results(args.out)
    trained = 0
    for ratio in args.ratios:
        for seed in args.seeds:
            trained += _run_cell(args, full_dir, base, results, ratio, seed)
    rows = _rows(results, args)
    tables = {"table1": table1(rows, args.ratios, args.seeds),
              "table2": table2(rows, args.ratios, args.seeds)}
    for name, text in tables.items():
        with open(os.path.join(args.out, f"{name}.md"), "w") as f:
            f.write(text + "\n")
        print(text + "\n")
    name = "compare_methods_" + (args.regime if args.regime == "demo" or args.mode == "fixed"
                                 else f"{args.regime}_{args.mode}")
    plot_name, report_name = name + ".png", name + ".md"
    _plot(rows, args, os.path.join(args.out, plot_name))
    report = _report(args, argv, base, tables, plot_name, trained, dict(
        date_start=date_start, date_end=_utc_now(), load_start=load_start,
        load_end=os.getloadavg(), wall_seconds=time.time() - started))
    with open(os.path.join(args.out, report_name), "w") as f:
        f.write(report)
    if args.publish:
        results_dir = os.path.join(ROOT, "bench", "results")
        shutil.copyfile(os.path.join(args.out, report_name),
                        os.path.join(results_dir, report_name))
        shutil.copyfile(os.path.join(args.out, plot_name), os.path.join(results_dir, plot_name))
        print(f"published bench/results/{report_name} and {plot_name}; rebuild BENCHMARKS.md "
              "with python bench/assemble_benchmarks.py")
    print(f"total {time.time() - started:.0f} s ({trained} runs trained); results in {args.out}")
    return 0


def _parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="Output folder (datasets, runs, results).")
    parser.add_argument("--regime", choices=("transfer", "demo"), default="transfer",
                        help="transfer: bench/results/transfer_protocol.md; demo: the demo's "
                             "scenes and recipe (imcl_tf/configs/demo.flags).")
    parser.add_argument("--mode", choices=tuple(quality.TRANSFER_MODES), default="fixed",
                        help="Transfer regime: fixed features (the protocol's) or fine-tuning "
                             "(provisional, see transfer_protocol.md).")
    parser.add_argument("--methods", default="",
                        help="Comma-separated registry names (default: every registered method: "
                             f"{','.join(registry.names())}); logistic always runs, as the "
                             "reference of Table 2.")
    parser.add_argument("--ratios", default="", help="Known-label ratios (default: the regime's).")
    parser.add_argument("--seeds", default="", help="Mask and training seeds (default: 0,1,2).")
    parser.add_argument("--pretrained", default="",
                        help="Transfer regime: reuse this fashion_pretrain weights file (checked "
                             "against the protocol) instead of pretraining into <out>/pretrained.")
    parser.add_argument("--publish", action="store_true",
                        help="Also write the results markdown and its plot to bench/results/.")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke test.")
    args = parser.parse_args(argv)
    unknown = sorted(set(filter(None, args.methods.split(","))) - set(registry.names()))
    if unknown:
        parser.error(f"--methods: {', '.join(unknown)} not registered; choose from "
                     f"{', '.join(registry.names())}.")
    if args.quick and args.publish:
        parser.error("--publish writes bench/results/; a --quick run's numbers do not belong "
                     "there.")
    chosen = set(filter(None, args.methods.split(","))) or set(registry.names())
    args.methods = [name for name in registry.names() if name in chosen | {"logistic"}]
    # The names quality.py's builders and logistic stage read from args.
    if args.regime == "transfer":
        mode = quality.TRANSFER_MODES[args.mode]
        sizes = dict(num_train=quality.TRANSFER["num_train"], num_val=quality.TRANSFER["num_val"],
                     num_test=quality.TRANSFER["num_test"], logistic_steps=mode["logistic_steps"],
                     extra_steps=mode["imcl_steps"], eval_every=mode["eval_every"],
                     ratios="0.1,0.3,0.5,0.7,0.9,1.0", seeds="0,1,2")
    else:
        recipe = demo_recipe()
        sizes = dict(num_train=6000, num_val=1000, num_test=2000,
                     logistic_steps=recipe.train_steps, extra_steps=recipe.train_steps,
                     eval_every=recipe.eval_every, ratios="0.3", seeds="0,1,2")
    args.pretrain = dict(steps=quality.TRANSFER["pretrain_steps"], num_items=0)
    if args.quick:
        sizes.update(QUICK)
        args.pretrain = dict(steps=2, num_items=64)
    args.ratios = [float(r) for r in (args.ratios or sizes.pop("ratios")).split(",")]
    args.seeds = [int(s) for s in (args.seeds or sizes.pop("seeds")).split(",")]
    for name in ("num_train", "num_val", "num_test", "logistic_steps", "extra_steps",
                 "eval_every"):
        setattr(args, name, sizes[name])
    return args


def demo_recipe() -> TrainConfig:
    """The TrainConfig of the shipped config `demo` (imcl_tf/configs/demo.flags)."""
    from absl import flags

    from imcl_tf import train
    values = flags.FlagValues()
    train.define_flags(values)
    train.parse_flags(["compare_methods", "--flagfile=demo"], values)
    return train.config_from_flags(values)


def label_embeddings(class_names, dim: int = EMBEDDING_DIM) -> np.ndarray:
    """A fixed random unit vector per class name, float32 [L, dim]: the stand-in for word vectors.

    The seed of each vector is the first 8 bytes of the SHA-256 of its name, so a class keeps
    its vector whatever the other classes are, and every run draws the same one.
    """
    rows = []
    for name in class_names:
        seed = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
        vector = np.random.default_rng(seed).standard_normal(dim)
        rows.append(vector / np.linalg.norm(vector))
    return np.asarray(rows, np.float32)


def _run_cell(args, full_dir, base, results, ratio, seed) -> int:
    """The logistic stage of (ratio, seed), then every method from it; returns the runs trained."""
    from imcl_tf.training import run
    tag = quality.cell_tag(PROTOCOL, ratio, seed)
    data_dir = quality._partial_dir(args, full_dir, PROTOCOL, ratio, seed)
    stage_dir = os.path.join(args.out, "runs", tag, "logistic")
    trained = 0 if os.path.exists(os.path.join(stage_dir, "summary.json")) else 1
    quality._train_baseline(args, full_dir, PROTOCOL, ratio, seed, base)
    _record(results, args.out, STAGE, stage_dir, ratio, seed)
    for method in args.methods:
        model_dir = os.path.join(args.out, "runs", tag, "extra_" + method)
        if not quality._completed_or_cleared(model_dir):
            print(f"training {method} at {ratio:.0%} known, seed {seed}", flush=True)
            run(TrainConfig(
                data_dir=data_dir, model_dir=model_dir, method=method, seed=seed,
                warm_start=stage_dir, train_steps=args.extra_steps, eval_every=args.eval_every,
                method_options=_method_options(method, args.out, data_dir), **base))
            trained += 1
        _record(results, args.out, method, model_dir, ratio, seed)
    return trained


def _method_options(method, out, data_dir) -> dict:
    """The options a method gets beyond its defaults: only Fast0Tag's label vectors."""
    if method != "fast0tag":
        return {}
    declared = [option.name for option in registry.options(method)]
    if FAST0TAG_EMBEDDINGS not in declared:
        raise SystemExit(f"compare_methods: fast0tag declares no option {FAST0TAG_EMBEDDINGS!r} "
                         f"(it has {', '.join(declared) or 'none'}); set FAST0TAG_EMBEDDINGS in "
                         "bench/compare_methods.py to the option that takes the label vectors.")
    from imcl_tf import data as data_lib
    path = os.path.join(out, "data", "fast0tag_embeddings.npy")
    if not os.path.exists(path):
        np.save(path, label_embeddings(data_lib.load_dataset_info(data_dir).class_names))
    return {FAST0TAG_EMBEDDINGS: path}


def _record(results, out, method, model_dir, ratio, seed) -> None:
    """Evaluates a finished run once per output of its model into results (cached by key)."""
    if any(key.startswith(f"{method}|") and key.endswith(f"|{ratio}|{seed}") for key in results):
        return
    from imcl_tf import evaluate, models
    with open(os.path.join(model_dir, "summary.json")) as f:
        summary = json.load(f)
    with open(os.path.join(model_dir, "run_config.json")) as f:
        config = TrainConfig(**json.load(f)["config"])
    model, info = models.load_model_dir(model_dir, "best")
    image_size = info.get("image_size") if info.get("input_mode") == "image" else None
    for output in model.method.OUTPUTS:
        model.with_output(output)  # what calling the model returns from now on
        measured = {}
        for split in (config.val_split, "test"):
            scores, labels, _ = evaluate.predict_split(model, config.data_dir, split,
                                                       image_size=image_size)
            measured[split] = evaluate.compute_metrics(scores, labels)
        results[f"{method}|{output}|{ratio}|{seed}"] = {
            "method": method, "output": output, "ratio": ratio, "seed": seed,
            "test_mAP": measured["test"]["mAP"], "val_mAP": measured[config.val_split]["mAP"],
            "test_mAP_all_classes": measured["test"]["mAP_all_classes"],
            "test_CF1@0.5": measured["test"]["CF1@0.5"],
            "best_val_mAP": summary.get("best_val_mAP"), "best_step": summary.get("best_step"),
            "steps": summary.get("steps"), "wall_seconds": summary.get("wall_seconds"),
            "model_dir": model_dir, "command": train_command(config)}
        print(f"{method:14s} {output:9s} {ratio:4.0%} known, seed {seed}: test mAP "
              f"{100 * measured['test']['mAP']:.2f}", flush=True)
    quality._save_results(out, results)


def train_command(config: TrainConfig) -> str:
    """The `imcl-train` command line that repeats a run: the method and every option that is not
    the default."""
    defaults = TrainConfig()
    parts = ["imcl-train"]
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name == "method_options":
            parts.extend(_flag(name, v) for name, v in value.items())
        elif value != getattr(defaults, field.name) or field.name == "method":
            parts.append(_flag(field.name, value))
    return shlex.join(parts)


def _flag(name, value) -> str:
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    return f"--{name}={value}"


# ---- tables, plot and report -------------------------------------------------------------------

def _rows(results, args) -> dict[str, dict[tuple[float, int], float]]:
    """Row name -> {(ratio, seed): test mAP in percent}; methods in registry order, then outputs."""
    rows: dict[str, dict] = {}
    for method in args.methods + [STAGE]:
        entries = [r for r in results.values() if r["method"] == method]
        outputs = list(dict.fromkeys(r["output"] for r in entries))
        for r in entries:
            name = method if len(outputs) == 1 else f"{method} ({r['output']})"
            rows.setdefault(name, {})[(r["ratio"], r["seed"])] = 100 * r["test_mAP"]
    return rows


def table1(rows, ratios, seeds) -> str:
    """Test mAP per row and ratio, mean ± std over the seeds (supplement Table 1)."""
    lines = ["| method | " + " | ".join(f"{r:.0%} known" for r in ratios) + " |",
             "|---|" + "---:|" * len(ratios)]
    for name, cells in rows.items():
        values = [[cells[(r, s)] for s in seeds if (r, s) in cells] for r in ratios]
        lines.append(f"| {name} | " + " | ".join(_mean_std(v) for v in values) + " |")
    lines.append(f"\nTest mAP (%): classes with a known positive and a known negative, each run's "
                 f"best-validation model; mean ± std (ddof 0) over seeds {seeds}. logistic: the "
                 f"stage continued for the extra steps every method gets; {STAGE}: before them.")
    return "\n".join(lines + _notes(rows))


def table2(rows, ratios, seeds) -> str:
    """Gain over the logistic row per ratio, mean ± std of the per-seed differences (Table 2)."""
    below = [r for r in ratios if r < 1.0]
    header = [f"{r:.0%} known" for r in ratios] + (["mean, ratios < 100 %"] if below else [])
    lines = ["| method | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    reference = rows.get("logistic", {})
    for name, cells in rows.items():
        if name in ("logistic", STAGE):
            continue
        gains = {r: [cells[(r, s)] - reference[(r, s)] for s in seeds
                     if (r, s) in cells and (r, s) in reference] for r in ratios}
        values = [gains[r] for r in ratios] + ([sum((gains[r] for r in below), [])]
                                               if below else [])
        lines.append(f"| {name} | " + " | ".join(_mean_std(v, signed=True) for v in values) + " |")
    lines.append(f"\nmAP points over the logistic row (the stage continued for the same extra "
                 f"steps), paired by ratio and seed; mean ± std (ddof 0) over seeds {seeds}.")
    return "\n".join(lines + _notes(rows))


def _mean_std(values, signed=False) -> str:
    if not values:
        return "–"
    mean, std = float(np.mean(values)), float(np.std(values))
    return f"{mean:+.2f} ± {std:.2f}" if signed else f"{mean:.2f} ± {std:.2f}"


def _notes(rows) -> list[str]:
    if not any(name.split(" ")[0] == "fast0tag" for name in rows):
        return []
    return [f"\nfast0tag ran without semantic word vectors: each class has a fixed random "
            f"{EMBEDDING_DIM}-d unit vector (seeded by the SHA-256 of its name), so its number "
            "is not the paper's setting."]


def _plot(rows, args, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axis = plt.subplots(figsize=(7, 4.5))
    x = [100 * r for r in args.ratios]
    for name, cells in rows.items():
        values = [[cells[(r, s)] for s in args.seeds if (r, s) in cells] for r in args.ratios]
        axis.errorbar(x, [np.mean(v) if v else np.nan for v in values],
                      yerr=[np.std(v) if v else np.nan for v in values], marker="o", capsize=3,
                      label=name, linestyle="--" if name == STAGE else "-")
    axis.set_xlabel("known training labels (%)")
    axis.set_ylabel("test mAP (%)")
    title = _regime_title(args)
    axis.set_title(f"{title[0].upper()}{title[1:]}: mAP vs known labels")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _regime_title(args) -> str:
    if args.regime == "demo":
        return "demo regime (Fashion-MNIST scenes)"
    return f"transfer regime ({args.mode} mode)"


def _report(args, argv, base, tables, plot_name, trained, timing) -> str:
    import tensorflow as tf
    command = "python bench/compare_methods.py " + shlex.join(argv)
    command = command.replace(ROOT + os.sep, "")
    gpus = len(tf.config.list_physical_devices("GPU"))
    # One row per output: count each run folder once.
    run_seconds = sum({r["model_dir"]: r["wall_seconds"] or 0
                       for r in quality._load_results(args.out).values()}.values())
    lines = [
        f"# Method comparison, {_regime_title(args)}",
        "",
        "The paper's supplement Tables 1 and 2, under the protocol of "
        "[compare_protocol.md](compare_protocol.md)" + (" (QUICK smoke-test sizes, not the "
                                                        "protocol's)" if args.quick else "") + ".",
        "",
        f"- command: `{command}`",
        f"- machine: `nproc` {len(os.sched_getaffinity(0))}, {gpus} GPU(s) visible to "
        f"TensorFlow; load average (1 / 5 / 15 min) {_loads(timing['load_start'])} at start, "
        f"{_loads(timing['load_end'])} at end",
        f"- date: {timing['date_start']} to {timing['date_end']}",
        f"- wall time: {timing['wall_seconds'] / 60:.1f} min for this command ({trained} runs "
        f"trained, the rest cached); the training runs of the table took "
        f"{run_seconds / 60:.1f} min together",
        f"- sizes: {args.num_train} / {args.num_val} / {args.num_test} scenes; logistic stage "
        f"{args.logistic_steps} steps, then {args.extra_steps} extra steps for every method, "
        f"validation every {args.eval_every}; seeds {args.seeds}",
        "- methods: " + ", ".join(args.methods) + " (each with its default options; IMCL with "
        "bench/quality.py's settings of the regime)",
        "- training settings of every run (IMCL's options among them): "
        + ", ".join(f"{k}={v}" for k, v in sorted(base.items())),
        "",
        "## Table 1: test mAP against known labels",
        "",
        tables["table1"],
        "",
        "## Table 2: gain over logistic",
        "",
        tables["table2"],
        "",
        f"![test mAP against known labels]({plot_name})",
        "",
        "Every run's numbers and its `imcl-train` command: `results.json` in the output folder.",
    ]
    return "\n".join(lines) + "\n"


def _loads(values) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


if __name__ == "__main__":
    sys.exit(main())

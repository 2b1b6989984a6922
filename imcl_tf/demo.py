"""The end-to-end demo: `imcl-demo --output_dir demo_output` (or `python -m imcl_tf.demo`).

Builds the Fashion-MNIST scenes dataset, hides 70 % of the training labels (uniform protocol),
trains the logistic baseline, then IMCL warm-started from it and, as a control, the baseline
continued for the same number of steps (the shipped config `demo`); evaluates all three on the fully
labelled test split, exports the IMCL model for TensorFlow Serving, and prints a comparison
table with the paths of everything it wrote. Steps already done are reused.

The dataset tools and the training application are run as the commands a user would type
(`imcl-data fashion_scenes`, `imcl-data partial`, `imcl-train`, each as `python -m ...` of the
module behind it), so the library never imports the tools it drives.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import app, flags

from imcl_tf import console, fashion_mnist_files, flagfiles

flags.DEFINE_string("output_dir", "demo_output", "Folder for the dataset, runs and export.")
flags.DEFINE_float("known_ratio", 0.3, "Share of training labels kept (uniform protocol).")
flags.DEFINE_integer("seed", 0, "Seed of the dataset, the label mask and training.")
flags.DEFINE_string("demo_flagfile", "demo", "Training flags: a flagfile or the name of a shipped "
                                             "config.")
flags.DEFINE_string("fashion_mnist_dir", None, "Folder with the four Fashion-MNIST .gz files "
                    f"(default: ${fashion_mnist_files.ENV_VAR}, else the repository's "
                    "data/fashion-mnist, else ./data/fashion-mnist).")
flags.DEFINE_integer("num_train", 6000, "Training scenes.")
flags.DEFINE_integer("num_val", 1000, "Validation scenes.")
flags.DEFINE_integer("num_test", 2000, "Test scenes.")
flags.DEFINE_integer("train_steps", 0, "Override the flagfile's --train_steps (0: keep).")
FLAGS = flags.FLAGS



def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments {argv[1:]}; every option is a "
                             "--flag.")
    from imcl_tf import evaluate
    from imcl_tf.data import DATASET_JSON

    started = time.time()
    flagfile = flagfiles.resolve_flagfile(FLAGS.demo_flagfile)
    out = FLAGS.output_dir
    full_dir = os.path.join(out, "fashion_scenes")
    partial_dir = os.path.join(out, f"fashion_scenes_known{int(round(FLAGS.known_ratio * 100))}")
    if not os.path.exists(os.path.join(full_dir, DATASET_JSON)):
        fashion_dir = fashion_mnist_files.find_dir(FLAGS.fashion_mnist_dir)
        print(f"[1/5] building the demo dataset in {full_dir}")
        _run_module("tfrecords_tools.commands", [
            "fashion_scenes",
            f"--output_dir={full_dir}", f"--fashion_mnist_dir={fashion_dir}",
            f"--seed={FLAGS.seed}", f"--num_train={FLAGS.num_train}",
            f"--num_val={FLAGS.num_val}", f"--num_test={FLAGS.num_test}"])
    if not os.path.exists(os.path.join(partial_dir, DATASET_JSON)):
        print(f"[2/5] keeping {FLAGS.known_ratio:.0%} of the training labels in {partial_dir}")
        _run_module("tfrecords_tools.commands", [
            "partial",
            f"--input_dir={full_dir}", f"--output_dir={partial_dir}", "--protocol=uniform",
            f"--known_ratio={FLAGS.known_ratio!r}", f"--seed={FLAGS.seed}"])
    logistic_dir = os.path.join(out, "runs", "logistic")
    control_dir = os.path.join(out, "runs", "logistic_continued")
    imcl_dir = os.path.join(out, "runs", "imcl")
    export_dir = os.path.join(out, "export")
    common = [f"--flagfile={flagfile}", f"--data_dir={partial_dir}", f"--seed={FLAGS.seed}",
              "--verbose=2"]
    if FLAGS.train_steps:
        common.append(f"--train_steps={FLAGS.train_steps}")
    print("[3/5] training the logistic baseline (masked BCE)")
    _train(common + [f"--model_dir={logistic_dir}", "--method=logistic", "--warm_start=",
                     "--export_dir="])
    print("[4/5] training IMCL warm-started from the baseline, and the baseline continued for "
          "as many steps (the fair control)")
    _train(common + [f"--model_dir={control_dir}", "--method=logistic",
                     f"--warm_start={logistic_dir}", "--export_dir="])
    _train(common + [f"--model_dir={imcl_dir}", "--method=imcl", f"--warm_start={logistic_dir}",
                     f"--export_dir={export_dir}", "--export_model_name=fashion_scenes"])
    print("[5/5] evaluating on the fully labelled test split")
    baseline = evaluate.evaluate_model_dir(logistic_dir, partial_dir, "test")
    control = evaluate.evaluate_model_dir(control_dir, partial_dir, "test")
    result = evaluate.evaluate_model_dir(imcl_dir, partial_dir, "test",
                                         baseline_model_dir=control_dir,
                                         baseline_name="Logistic (control)")
    print()
    print(comparison_table(baseline, control, result))
    print()
    print(f"dataset:      {partial_dir}")
    print(f"runs:         {logistic_dir}  {control_dir}  {imcl_dir}")
    print(f"TensorBoard:  tensorboard --logdir {os.path.join(out, 'runs')}")
    print(f"evaluation:   {os.path.dirname(result['files']['metrics_json'])}")
    print(f"export:       {os.path.join(export_dir, 'fashion_scenes')}")
    print(f"label images: imcl-predict IMAGE_FOLDER --model={imcl_dir}")
    print(f"serve it:     imcl-serve --model_base_path "
          f"{os.path.join(export_dir, 'fashion_scenes')} --model_name fashion_scenes")
    print(f"total time:   {time.time() - started:.0f} s")


# The console command behind each module the demo runs (what it prints, so a user can rerun a step).
COMMANDS = {"tfrecords_tools.commands": "imcl-data", "imcl_tf.train": "imcl-train"}


def _train(arguments: list[str]) -> None:
    """Runs the training CLI exactly as a user would; a finished run is resumed, not redone."""
    _run_module("imcl_tf.train", arguments)


def _run_module(module: str, arguments: list[str]) -> None:
    """Runs `python -m module arguments...`, printing the command; stops the demo if it fails."""
    command = [sys.executable, "-m", module] + arguments
    print("  $ " + " ".join([COMMANDS.get(module, "python -m " + module)] + arguments), flush=True)
    done = subprocess.run(command)
    if done.returncode:
        raise SystemExit(f"imcl-demo: error: step {module} failed with exit status "
                         f"{done.returncode} (its message is above).")


def comparison_table(baseline: dict, control: dict, result: dict) -> str:
    rows = [("mAP (classes with known +/-)", "mAP"), ("mAP (all classes, official)",
                                                     "mAP_all_classes"),
            ("label-weighted mAP", "mAP_label_weighted"), ("CF1 @0.5", "CF1@0.5"),
            ("OF1 @0.5", "OF1@0.5"), ("CF1 @top3", "CF1@top3")]
    lines = [f"{'test metric (%)':32s} {'logistic':>9s} {'continued':>10s} {'IMCL':>9s} "
             f"{'IMCL - continued':>17s}"]
    for title, key in rows:
        if key in baseline and key in control and key in result:
            a, c, b = 100 * baseline[key], 100 * control[key], 100 * result[key]
            lines.append(f"{title:32s} {a:9.2f} {c:10.2f} {b:9.2f} {b - c:+17.2f}")
    lines.append("logistic: the baseline; continued: the baseline trained for the extra steps IMCL "
                 "got; IMCL: warm-started from the baseline.")
    return "\n".join(lines)


def run_cli() -> None:
    """The `imcl-demo` command."""
    console.run_app(main, program="imcl-demo", flag_modules=[__name__])


if __name__ == "__main__":
    run_cli()

"""What refreshing the atoms' label states every n steps costs in quality (issue 10).

`--label_state_refresh_every=n` recomputes the label states the OMP selects neighbours with
every n steps instead of every step (n = 1, the default, is exact). The protocol, fixed before
any n > 1 was run: the demo regime of bench/compare_methods.py (bench/results/compare_protocol.md),
30 % known, seeds 0, 1 and 2; from each cell's logistic stage, IMCL trains the regime's 300
extra steps with n = 10 and with n = 50, everything else as the comparison's IMCL row (n = 1).
Reported: test mAP per n, and the paired differences to n = 1 and to the logistic control (the
stage continued), all from the same folder, so the n = 1 and control runs of a finished
comparison are reused, not retrained.

  python bench/refresh_quality.py --out bench/out/compare_demo
  python bench/refresh_quality.py --quick --out /tmp/refresh_quick
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import compare_methods  # noqa: E402  (the demo regime, its stages, its evaluation)
import quality  # noqa: E402

from imcl_tf.training.config import TrainConfig  # noqa: E402  (no TensorFlow)

REFRESH_EVERY = (10, 50)
RATIO = 0.3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True,
                        help="The demo comparison's output folder (its runs are reused).")
    parser.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke test.")
    options = parser.parse_args(sys.argv[1:] if argv is None else argv)
    args = compare_methods._parse_args(["--regime", "demo", "--out", options.out,
                                        "--methods", "imcl", "--ratios", str(RATIO)]
                                       + (["--quick"] if options.quick else []))
    from imcl_tf.training import run
    base = dict(quality.BASE)
    os.makedirs(args.out, exist_ok=True)
    full_dir = quality._build_dataset(args)
    results = quality._load_results(args.out)
    for seed in args.seeds:
        compare_methods._run_cell(args, full_dir, base, results, RATIO, seed)  # n = 1, control
        tag = quality.cell_tag(compare_methods.PROTOCOL, RATIO, seed)
        data_dir = quality._partial_dir(args, full_dir, compare_methods.PROTOCOL, RATIO, seed)
        stage_dir = os.path.join(args.out, "runs", tag, "logistic")
        for every in REFRESH_EVERY:
            model_dir = os.path.join(args.out, "runs", tag, f"extra_imcl_refresh{every}")
            if not quality._completed_or_cleared(model_dir):
                print(f"training imcl, label states refreshed every {every} steps, seed {seed}",
                      flush=True)
                run(TrainConfig(data_dir=data_dir, model_dir=model_dir, method="imcl",
                                seed=seed, warm_start=stage_dir, train_steps=args.extra_steps,
                                eval_every=args.eval_every, label_state_refresh_every=every,
                                **base))
            compare_methods._record(results, args.out, f"imcl_refresh{every}", model_dir,
                                    RATIO, seed)
    print(table(results, args.seeds))
    return 0


def table(results, seeds) -> str:
    """Test mAP per refresh interval and its paired differences, in points, over `seeds`."""
    def test_map(method, seed):
        return 100 * results[f"{method}|scores|{RATIO}|{seed}"]["test_mAP"]

    rows = ["| label states refreshed every | test mAP | - (n = 1) | - (logistic control) |",
            "|---|---:|---:|---:|"]
    for every, method in [(1, "imcl")] + [(n, f"imcl_refresh{n}") for n in REFRESH_EVERY]:
        values = np.array([test_map(method, s) for s in seeds])
        to_exact = values - np.array([test_map("imcl", s) for s in seeds])
        to_control = values - np.array([test_map("logistic", s) for s in seeds])
        rows.append(f"| {every} step(s) | {values.mean():.2f} ± {values.std():.2f} | "
                    f"{to_exact.mean():+.2f} ± {to_exact.std():.2f} | "
                    f"{to_control.mean():+.2f} ± {to_control.std():.2f} |")
    return "\n".join(rows) + (f"\n\n{RATIO:.0%} known; mean ± std (ddof 0) over seeds "
                              f"{list(seeds)}; differences paired by seed.")


if __name__ == "__main__":
    sys.exit(main())

"""bench/compare_methods.py: every registered method from one logistic stage (Tables 1 and 2)."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import compare_methods  # noqa: E402
import quality  # noqa: E402

from imcl_tf.methods import registry  # noqa: E402


@pytest.mark.slow
def test_quick_comparison_runs_every_registered_method_and_resumes(tmp_path):
    out = tmp_path / "compare"
    # One ratio (the quick default has two) keeps the test short with every method registered.
    command = [sys.executable, os.path.join(ROOT, "bench", "compare_methods.py"), "--quick",
               "--ratios", "0.3", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    methods = {row["method"] for row in results.values()}
    assert methods == set(registry.names()) | {compare_methods.STAGE}
    for key, row in results.items():
        assert key == f"{row['method']}|{row['output']}|0.3|0"
        assert 0.0 <= row["test_mAP"] <= 1.0 and 0.0 <= row["val_mAP"] <= 1.0, row
        assert row["steps"] == (compare_methods.QUICK["logistic_steps"]
                                if row["method"] == compare_methods.STAGE
                                else compare_methods.QUICK["extra_steps"])
        assert row["wall_seconds"] > 0 and row["command"].startswith("imcl-train --data_dir=")
        if row["method"] != compare_methods.STAGE:
            assert f"--method={row['method']}" in row["command"]
            assert "--warm_start=" + str(out / "runs" / "uniform_30_seed0" / "logistic") in \
                row["command"]
    table1 = (out / "table1.md").read_text()
    table2 = (out / "table2.md").read_text()
    assert "| method | 30% known |" in table1
    for name in registry.names():
        assert f"\n| {name}" in table1
        assert (f"\n| {name}" in table2) == (name != "logistic")
    logistic = 100 * results["logistic|scores|0.3|0"]["test_mAP"]
    imcl = 100 * results["imcl|scores|0.3|0"]["test_mAP"]
    assert f"| imcl | {imcl - logistic:+.2f} ± 0.00 |" in table2
    report = (out / "compare_methods_transfer.md").read_text()
    assert report.startswith("# Method comparison, transfer regime (fixed mode)")
    assert "QUICK" in report and "`nproc`" in report and "load average" in report
    assert (out / "compare_methods_transfer.png").stat().st_size > 1000
    # A second run finds every run and every row cached: it trains and evaluates nothing.
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(0 runs trained)" in again.stdout and "test mAP" not in again.stdout
    assert json.loads((out / "results.json").read_text()) == results


def _results(values):
    """results.json rows from {(method, output): {(ratio, seed): mAP}}."""
    return {f"{m}|{o}|{r}|{s}": {"method": m, "output": o, "ratio": r, "seed": s, "test_mAP": v}
            for (m, o), cells in values.items() for (r, s), v in cells.items()}


def test_tables_mean_std_and_paired_gains_match_numpy():
    rng = np.random.default_rng(0)
    ratios, seeds = [0.1, 1.0], [0, 1, 2]
    maps = {(m, o): {(r, s): float(rng.uniform(0.2, 0.8)) for r in ratios for s in seeds}
            for m, o in [("logistic", "scores"), ("imcl", "scores"),
                         ("latent_noise", "relevant"), ("latent_noise", "visual"),
                         (compare_methods.STAGE, "scores")]}
    del maps[("imcl", "scores")][(1.0, 2)]  # a run not done yet: left out of its cell
    args = quality.argparse.Namespace(methods=["logistic", "imcl", "latent_noise"])
    rows = compare_methods._rows(_results(maps), args)
    assert list(rows) == ["logistic", "imcl", "latent_noise (relevant)", "latent_noise (visual)",
                          compare_methods.STAGE]
    table1 = compare_methods.table1(rows, ratios, seeds)
    visual = [100 * maps[("latent_noise", "visual")][(0.1, s)] for s in seeds]
    assert f"| latent_noise (visual) | {np.mean(visual):.2f} ± {np.std(visual):.2f} |" in table1
    imcl_full = [100 * maps[("imcl", "scores")][(1.0, s)] for s in (0, 1)]
    assert f"{np.mean(imcl_full):.2f} ± {np.std(imcl_full):.2f} |\n" in table1
    table2 = compare_methods.table2(rows, ratios, seeds)
    assert "\n| logistic |" not in table2 and compare_methods.STAGE not in table2.split("\n\n")[0]
    gains = [100 * (maps[("imcl", "scores")][(0.1, s)] - maps[("logistic", "scores")][(0.1, s)])
             for s in seeds]
    assert f"| imcl | {np.mean(gains):+.2f} ± {np.std(gains):.2f} | " in table2
    # The last column pools the paired gains of every ratio below 100 %: here only 10 %.
    assert table2.splitlines()[2].endswith(f"| {np.mean(gains):+.2f} ± {np.std(gains):.2f} |")
    assert "fast0tag" not in table1


def test_a_missing_cell_and_fast0tag_are_marked():
    rows = {"logistic": {(0.3, 0): 50.0}, "fast0tag": {}}
    table = compare_methods.table1(rows, [0.3], [0])
    assert "| fast0tag | – |" in table
    assert "fast0tag ran without semantic word vectors" in table
    assert "fast0tag ran without semantic word vectors" in compare_methods.table2(rows, [0.3], [0])


def test_label_embeddings_are_fixed_per_name_unit_and_distinct():
    names = ["bag red left", "shirt blue right", "sandal green left"]
    vectors = compare_methods.label_embeddings(names)
    assert vectors.shape == (3, compare_methods.EMBEDDING_DIM) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-6)
    # A name's vector does not depend on the other classes or their order.
    np.testing.assert_array_equal(compare_methods.label_embeddings(names[::-1])[0], vectors[2])
    seed = int.from_bytes(hashlib.sha256(names[1].encode()).digest()[:8], "little")
    expected = np.random.default_rng(seed).standard_normal(compare_methods.EMBEDDING_DIM)
    np.testing.assert_allclose(vectors[1], expected / np.linalg.norm(expected), rtol=1e-6)
    assert abs(float(vectors[0] @ vectors[1])) < 0.9


def test_methods_come_from_the_registry_and_logistic_always_runs():
    args = compare_methods._parse_args(["--out", "o"])
    assert args.methods == list(registry.names())
    assert args.ratios == [0.1, 0.3, 0.5, 0.7, 0.9, 1.0] and args.seeds == [0, 1, 2]
    mode = quality.TRANSFER_MODES["fixed"]
    assert (args.logistic_steps, args.extra_steps, args.eval_every) == (
        mode["logistic_steps"], mode["imcl_steps"], mode["eval_every"])
    assert compare_methods._parse_args(["--out", "o", "--methods=imcl"]).methods == \
        ["logistic", "imcl"]
    quick = compare_methods._parse_args(["--out", "o", "--quick", "--ratios", "0.5"])
    assert quick.ratios == [0.5] and quick.seeds == [0] and quick.num_train == 48


def test_demo_regime_is_the_demo_recipe():
    args = compare_methods._parse_args(["--out", "o", "--regime", "demo"])
    assert (args.logistic_steps, args.extra_steps, args.eval_every) == (300, 300, 100)
    assert args.ratios == [0.3] and (args.num_train, args.num_val, args.num_test) == (
        6000, 1000, 2000)
    # The demo regime trains with quality.BASE: it must be demo.flags' recipe.
    recipe = compare_methods.demo_recipe()
    bench_only = {"verbose", "verify_data", "log_every", "checkpoint_every"}
    differing = {k: (v, getattr(recipe, k)) for k, v in quality.BASE.items()
                 if k not in bench_only and getattr(recipe, k) != v}
    assert not differing


@pytest.mark.parametrize("argv,message", [
    (["--methods=logistic,nosuch"], "--methods: nosuch not registered"),
    (["--quick", "--publish"], "a --quick run's numbers do not belong there"),
])
def test_bad_arguments_are_named(argv, message):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "compare_methods.py"),
                           "--out", "o"] + argv, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


def test_train_command_repeats_the_run():
    config = compare_methods.TrainConfig(data_dir="d", model_dir="m", method="logistic",
                                         verify_data=False, learning_rate=0.01, warm_start="w x")
    assert compare_methods.train_command(config) == (
        "imcl-train --data_dir=d --model_dir=m --method=logistic --learning_rate=0.01 "
        "'--warm_start=w x' --noverify_data")

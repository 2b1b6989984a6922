"""bench/quality.py --quick: the whole quality pipeline on a tiny dataset, end to end."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_quality_run_writes_table_plot_and_cached_results(tmp_path):
    out = tmp_path / "quality"
    command = [sys.executable, os.path.join(ROOT, "bench", "quality.py"), "--quick", "--out",
               str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    row = results["main|0.3|0"]
    for method in ("logistic", "logistic_extra", "imcl"):
        assert 0.0 <= row[method]["mAP"] <= 1.0, row
    assert row["delta_vs_extra"] == pytest.approx(row["imcl"]["mAP"] - row["logistic_extra"]["mAP"])
    table = (out / "quality_table.md").read_text()
    assert "| 30% |" in table and "IMCL" in table
    assert (out / "map_vs_known.png").stat().st_size > 1000
    # A second run finds every row cached and trains nothing.
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "results.json").read_text()) == results
    # Another IMCL setting may not reuse the rows of the cached one ...
    other = subprocess.run(command + ["--imcl_set", "k=1"], cwd=ROOT, capture_output=True,
                           text=True)
    assert other.returncode != 0
    assert "was trained with k=3 (asked: 1)" in other.stderr and "--variant" in other.stderr
    # ... but runs under its own name, beside it, from the same baseline and control.
    named = subprocess.run(command + ["--imcl_set", "k=1", "--variant", "k one"], cwd=ROOT,
                           capture_output=True, text=True)
    assert named.returncode == 0, named.stderr[-3000:]
    both = json.loads((out / "results.json").read_text())
    assert both["main|0.3|0"] == row and both["k one|0.3|0"]["variant"] == "k one"
    assert both["k one|0.3|0"]["logistic_extra"] == row["logistic_extra"]
    k_one = json.loads((out / "runs" / "uniform_30_seed0" / "imcl_k_one" / "run_config.json")
                       .read_text())
    assert k_one["config"]["k"] == 1
    # --select trains candidate IMCL settings from the same baselines and controls and ranks
    # them by validation mAP only.
    candidates = tmp_path / "candidates.json"
    candidates.write_text(json.dumps({"base": {}, "k one": {"k": 1}}))
    select = subprocess.run(command + ["--select", str(candidates)], cwd=ROOT,
                            capture_output=True, text=True)
    assert select.returncode == 0, select.stderr[-3000:]
    cell = out / "runs" / "uniform_30_seed0"
    control = json.loads((cell / "logistic_extra" / "summary.json").read_text())["best_val_mAP"]
    selection = (out / "selection.md").read_text()
    for name, folder in (("base", "select_base"), ("k one", "select_k_one")):
        summary = json.loads((cell / folder / "summary.json").read_text())
        config = json.loads((cell / folder / "run_config.json").read_text())
        assert config["config"]["k"] == (1 if name == "k one" else 3), config
        gain = 100 * (summary["best_val_mAP"] - control)
        assert f"| {name} |" in selection and f"{gain:+.2f} ± 0.00" in selection
    assert "Chosen (highest mean): **" in selection and "test split is not read" in selection
    # The target diagnostic runs on the same baseline and dataset.
    report = tmp_path / "targets.md"
    diagnose = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "neighbour_targets.py"), "--model_dir",
         str(out / "runs" / "uniform_30_seed0" / "logistic"), "--data_dir",
         str(out / "data" / "uniform_30_seed0"), "--dictionaries", "0", "--graphs", "identity",
         "--lambda_f", "1", "--knn", "5", "--out", str(report)],
        cwd=ROOT, capture_output=True, text=True)
    assert diagnose.returncode == 0, diagnose.stderr[-3000:]
    text = report.read_text()
    assert "model prediction" in text and "IMCL reconstruction" in text and "kNN" in text
    assert "| mean of the model's state and the reconstruction / sum c |" in text
    # More kNN neighbours than training images is an error, not a silently missing row.
    too_many = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "neighbour_targets.py"), "--model_dir",
         str(out / "runs" / "uniform_30_seed0" / "logistic"), "--data_dir",
         str(out / "data" / "uniform_30_seed0"), "--dictionaries", "0", "--graphs", "identity",
         "--lambda_f", "1", "--knn", "5,100000"],
        cwd=ROOT, capture_output=True, text=True)
    assert too_many.returncode != 0
    assert "--knn 5,100000 asks for 100000 neighbours" in too_many.stderr


def test_other_sizes_in_an_existing_output_folder_are_refused(tmp_path):
    out = tmp_path / "quality"
    quality = _quality_module()
    from tfrecords_tools import fashion_scenes
    fashion_scenes.build(str(out / "data" / "full"), seed=1234, num_shards=1,
                         num_examples={"train": 8, "val": 4, "test": 4})
    args = quality.argparse.Namespace(out=str(out), num_train=16, num_val=4, num_test=4)
    with pytest.raises(SystemExit, match="holds .* scenes but this run asks for"):
        quality._build_dataset(args)


@pytest.mark.parametrize("content,message", [
    ("{", "cannot read it as JSON"), ("[]", "expected a JSON object"),
    ('{"a": 1}', "expected a JSON object"), ("{}", "expected a JSON object"),
    ('{"a": {"kk": 3}}', "candidate 'a' sets ['kk'], which are not training options"),
    ('{"a": {"seed": 3}}', "candidate 'a' sets ['seed']"),
    ('{"ok": {}, "too wide": {"k": 9}}', "candidate 'too wide': --k: must be in [1, 8]"),
    ('{"a": {"label_graph": "cooc"}}', "candidate 'a': --label_graph")])
def test_a_bad_select_file_is_a_usage_error(tmp_path, content, message):
    path = tmp_path / "candidates.json"
    path.write_text(content)
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "quality.py"), "--out",
                           str(tmp_path / "out"), "--select", str(path)],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag,value,message", [
    ("--knn", "0", "--knn: expected values >= 1"),
    ("--lambda_f", "a", "--lambda_f: expected comma-separated float values"),
    ("--dictionaries", "-1", "--dictionaries: expected values >= 0"),
    ("--graphs", ",", "--graphs: give at least one"),
])
def test_neighbour_targets_bad_flags_are_named(flag, value, message):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "neighbour_targets.py"), "--model_dir", "m",
         "--data_dir", "d", flag, value], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


@pytest.mark.slow
def test_quick_transfer_regime_fixed_features_end_to_end(tmp_path):
    out = tmp_path / "transfer"
    command = [sys.executable, os.path.join(ROOT, "bench", "quality.py"), "--quick", "--regime",
               "transfer", "--mode", "fixed", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    from imcl_tf import data
    scenes = data.load_dataset_info(str(out / "data" / "full_scenes"))
    assert scenes.num_classes == 80 and scenes.provenance["flags"]["reserve_pretrain_items"]
    features = data.load_dataset_info(str(out / "data" / "full"))
    assert features.mode == "features" and features.embedding_dim == 128
    pretrained = json.loads((out / "pretrained" / "small_cnn.weights.h5.json").read_text())
    assert pretrained["item_source"] == {"file": "train", "start": 40000, "stop": 50000}
    run_config = json.loads(
        (out / "runs" / "uniform_30_seed0" / "imcl_main" / "run_config.json").read_text())
    assert run_config["config"]["backbone"] == "features"
    row = json.loads((out / "results.json").read_text())["main|0.3|0"]
    for method in ("logistic", "logistic_extra", "imcl"):
        assert 0.0 <= row[method]["mAP"] <= 1.0, row
    # The gate runs on the features-mode baseline.
    report = tmp_path / "targets.md"
    diagnose = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "neighbour_targets.py"), "--model_dir",
         str(out / "runs" / "uniform_30_seed0" / "logistic"), "--data_dir",
         str(out / "data" / "uniform_30_seed0"), "--dictionaries", "0", "--graphs",
         "cooccurrence", "--lambda_f", "1", "--knn", "5", "--out", str(report)],
        cwd=ROOT, capture_output=True, text=True)
    assert diagnose.returncode == 0, diagnose.stderr[-3000:]
    assert "IMCL reconstruction" in report.read_text()
    # --baselines_only finds the cached baseline and trains nothing else.
    again = subprocess.run(command + ["--baselines_only"], cwd=ROOT, capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "baseline ready:" in again.stdout and "uniform_30_seed0" in again.stdout


def _quality_module():
    """bench/quality.py as a module (bench/ is not a package)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import quality
    finally:
        sys.path.pop(0)
    return quality


def test_a_cached_run_with_other_options_is_refused_by_name(tmp_path):
    import dataclasses
    from imcl_tf.training.config import TrainConfig
    quality = _quality_module()
    run_dir = tmp_path / "cell" / "imcl_main"
    run_dir.mkdir(parents=True)
    trained = TrainConfig(data_dir=str(tmp_path / "data"), model_dir=str(run_dir), method="imcl",
                          k=3, lambda_y=0.1)
    (run_dir / "run_config.json").write_text(json.dumps({"config": dataclasses.asdict(trained)}))
    same_elsewhere = dataclasses.replace(trained, data_dir="/moved/data", verbose=2, log_every=7)
    quality._check_same_options(str(run_dir), same_elsewhere, "do X")  # paths and logging only
    asked = dataclasses.replace(trained, k=1, lambda_y=0.5)
    with pytest.raises(SystemExit) as raised:
        quality._check_same_options(str(run_dir), asked, "use --variant NEW")
    message = str(raised.value)
    assert "k=3 (asked: 1)" in message and "lambda_y=0.1 (asked: 0.5)" in message
    assert str(run_dir) in message and message.endswith("To keep both, use --variant NEW.")


@pytest.mark.parametrize("name", ["k=1", "+-"])
def test_a_variant_name_that_clashes_or_has_no_letters_is_a_usage_error(tmp_path, name):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "quality.py"), "--out",
                           str(tmp_path), "--variant", name], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 2 and "--variant" in done.stderr, done.stderr[-2000:]


def test_transfer_pretrained_weights_must_follow_the_protocol(tmp_path):
    quality = _quality_module()
    weights = tmp_path / "w.weights.h5"
    weights.write_bytes(b"")
    args = quality.argparse.Namespace(
        out=str(tmp_path / "out"), num_train=3, num_val=2, num_test=2, mode="finetune",
        pretrained=str(weights), pretrain=dict(steps=quality.TRANSFER["pretrain_steps"],
                                               num_items=0))
    with pytest.raises(SystemExit, match="has no .*json report"):
        quality._build_transfer_dataset(args, {})
    report = {"steps": 5, "batch_size": quality.TRANSFER["pretrain_batch_size"],
              "learning_rate": quality.TRANSFER["pretrain_learning_rate"],
              "seed": quality.TRANSFER["pretrain_seed"], "train_items": [40000, 49000]}
    (tmp_path / "w.weights.h5.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="not pretrained with the protocol's settings"):
        quality._build_transfer_dataset(args, {})
    report["steps"] = quality.TRANSFER["pretrain_steps"]
    (tmp_path / "w.weights.h5.json").write_text(json.dumps(report))
    base = {}
    assert quality._build_transfer_dataset(args, base).endswith("full_scenes")
    assert base["backbone_weights"] == str(weights)

"""End-to-end tests of a training run in this process: files, TensorBoard, best model, export.

One two-stage run (`--warm_start=auto`: logistic baseline, then IMCL from it) on a tiny 16x16
dataset is shared by most tests; its numbers are recomputed here with plain NumPy from the saved
models, and its TensorBoard event files are read back.
"""

import contextlib
import dataclasses
import glob
import io
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from imcl_tf import data, export, losses, metrics, models
from imcl_tf.training.config import TrainConfig
from imcl_tf.training.report import format_summary
from imcl_tf.training.run_files import CHECKPOINT_DIR, FREQUENCY_CHART, LOGISTIC_STAGE_DIR, LOG_DIR, RUN_CONFIG, SUMMARY_JSON
from imcl_tf.training.scoring import predict_scores
from imcl_tf.training.trainer import _Trainer, run
from test_train_common import CLASS_NAMES, mean_ap, read_events, write_dataset

STEPS, EVAL_EVERY = 6, 3


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    """The two-stage run, with os.replace watched (atomic writes) and stdout captured."""
    root = tmp_path_factory.mktemp("train_run")
    data_dir = write_dataset(str(root / "data"))
    control_dir = str(root / "control")  # the fair control TensorBoard compares with
    run(TrainConfig(data_dir=data_dir, model_dir=control_dir, method="logistic",
                    train_steps=STEPS, eval_every=STEPS, batch_size=8, seed=4, verbose=0))
    config = TrainConfig(
        data_dir=data_dir, model_dir=str(root / "run"), method="imcl", warm_start="auto",
        train_steps=STEPS, eval_every=EVAL_EVERY, checkpoint_every=2, log_every=2, batch_size=8,
        dictionary_per_class=3, refresh_every=2, label_graph="cooccurrence",
        calibration_batches=2, export_dir=str(root / "export"), export_model_name="tiny",
        control_model_dir=control_dir, seed=3, verbose=1)
    renames = []
    real_replace = os.replace

    def watched_replace(source, target):
        renames.append((str(source), str(target)))
        return real_replace(source, target)

    chart_names = []
    real_plot = metrics.plot_frequency_groups

    def watched_plot(groups, path, method_name, baseline_name):
        chart_names.append((os.path.dirname(path), method_name, baseline_name))
        return real_plot(groups, path, method_name, baseline_name)

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr(os, "replace", watched_replace)
        patch.setattr(metrics, "plot_frequency_groups", watched_plot)
        summary = run(config)
    model_dir = config.model_dir
    return {"config": config, "summary": summary, "renames": renames, "stdout": stdout.getvalue(),
            "data_dir": data_dir, "model_dir": model_dir, "export_dir": str(root / "export"),
            "stage_dir": os.path.join(model_dir, LOGISTIC_STAGE_DIR), "control_dir": control_dir,
            "chart_names": chart_names}


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def validation_arrays(data_dir):
    inputs, labels, _ = data.load_split_arrays(data_dir, "val")
    return inputs, labels


def validation_scores_of(model_path, config):
    """Scores of a saved model over the validation pipeline the run evaluated with.

    Same batches in the same order as the run's own validation, so the floats agree exactly;
    scoring the whole split as one batch rounds differently, and on 24 tiny images a near-tie
    that swaps ranks moves the mAP by ~1e-3.
    """
    model = keras.saving.load_model(model_path, compile=False)
    dataset = data.make_dataset(config.data_dir, config.val_split, batch_size=config.batch_size,
                                deterministic=True)
    scores, labels = predict_scores(model, dataset)
    return scores.astype(np.float64), labels


# ---- files ---------------------------------------------------------------------------------------


def test_run_config_records_the_resolved_configuration(auto_run):
    config, stage_dir, model_dir = auto_run["config"], auto_run["stage_dir"], auto_run["model_dir"]
    stage = read_json(os.path.join(stage_dir, RUN_CONFIG))
    assert stage["config"] == dataclasses.asdict(dataclasses.replace(
        config, method="logistic", model_dir=stage_dir, warm_start="", export_dir=""))
    assert (stage["train_steps"], stage["eval_every"], stage["resolved"]) == (STEPS, EVAL_EVERY,
                                                                              {})
    imcl = read_json(os.path.join(model_dir, RUN_CONFIG))
    assert imcl["config"] == dataclasses.asdict(dataclasses.replace(config, warm_start=stage_dir))
    assert imcl["dataset"]["num_classes"] == len(CLASS_NAMES)
    assert imcl["dataset"]["num_train"] == 48 and imcl["dataset"]["image_size"] == 16
    resolved = imcl["resolved"]
    assert resolved["warm_start"] == stage_dir
    assert resolved["dictionary_size"] >= 3
    # loss_ratio balance (docs/method.md §1): lambda = multiplier * L_c / L_term
    np.testing.assert_allclose(resolved["lambda_y"], config.lambda_y * resolved["calibration_bce"]
                               / resolved["calibration_loss_y"], rtol=1e-6)
    np.testing.assert_allclose(resolved["lambda_f"], config.lambda_f * resolved["calibration_bce"]
                               / resolved["calibration_loss_f"], rtol=1e-6)
    # The trained model carries the same lambdas.
    model = keras.saving.load_model(os.path.join(model_dir, models.LATEST_MODEL), compile=False)
    np.testing.assert_allclose(float(model.method.lambda_y.numpy()), resolved["lambda_y"], rtol=1e-6)
    np.testing.assert_allclose(float(model.method.lambda_f.numpy()), resolved["lambda_f"], rtol=1e-6)


def test_model_files_are_written_under_temporary_names_then_renamed(auto_run):
    for folder in (auto_run["stage_dir"], auto_run["model_dir"]):
        for name in (models.BEST_MODEL, models.LATEST_MODEL, RUN_CONFIG,
                     SUMMARY_JSON, models.MODEL_CONFIG_JSON):
            target = os.path.join(folder, name)
            sources = [source for source, dest in auto_run["renames"] if dest == target]
            assert sources, f"{target} was not written by a rename"
            for source in sources:
                assert os.path.dirname(source) == folder and ".tmp-" in source
                assert not os.path.exists(source)
        leftovers = [p for p in glob.glob(os.path.join(folder, "**", "*tmp*"), recursive=True)]
        assert not leftovers
    # The best model was replaced at an improving evaluation, never written in place.
    assert os.path.exists(os.path.join(auto_run["model_dir"], models.BEST_MODEL))


def test_checkpoints_are_kept_and_point_to_the_last_step(auto_run):
    folder = os.path.join(auto_run["model_dir"], CHECKPOINT_DIR)
    latest = tf.train.latest_checkpoint(folder)
    assert latest.endswith(f"ckpt-{STEPS}")
    state = tf.train.get_checkpoint_state(folder)
    assert len(state.all_model_checkpoint_paths) == 2  # max_to_keep
    reader = tf.train.load_checkpoint(latest)
    iterations = [name for name in reader.get_variable_to_shape_map()
                  if name.startswith("optimizer/") and "iterations" in name]
    assert iterations and int(reader.get_tensor(iterations[0])) == STEPS


def test_model_config_and_export(auto_run):
    info = models.read_model_info(auto_run["model_dir"])
    assert info["class_names"] == CLASS_NAMES and info["input_mode"] == "image"
    assert info["image_size"] == 16 and info["method"] == "imcl"
    summary = auto_run["summary"]
    version_dir = os.path.join(auto_run["export_dir"], "tiny", "1")
    assert summary["export"] == version_dir
    assert os.path.exists(os.path.join(version_dir, "saved_model.pb"))
    assert export.read_class_names(version_dir) == CLASS_NAMES
    assert "export" not in (summary["logistic_stage"].get("files") or {})  # only the final model


# ---- best model, validation ----------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["stage_dir", "model_dir"])
def test_best_model_is_the_one_with_the_best_validation_map(auto_run, stage):
    folder = auto_run[stage]
    events = read_events(os.path.join(folder, LOG_DIR, "validation"))
    logged = [(step, float(value)) for step, value in events["metrics/mAP"]]
    assert [step for step, _ in logged] == [EVAL_EVERY, STEPS]
    summary = read_json(os.path.join(folder, SUMMARY_JSON))
    best_value = max(value for _, value in logged)
    best_step = next(step for step, value in logged if value == best_value)
    assert summary["best_step"] == best_step
    np.testing.assert_allclose(summary["best_val_mAP"], best_value, rtol=1e-6)
    config = auto_run["config"]
    best_scores, labels = validation_scores_of(os.path.join(folder, models.BEST_MODEL), config)
    np.testing.assert_allclose(mean_ap(best_scores, labels), best_value, rtol=1e-6)
    latest_scores, labels = validation_scores_of(os.path.join(folder, models.LATEST_MODEL), config)
    np.testing.assert_allclose(mean_ap(latest_scores, labels), logged[-1][1], rtol=1e-6)
    # The pipeline's order is the one load_split_arrays reads: the same images, the same labels.
    np.testing.assert_array_equal(labels, validation_arrays(auto_run["data_dir"])[1])


def test_logged_pr_curve_is_that_of_the_final_model(auto_run):
    scores, labels = validation_scores_of(os.path.join(auto_run["model_dir"], models.LATEST_MODEL),
                                          auto_run["config"])
    events = read_events(os.path.join(auto_run["model_dir"], LOG_DIR, "validation"))
    step, curve = events[f"pr_curve/001_{CLASS_NAMES[1]}/pr_curves"][-1]
    assert step == STEPS
    thresholds = np.linspace(0, 1, curve.shape[1])
    tp = [np.sum((labels[:, 1] > 0) & (scores[:, 1] >= t)) for t in thresholds]
    fp = [np.sum((labels[:, 1] < 0) & (scores[:, 1] >= t)) for t in thresholds]
    # a threshold sitting exactly on a score may flip with float32 rounding: compare loosely there
    close = np.array([np.min(np.abs(scores[:, 1] - t)) < 1e-6 for t in thresholds])
    np.testing.assert_array_equal(curve[0][~close], np.array(tp)[~close])
    np.testing.assert_array_equal(curve[1][~close], np.array(fp)[~close])


# ---- TensorBoard ---------------------------------------------------------------------------------


IMCL_TRAIN_TAGS = [
    "loss/loss", "loss/bce", "loss/loss_y", "loss/loss_f", "lambda/lambda_y", "lambda/lambda_f",
    "optimizer/learning_rate", "omp/omp_valid_fraction", "omp/residual_y_before",
    "omp/residual_f_before", "label_graph/mean_diagonal", "label_graph/mean_offdiagonal_mass",
    "label_graph/mean_abs_change", "label_graph/fraction_at_zero",
]
# Scalars Keras logs that repeat another one exactly: never written.
DUPLICATE_TRAIN_TAGS = ["omp/residual_y_after", "omp/residual_f_after"]
VALIDATION_TAGS = ["metrics/mAP", "metrics/mAP_all_classes", "metrics/mAP_label_weighted",
                   "metrics/best_mAP", "metrics/per_class_ap", "metrics/per_class_ap_table",
                   "loss/bce", "loss/loss_y", "loss/loss_f", "label_graph/heat_map",
                   "examples/validation_predictions", "metrics/frequency_group_gain",
                   f"pr_curve/000_{CLASS_NAMES[0]}/pr_curves"]


def hparams_session(log_dir):
    """(experiment, session_start_info) protos of the HParams plugin at a run's log root."""
    from tensorboard.plugins.hparams import plugin_data_pb2
    found = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.tag.startswith("_hparams_/"):
                    found[value.tag] = plugin_data_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content)
    return (found["_hparams_/experiment"].experiment,
            found["_hparams_/session_start_info"].session_start_info)


def test_imcl_tensorboard_has_every_training_and_validation_tag(auto_run):
    logs = os.path.join(auto_run["model_dir"], LOG_DIR)
    train_events = read_events(os.path.join(logs, "train"))
    missing = [tag for tag in IMCL_TRAIN_TAGS if tag not in train_events]
    assert not missing
    assert not set(DUPLICATE_TRAIN_TAGS) & set(train_events)
    assert [step for step, _ in train_events["loss/bce"]] == [1, 2, 4, 6]
    resolved = auto_run["summary"]["resolved"]
    for step, value in train_events["lambda/lambda_y"]:
        np.testing.assert_allclose(float(value), resolved["lambda_y"], rtol=1e-6)
    for step, value in train_events["optimizer/learning_rate"]:
        np.testing.assert_allclose(float(value), auto_run["config"].learning_rate, rtol=1e-6)
    for tag in ("omp/omp_valid_fraction",):
        assert all(0.0 <= float(value) <= 1.0 for _, value in train_events[tag])
    val_events = read_events(os.path.join(logs, "validation"))
    assert not [tag for tag in VALIDATION_TAGS if tag not in val_events]
    histogram = val_events["metrics/per_class_ap"][-1][1]  # [buckets, (left, right, count)]
    assert histogram[:, 2].sum() == len(CLASS_NAMES)
    for tag in ("metrics/frequency_group_gain", "label_graph/heat_map",
                "examples/validation_predictions"):
        assert [step for step, _ in val_events[tag]] == [EVAL_EVERY, STEPS]
        assert val_events[tag][-1][1].shape == (3,)  # width, height, PNG bytes
    assert os.path.exists(os.path.join(auto_run["model_dir"], FREQUENCY_CHART))
    # The chart compares with the control, named by the real methods.
    assert (auto_run["model_dir"], "IMCL", "Logistic") in auto_run["chart_names"]
    table = val_events["metrics/per_class_ap_table"][-1][1].item().decode()
    assert all(f"| {name} |" in table for name in CLASS_NAMES) and "control AP" in table


def test_best_map_is_the_running_maximum_and_the_hparams_metric(auto_run):
    logs = os.path.join(auto_run["model_dir"], LOG_DIR)
    val_events = read_events(os.path.join(logs, "validation"))
    maps = [float(value) for _, value in val_events["metrics/mAP"]]
    best = [float(value) for _, value in val_events["metrics/best_mAP"]]
    np.testing.assert_allclose(best, np.maximum.accumulate(maps), rtol=1e-6)
    np.testing.assert_allclose(best[-1], auto_run["summary"]["best_val_mAP"], rtol=1e-6)
    experiment, session = hparams_session(logs)
    assert [(m.name.group, m.name.tag) for m in experiment.metric_infos] == [
        ("validation", "metrics/best_mAP")]
    names = set(session.hparams)
    assert {"method", "learning_rate", "k", "lambda_y", "lambda_f", "label_graph", "batch_size",
            "known_ratio", "dictionary_size", "seed", "backbone"} <= names
    assert not {"verbose", "model_dir", "data_dir", "export_dir", "log_every"} & names
    assert len(names) <= 30
    assert session.hparams["method"].string_value == "imcl"
    shown_first = [info.name for info in experiment.hparam_infos if info.differs]
    assert len(shown_first) == 5 and "method" in shown_first


def test_validation_losses_are_those_of_the_model_on_the_validation_split(auto_run):
    config = auto_run["config"]
    model = keras.saving.load_model(os.path.join(auto_run["model_dir"], models.LATEST_MODEL),
                                    compile=False)
    dataset = data.make_dataset(config.data_dir, config.val_split, batch_size=config.batch_size,
                                deterministic=True)
    logits = np.concatenate([model(inputs).numpy() for inputs, _, _ in dataset]).astype(np.float64)
    labels = np.concatenate([batch_labels.numpy() for _, batch_labels, _ in dataset])
    known = labels != 0
    # BCE of every known entry of the split, summed, over their number (plain NumPy)
    per_entry = np.maximum(logits, 0) - logits * (labels > 0) + np.log1p(np.exp(-np.abs(logits)))
    expected = per_entry[known].sum() / known.sum()
    events = read_events(os.path.join(auto_run["model_dir"], LOG_DIR, "validation"))
    step, logged = events["loss/bce"][-1]
    assert step == STEPS
    np.testing.assert_allclose(float(logged), expected, rtol=1e-5)
    assert float(losses.masked_bce(labels, logits)) == pytest.approx(expected, rel=1e-5)
    assert all(float(value) > 0 for _, value in events["loss/loss_f"])


def test_logistic_tensorboard_has_no_smoothness_tags_and_no_duplicates(auto_run):
    logs = os.path.join(auto_run["control_dir"], LOG_DIR)
    train_events = read_events(os.path.join(logs, "train"))
    assert {"loss/bce", "optimizer/learning_rate"} <= set(train_events)
    assert "loss/loss" not in train_events  # = loss/bce without weight decay
    assert not {"loss/loss_y", "lambda/lambda_y", "omp/omp_valid_fraction"} & set(train_events)
    val_events = read_events(os.path.join(logs, "validation"))
    assert {"metrics/mAP", "loss/bce", "examples/validation_predictions"} <= set(val_events)
    assert not {"loss/loss_y", "label_graph/heat_map"} & set(val_events)
    assert "metrics/frequency_group_gain" not in val_events  # no control given
    stage_events = read_events(os.path.join(auto_run["stage_dir"], LOG_DIR, "validation"))
    # The warm-start stage is compared with the control too, never named "IMCL".
    assert "metrics/frequency_group_gain" in stage_events
    assert (auto_run["stage_dir"], "Logistic", "Logistic (control)") in auto_run["chart_names"]
    assert all(method != "IMCL" for folder, method, _ in auto_run["chart_names"]
               if folder == auto_run["stage_dir"])


# ---- progress and summary ------------------------------------------------------------------------


def test_progress_lines_and_summary(auto_run):
    stdout, summary = auto_run["stdout"], auto_run["summary"]
    assert f"step {EVAL_EVERY}/{STEPS} (50%)" in stdout and f"step {STEPS}/{STEPS} (100%)" in stdout
    assert "ETA" in stdout and "s/step" in stdout and "val mAP" in stdout
    assert (summary["steps"], summary["start_step"], summary["steps_this_run"]) == (STEPS, 0, STEPS)
    assert summary["logistic_stage"]["steps_this_run"] == STEPS
    assert json.loads(json.dumps(read_json(summary["summary_file"]))) == json.loads(
        json.dumps(summary, default=str))
    text = format_summary(summary)
    assert "stage 1/2: logistic baseline" in text and "stage 2/2: IMCL" in text
    assert os.path.join(auto_run["model_dir"], models.BEST_MODEL) in text
    assert summary["export"] in text and "tensorboard --logdir" in text


def test_rerunning_a_finished_run_does_not_train_or_export_again(auto_run):
    best = os.path.join(auto_run["model_dir"], models.BEST_MODEL)
    before = os.stat(best).st_mtime_ns
    summary = run(dataclasses.replace(auto_run["config"], verbose=0))
    assert (summary["start_step"], summary["steps_this_run"]) == (STEPS, 0)
    assert summary["logistic_stage"]["steps_this_run"] == 0
    assert summary["resumed_from"].endswith(f"ckpt-{STEPS}")
    assert export.list_versions(os.path.join(auto_run["export_dir"], "tiny")) == [1]
    assert os.stat(best).st_mtime_ns == before
    assert summary["best_val_mAP"] == auto_run["summary"]["best_val_mAP"]


# ---- mixed precision -----------------------------------------------------------------------------


@pytest.mark.slow
def test_mixed_precision_keeps_omp_and_losses_in_float32(tmp_path):
    data_dir = write_dataset(str(tmp_path / "data"), num_train=24, num_val=8)
    config = TrainConfig(
        data_dir=data_dir, model_dir=str(tmp_path / "run"), method="imcl", train_steps=3,
        eval_every=3, batch_size=8, dictionary_per_class=2, balance="none", val_split="",
        mixed_precision=True, verbose=0, seed=1)
    policy = keras.mixed_precision.global_policy().name
    trainer = _Trainer(config)
    try:
        summary = trainer.train()
    finally:
        keras.mixed_precision.set_global_policy(policy)
    model = trainer.model
    assert model.backbone.layers[1].compute_dtype == "float16"  # the convolutions run in half
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    logs = summary["final_train_logs"]
    assert all(np.isfinite(value) for value in logs.values()) and logs["loss_y"] > 0
    inputs, labels, ids = data.load_split_arrays(data_dir, "train", limit=8)
    assert model.extract_features(inputs).dtype == tf.float32  # what the OMP sees
    assert model(inputs).dtype == tf.float32
    terms = model._loss_terms(inputs, labels, ids, training=False)
    assert {name: value.dtype for name, value in terms.items()} == {
        name: tf.float32 for name in terms}
    assert run(dataclasses.replace(config, train_steps=3))["steps_this_run"] == 0
    assert keras.mixed_precision.global_policy().name == policy  # run() restores the caller's

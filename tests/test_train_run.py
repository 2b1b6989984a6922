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

from imcl_tf import data, export, models
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
    config = TrainConfig(
        data_dir=data_dir, model_dir=str(root / "run"), method="imcl", warm_start="auto",
        train_steps=STEPS, eval_every=EVAL_EVERY, checkpoint_every=2, log_every=2, batch_size=8,
        dictionary_per_class=3, refresh_every=2, label_graph="cooccurrence",
        calibration_batches=2, export_dir=str(root / "export"), export_model_name="tiny",
        seed=3, verbose=1)
    renames = []
    real_replace = os.replace

    def watched_replace(source, target):
        renames.append((str(source), str(target)))
        return real_replace(source, target)

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setattr(os, "replace", watched_replace)
        summary = run(config)
    model_dir = config.model_dir
    return {"config": config, "summary": summary, "renames": renames, "stdout": stdout.getvalue(),
            "data_dir": data_dir, "model_dir": model_dir, "export_dir": str(root / "export"),
            "stage_dir": os.path.join(model_dir, LOGISTIC_STAGE_DIR)}


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
    # loss_ratio balance (method spec 3.5): lambda = multiplier * L_c / L_term
    np.testing.assert_allclose(resolved["lambda_y"], config.lambda_y * resolved["calibration_bce"]
                               / resolved["calibration_loss_y"], rtol=1e-6)
    np.testing.assert_allclose(resolved["lambda_f"], config.lambda_f * resolved["calibration_bce"]
                               / resolved["calibration_loss_f"], rtol=1e-6)
    # The trained model carries the same lambdas.
    model = keras.saving.load_model(os.path.join(model_dir, models.LATEST_MODEL), compile=False)
    np.testing.assert_allclose(float(model.lambda_y.numpy()), resolved["lambda_y"], rtol=1e-6)
    np.testing.assert_allclose(float(model.lambda_f.numpy()), resolved["lambda_f"], rtol=1e-6)


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
    "omp/residual_y_after", "omp/residual_f_before", "omp/residual_f_after",
    "label_graph/mean_diagonal", "label_graph/mean_offdiagonal_mass",
    "label_graph/mean_abs_change", "label_graph/fraction_at_zero",
]
VALIDATION_TAGS = ["metrics/mAP", "metrics/mAP_all_classes", "metrics/mAP_label_weighted",
                   "metrics/per_class_ap", f"pr_curve/000_{CLASS_NAMES[0]}/pr_curves"]


def test_imcl_tensorboard_has_every_training_and_validation_tag(auto_run):
    logs = os.path.join(auto_run["model_dir"], LOG_DIR)
    train_events = read_events(os.path.join(logs, "train"))
    missing = [tag for tag in IMCL_TRAIN_TAGS if tag not in train_events]
    assert not missing
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
    [(step, image)] = val_events["metrics/frequency_group_gain"][-1:]
    assert step == STEPS and image.shape[0] == 3  # width, height, PNG bytes
    assert os.path.exists(os.path.join(auto_run["model_dir"], FREQUENCY_CHART))
    run_events = read_events(logs)  # the hparams session lives at the log root
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(run_events)


def test_logistic_tensorboard_has_no_smoothness_tags_and_no_chart(auto_run):
    logs = os.path.join(auto_run["stage_dir"], LOG_DIR)
    train_events = read_events(os.path.join(logs, "train"))
    assert {"loss/loss", "loss/bce", "optimizer/learning_rate"} <= set(train_events)
    assert not {"loss/loss_y", "lambda/lambda_y", "omp/omp_valid_fraction"} & set(train_events)
    val_events = read_events(os.path.join(logs, "validation"))
    assert "metrics/mAP" in val_events
    assert "metrics/frequency_group_gain" not in val_events  # not warm-started: no baseline


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

"""Tests of the training application's options: flags, flagfiles, configs/*.flags, validation.

Nothing here trains a model: these are fast checks of what happens before the first step.
"""

import dataclasses
import glob
import inspect
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

from imcl_tf import methods, models, train
from imcl_tf.methods import registry
from imcl_tf.training.config import TrainConfig
from imcl_tf.training.optimizer import PlateauState
from imcl_tf.training.progress import Clock
from imcl_tf.training.report import format_summary
from imcl_tf.training.run_files import RUN_CONFIG, write_json
from imcl_tf.training.summaries import write_pr_curves
from imcl_tf.training.trainer import _Trainer
from imcl_tf.training import progress
from test_train_common import CLASS_NAMES, REPO_ROOT, read_events, write_dataset, \
    write_features_dataset


def fresh_flags():
    flag_values = flags.FlagValues()
    train.define_flags(flag_values)
    return flag_values


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("config") / "data"), num_train=12, num_val=6)


def config_for(dataset, tmp_path, **overrides):
    values = dict(data_dir=dataset, model_dir=str(tmp_path / "run"))
    values.update(overrides)
    return TrainConfig(**values)


# ---- flags ---------------------------------------------------------------------------------------


def test_every_option_is_a_flag_with_the_same_default_and_a_help():
    flag_values = fresh_flags()
    flag_values(["train"])
    for field in dataclasses.fields(TrainConfig):
        if field.metadata.get("not_a_flag"):  # method_options: the methods' own flags, below
            assert field.name not in flag_values
            continue
        flag = flag_values[field.name]
        assert flag.default == field.default, field.name
        assert len(flag.help) > 10, field.name
        if field.metadata.get("choices"):
            assert list(flag.parser.enum_values) == list(field.metadata["choices"])
    for option in registry.all_options():
        flag = flag_values[option.name]
        assert flag.default == option.default and len(option.help) > 10, option.name
        if option.choices:
            assert list(flag.parser.enum_values) == list(option.choices)
    assert train.config_from_flags(flag_values) == TrainConfig()


def test_architecture_flags_exist():
    """The flags docs/architecture.md promises (their names are an interface)."""
    promised = ["data_dir", "model_dir", "method", "backbone", "backbone_weights", "image_size",
                "batch_size", "train_steps", "epochs", "learning_rate", "optimizer", "k",
                "lambda_y", "lambda_f", "balance", "dictionary_size", "dictionary_per_class",
                "refresh_every", "label_graph", "learn_label_graph", "asym_c", "warm_start",
                "strategy", "mixed_precision", "seed", "export_dir"]
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert not set(promised) - fields
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(TrainConfig)}
    assert set(choices["method"]) == set(registry.names()) >= {"imcl", "logistic"}
    assert set(choices["balance"]) >= {"loss_ratio", "none"}
    assert set(choices["strategy"]) == {"default", "mirrored", "multi_worker"}
    assert {"small_cnn", "mobilenet_v2", "resnet50", "resnet101", "features"} <= set(
        choices["backbone"])


def test_every_model_option_is_a_flag_and_reaches_the_model(dataset, tmp_path):
    """A new IMCLModel argument without a training flag (or not passed on) fails here."""
    derived = {"self", "num_classes", "input_shape_", "dictionary_size", "label_graph_init",
               "num_image_classes", "label_graph_layout", "method_options", "method_instance",
               "output", "kwargs"}  # from the dataset, the bank selection and the graph
    renamed = {"multiplier_y": "lambda_y", "multiplier_f": "lambda_f"}
    config = config_for(dataset, tmp_path, k=2, lambda_y=0.7, lambda_f=0.3, asym_c=1.5,
                        balance="none", learn_label_graph=False, clip_label_graph=False,
                        neighbour_mode="forward", feature_loss=False, freeze_batchnorm=True,
                        head_weight_decay=1e-4, atom_gradient=False, refit_mode="reuse_all",
                        dictionary_per_class=2, omp_jit_compile=False,
                        label_state_refresh_every=3)
    trainer = _Trainer(config)
    trainer._build()
    model_config = trainer.model.get_config()
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    arguments = [(name, model_config) for name in
                 inspect.signature(models.IMCLModel.__init__).parameters]
    arguments += [(name, model_config["method_options"]) for name in
                  inspect.signature(methods.get("imcl").__init__).parameters]
    for name, saved in arguments:
        if name in derived:
            continue
        flag = renamed.get(name, name)
        assert flag in fields, f"IMCLModel({name}=...) has no training flag"
        # BatchNorm is frozen only when the run starts from trained weights (none here).
        expected = trainer.freeze_batchnorm if name == "freeze_batchnorm" else getattr(config, flag)
        if name != "backbone_weights":  # only used to build; saved models record "none"
            assert saved[name] == expected, name
    assert trainer.model.method.dictionary_size >= 2


def test_flag_values_become_the_config():
    flag_values = fresh_flags()
    train.parse_flags(["train", "--k=5", "--nolearn_label_graph", "--optimizer=rmsprop",
                       "--learning_rate=0.01", "--backbone=mobilenet_v2"], flag_values)
    config = train.config_from_flags(flag_values)
    assert (config.k, config.learn_label_graph, config.optimizer, config.learning_rate,
            config.backbone) == (5, False, "rmsprop", 0.01, "mobilenet_v2")


def test_unknown_choice_is_refused_at_parse_time():
    with pytest.raises(flags.IllegalFlagValueError, match="resnet9"):
        train.parse_flags(["train", "--backbone=resnet9"], fresh_flags())
    with pytest.raises(flags.UnrecognizedFlagError, match="dictionnary_size"):
        train.parse_flags(["train", "--dictionnary_size=3"], fresh_flags())


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


def test_flagfiles_later_values_win_and_nested_files_resolve_beside_their_includer(
        tmp_path, monkeypatch):
    write(tmp_path / "configs" / "base.flags",
          "# the shared recipe\n--optimizer=rmsprop\n--k=2\n--batch_size=8\n\n// also a comment\n")
    write(tmp_path / "configs" / "experiments" / "exp.flags",
          "--flagfile=../base.flags\n--k=4\n  --learning_rate=0.01  \n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the nested include must not depend on the working directory
    flag_values = fresh_flags()
    exp = str(tmp_path / "configs" / "experiments" / "exp.flags")
    train.parse_flags(["train", "--batch_size=4", "--k=9", f"--flagfile={exp}", "--k=7"],
                      flag_values)
    config = train.config_from_flags(flag_values)
    assert config.optimizer == "rmsprop"  # from the included file
    assert config.batch_size == 8  # the file comes after --batch_size=4: it wins
    assert config.k == 7  # the command line after the file wins over the file's 4 and base's 2
    assert config.learning_rate == 0.01
    # The expansion is absl's own order: the same result as absl reading the files itself
    # (absl resolves nested paths against the working directory, so run it from there).
    monkeypatch.chdir(tmp_path / "configs" / "experiments")
    absl_values = fresh_flags()
    absl_values(["train", "--batch_size=4", "--k=9", f"--flagfile={exp}", "--k=7"])
    assert train.config_from_flags(absl_values) == config


def test_flagfile_as_separate_argument_and_positional_rest(tmp_path):
    path = write(tmp_path / "a.flags", "--k=6\n")
    flag_values = fresh_flags()
    rest = train.parse_flags(["train", "--flagfile", path, "--flagfile=", "extra"], flag_values)
    assert flag_values.k == 6
    assert rest == ["train", "extra"]


def test_flagfile_errors_name_the_file_and_the_include_chain(tmp_path):
    missing = str(tmp_path / "nope.flags")
    with pytest.raises(flags.CantOpenFlagFileError, match="nope.flags' does not exist"):
        train.parse_flags(["train", f"--flagfile={missing}"], fresh_flags())
    outer = write(tmp_path / "outer.flags", "--flagfile=inner.flags\n")
    write(tmp_path / "inner.flags", "--flagfile=missing.flags\n")
    with pytest.raises(flags.CantOpenFlagFileError, match="included by .*outer.flags -> "
                                                          ".*inner.flags"):
        train.parse_flags(["train", f"--flagfile={outer}"], fresh_flags())
    loop = write(tmp_path / "loop.flags", "--k=2\n--flagfile=loop.flags\n")
    with pytest.raises(flags.CantOpenFlagFileError, match="includes itself"):
        train.parse_flags(["train", f"--flagfile={loop}"], fresh_flags())


# ---- imcl_tf/configs/*.flags ---------------------------------------------------------------------


CONFIG_FILES = sorted(glob.glob(os.path.join(REPO_ROOT, "imcl_tf", "configs", "*.flags")))
DATASET_CONFIGS = ["demo.flags", "cub.flags", "coco.flags", "openimages.flags", "voc.flags"]


def flag_names_in(path):
    """The flag names a flagfile sets (bool flags may be written --name, --noname, --name=...)."""
    names = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", "//")):
                continue
            assert line.startswith("--"), f"{path}: {line!r} is not a --flag"
            names.append(line[2:].split("=", 1)[0])
    return names


def test_the_expected_configs_exist():
    names = {os.path.basename(path) for path in CONFIG_FILES}
    assert set(DATASET_CONFIGS) <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_file_sets_only_known_flags_with_valid_values(path):
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in flag_names_in(path):
        if name == "flagfile":
            continue
        base = name[2:] if name.startswith("no") and name[2:] in fields else name
        assert base in fields, f"{os.path.basename(path)} sets --{name}, which is not a flag"
        if name != base:
            assert isinstance(fields[base].default, bool)
    flag_values = fresh_flags()
    train.parse_flags(["train", f"--flagfile={path}"], flag_values)  # absl checks every value
    config = train.config_from_flags(flag_values)
    # Dataset folders are the user's: only the options themselves can be checked here.
    config = dataclasses.replace(config, data_dir=config.data_dir or "data",
                                 model_dir=config.model_dir or "run")
    config.validate_options()


@pytest.mark.parametrize("name", DATASET_CONFIGS)
def test_dataset_configs_explain_how_to_build_their_dataset(name):
    with open(os.path.join(REPO_ROOT, "imcl_tf", "configs", name), encoding="utf-8") as f:
        header = "".join(line for line in f if line.startswith("#"))
    assert "imcl-data " in header
    assert "imcl-data partial" in header or "partial labels" in header.lower()


def test_paper_configs_carry_the_papers_recipe():
    """Spot checks against docs/method.md (the values with a source in the paper's code)."""
    def parsed(name):
        flag_values = fresh_flags()
        path = os.path.join(REPO_ROOT, "imcl_tf", "configs", name)
        train.parse_flags(["train", f"--flagfile={path}"],
                          flag_values)
        return train.config_from_flags(flag_values)

    cub, coco, openimages = parsed("cub.flags"), parsed("coco.flags"), parsed("openimages.flags")
    for config in (cub, coco, openimages):
        assert config.optimizer == "rmsprop" and config.method == "imcl"
    assert (cub.backbone, cub.k, cub.asym_c, cub.batch_size, cub.learning_rate) == (
        "resnet101", 3, 2.0, 32, 0.01)
    assert (cub.lambda_y, cub.lambda_f, cub.dictionary_per_class, cub.refresh_every,
            cub.label_graph, cub.head_weight_decay) == (2.0, 0.5, 0, 1, "identity", 1e-4)
    assert (coco.k, coco.asym_c, coco.lambda_y, coco.lambda_f, coco.feature_loss,
            coco.refresh_every, coco.dictionary_per_class, coco.learn_label_graph) == (
        3, 1.0, 0.5, 0.25, False, 3000, 10, True)
    assert (openimages.k, openimages.asym_c, openimages.lambda_y, openimages.lambda_f,
            openimages.refresh_every, openimages.clip_label_graph) == (3, 2.0, 1.0, 0.0, 250,
                                                                       False)


# ---- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(backbone="resnet9"), r"--backbone: must be one of .*received 'resnet9'"),
    (dict(method="both"), r"--method: must be one of"),
    (dict(k=0), r"--k: must be in \[1, 8\].*received 0"),
    (dict(k=9), r"--k: must be in \[1, 8\].*received 9"),
    (dict(k=5, dictionary_size=3), r"--k: must be at most --dictionary_size=3"),
    (dict(data_dir=""), r"--data_dir: is required"),
    (dict(model_dir=""), r"--model_dir: is required"),
    (dict(batch_size=0), r"--batch_size: must be >= 1"),
    (dict(learning_rate=0.0), r"--learning_rate: must be > 0"),
    (dict(asym_c=0.5), r"--asym_c: must be >= 1, received 0.5"),
    (dict(lambda_f=-1.0), r"--lambda_f: multipliers must be >= 0"),
    (dict(refresh_every=0), r"--refresh_every: must be >= 1"),
    (dict(plateau_alpha=0.0), r"--plateau_alpha: must be in \(0, 1\]"),
    (dict(train_steps=0, epochs=0.0), r"--epochs: must be > 0 when --train_steps=0"),
    (dict(label_graph="wikipedia"), r"--label_graph: must be identity, cooccurrence or a .npy"),
    (dict(backbone_weights="imagenet"), r"--backbone_weights: --backbone=small_cnn has no "
                                        r"imagenet weights"),
    (dict(warm_start="auto", method="logistic"), r"--warm_start: 'auto' .* needs a --method other than logistic"),
    (dict(verbose=3), r"--verbose: must be 0, 1 or 2"),
])
def test_bad_options_are_refused_before_anything_runs(dataset, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        config_for(dataset, tmp_path, **overrides).validate()
    assert not os.path.exists(tmp_path / "run")  # nothing was written


def test_bad_options_against_the_data(dataset, tmp_path, monkeypatch):
    def refused(message, **overrides):
        with pytest.raises(ValueError, match=message):
            config_for(dataset, tmp_path, **overrides).validate()

    refused(r"--data_dir: '.*missing' has no dataset.json; build the dataset",
            data_dir=str(tmp_path / "missing"))
    refused(r"--val_split: 'validation' is not a split .* \['train', 'val'\]",
            val_split="validation")
    refused(r"--backbone: 'features' does not fit a dataset of mode 'image'", backbone="features")
    refused(r"--backbone_weights: '.*nope.weights.h5' is neither none, imagenet nor an existing",
            backbone_weights=str(tmp_path / "nope.weights.h5"))
    graph = str(tmp_path / "graph.npy")
    np.save(graph, np.eye(3, dtype=np.float32))
    refused(r"--label_graph: .*graph.npy' has shape \(3, 3\), the dataset has 5 classes",
            label_graph=graph)
    refused(r"--label_graph: .*absent.npy': no such file", label_graph=str(tmp_path / "absent.npy"))
    monkeypatch.delenv("TF_CONFIG", raising=False)
    refused(r"--strategy: multi_worker needs the TF_CONFIG environment variable",
            strategy="multi_worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": [
        f"127.0.0.1:{port}" for port in range(5)]}, "task": {"type": "worker", "index": 0}}))
    refused(r"--strategy: multi_worker with 5 workers needs at least 5 train shards; .* has 4",
            strategy="multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    refused(r"--strategy: TF_CONFIG is not valid JSON", strategy="multi_worker")
    features = write_features_dataset(str(tmp_path / "features"), num_train=4)
    refused(r"--augment: applies to images", data_dir=features, backbone="features", augment=True,
            val_split="")
    config_for(features, tmp_path, backbone="features", val_split="").validate()  # fine


def fake_finished_run(model_dir, class_names, backbone="small_cnn"):
    os.makedirs(model_dir, exist_ok=True)
    models.write_model_info(model_dir, {"class_names": list(class_names), "backbone": backbone,
                                        "input_mode": "image", "image_size": 16})
    return model_dir


def test_warm_start_must_match_the_data_and_the_backbone(dataset, tmp_path):
    def refused(message, source):
        with pytest.raises(ValueError, match=message):
            config_for(dataset, tmp_path, warm_start=source).validate()

    refused(r"--warm_start: '.*empty' is not the model_dir of a finished run",
            str(tmp_path / "empty"))
    refused(r"--warm_start: the run in .* has 3 classes but the dataset has 5",
            fake_finished_run(str(tmp_path / "three"), CLASS_NAMES[:3]))
    refused(r"--warm_start: the run in .* has other class names \(or order\)",
            fake_finished_run(str(tmp_path / "order"), CLASS_NAMES[::-1]))
    refused(r"--warm_start: the run in .* used backbone 'resnet50', this one 'small_cnn'",
            fake_finished_run(str(tmp_path / "resnet"), CLASS_NAMES, backbone="resnet50"))
    config_for(dataset, tmp_path, warm_start=fake_finished_run(
        str(tmp_path / "good"), CLASS_NAMES)).validate()


def test_tensorboard_options_are_checked_against_the_data(dataset, tmp_path):
    def refused(message, **overrides):
        with pytest.raises(ValueError, match=message):
            config_for(dataset, tmp_path, **overrides).validate()

    refused(r"--pr_classes: 'purple' is neither a class name \(e.g. 'red', 'green', 'blue'\) nor "
            r"a class index in \[0, 5\)", pr_classes="red,purple")
    refused(r"--pr_classes: '5' is neither", pr_classes="5")
    config_for(dataset, tmp_path, pr_classes="dark, 0,blue").validate()  # fine
    refused(r"--control_model_dir: '.*empty' is not the model_dir of a finished run",
            control_model_dir=str(tmp_path / "empty"))
    refused(r"--control_model_dir: the run in .* has other classes",
            control_model_dir=fake_finished_run(str(tmp_path / "order"), CLASS_NAMES[::-1]))
    control = fake_finished_run(str(tmp_path / "control"), CLASS_NAMES, backbone="resnet50")
    refused(r"--control_model_dir: compares validation APs; it needs --val_split",
            control_model_dir=control, val_split="")
    config_for(dataset, tmp_path, control_model_dir=control).validate()  # another backbone: fine


def test_a_checkpointed_run_resumes_only_with_compatible_settings(dataset, tmp_path):
    config = config_for(dataset, tmp_path, k=3, train_steps=10)
    model_dir = config.model_dir
    write_json(os.path.join(model_dir, RUN_CONFIG),
                          {"config": dataclasses.asdict(config)})
    config_for(dataset, tmp_path, k=4).validate()  # no checkpoint yet: a fresh start is fine
    write(os.path.join(model_dir, "checkpoints", "checkpoint"), 'model_checkpoint_path: "ckpt-2"\n')
    with pytest.raises(ValueError, match=r"--k: .* checkpointed with --k=3 \(now 4\); it can only "
                                         r"be resumed with the same settings"):
        config_for(dataset, tmp_path, k=4, train_steps=10).validate()
    # Longer training, other logging and another strategy are fine.
    config_for(dataset, tmp_path, k=3, train_steps=50, eval_every=5, log_every=1).validate()


# ---- parts of the loop ---------------------------------------------------------------------------


def test_plateau_rule_matches_a_plain_implementation(rng):
    config = TrainConfig(learning_rate=0.1, plateau_alpha=0.3, plateau_patience=2,
                                   plateau_min_lr=0.04, plateau_start_step=20)
    optimizer = keras.optimizers.SGD(config.learning_rate)
    state = PlateauState()
    maps = rng.random(30)
    ema, cooldown, lr, expected, got = 0.0, 0, 0.1, [], []
    for index, value in enumerate(maps):
        step = 10 * (index + 1)
        previous, ema = ema, 0.7 * ema + 0.3 * value
        if ema < previous and lr >= 0.04 and cooldown <= 0 and step >= 20:
            lr, cooldown = lr * 0.8, 2
        cooldown -= 1
        expected.append(lr)
        state.update(float(value), optimizer, config, step)
        got.append(float(keras.ops.convert_to_numpy(optimizer.learning_rate)))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert min(expected) < 0.1  # the sequence did decay at least once


def test_pr_curves_match_counts_computed_by_hand(tmp_path, rng):
    scores = rng.random([30, 3])
    labels = rng.choice([-1.0, 0.0, 1.0], size=[30, 3])
    writer = tf.summary.create_file_writer(str(tmp_path))
    with writer.as_default():
        write_pr_curves(scores, labels, ["a", "b", "c"], step=7, num_thresholds=11)
    writer.close()
    events = read_events(str(tmp_path))
    for c, name in enumerate(["a", "b", "c"]):
        [(step, tensor)] = events[f"pr_curve/{c:03d}_{name}/pr_curves"]
        assert step == 7
        for t, threshold in enumerate(np.linspace(0, 1, 11)):
            tp = sum(1 for s, l in zip(scores[:, c], labels[:, c]) if l > 0 and s >= threshold)
            fp = sum(1 for s, l in zip(scores[:, c], labels[:, c]) if l < 0 and s >= threshold)
            fn = sum(1 for s, l in zip(scores[:, c], labels[:, c]) if l > 0 and s < threshold)
            tn = sum(1 for s, l in zip(scores[:, c], labels[:, c]) if l < 0 and s < threshold)
            # rows of the plugin's tensor: TP, FP, TN, FN, precision, recall
            np.testing.assert_allclose(tensor[:4, t], [tp, fp, tn, fn])
            if tp + fp:
                assert abs(tensor[4, t] - tp / (tp + fp)) < 1e-6
            assert abs(tensor[5, t] - tp / max(tp + fn, 1)) < 1e-6


def test_progress_eta_uses_the_latest_interval(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    clock = Clock(start_step=0, total_steps=100)
    for steps, train_seconds, eval_seconds in ((20, 50.0, 4.0), (20, 10.0, 2.0)):
        clock.start_interval()
        now[0] += train_seconds
        clock.end_training(clock._step + steps)
        now[0] += eval_seconds
        clock.end_interval()
    # 60 steps left at 0.5 s (the first interval's tracing is not extrapolated), 3 evaluations
    # of 2 s; 66 s elapsed
    assert clock.describe(40, eval_every=20) == "0.500 s/step | elapsed 0:01:06 | ETA 0:00:36"


def test_format_summary_reports_metrics_losses_and_paths():
    stage = {"method": "logistic", "steps": 100, "start_step": 0, "steps_this_run": 100,
             "best_val_mAP": 0.5, "best_step": 80, "last_val_mAP": 0.49,
             "last_val_mAP_all_classes": 0.45, "final_train_logs": {"loss": 0.3, "bce": 0.3},
             "resolved": {}, "files": {"model_dir": "runs/x/logistic_stage",
                                       "best_model": "runs/x/logistic_stage/best.keras"}}
    summary = {"method": "imcl", "steps": 50, "start_step": 20, "steps_this_run": 30,
               "best_val_mAP": 0.61234, "best_step": 40, "last_val_mAP": 0.6,
               "last_val_mAP_all_classes": 0.58,
               "final_train_logs": {"loss": 1.5, "bce": 0.4, "loss_y": 0.2, "loss_f": 3.0,
                                    "omp_valid_fraction": 0.75, "residual_y_before": 2.0,
                                    "residual_y_after": 0.2, "residual_f_before": 9.0,
                                    "residual_f_after": 3.0},
               "resolved": {"lambda_y": 2.5, "lambda_f": 0.125, "warm_start": "runs/x/ls"},
               "files": {"model_dir": "runs/x", "best_model": "runs/x/best.keras",
                         "tensorboard": "runs/x/logs", "export": "exports/imcl/3"},
               "logistic_stage": stage, "wall_seconds": 3725}
    text = format_summary(summary)
    assert "stage 1/2: logistic baseline: 100 steps (100 in this session)" in text
    assert "stage 2/2: IMCL warm-started from the baseline: 50 steps (30 in this session, " \
           "resumed at step 20)" in text
    assert "best 0.6123 at step 40, last 0.6000 (all classes 0.5800)" in text
    assert "loss 1.5000  bce 0.4000  loss_y 0.2000  loss_f 3.0000" in text
    assert "valid neighbours 75.0%" in text and "label residual 2.0000 -> 0.2000" in text
    assert "lambda_y 2.5000  lambda_f 0.1250" in text
    assert "tensorboard --logdir runs/x/logs" in text and "exports/imcl/3" in text
    assert "total time: 1:02:05" in text
    no_val = dict(summary, best_val_mAP=None, logistic_stage=None)
    assert "validation       none" in format_summary(no_val)


@pytest.mark.slow
def test_cli_reports_bad_flags_and_help(dataset, tmp_path):
    def cli(*arguments):
        return subprocess.run([sys.executable, "-m", "imcl_tf.train", *arguments], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})

    bad = cli(f"--data_dir={dataset}", f"--model_dir={tmp_path / 'run'}", "--k=0")
    assert bad.returncode != 0
    assert "--k: must be in [1, 8]" in bad.stderr and "received 0" in bad.stderr
    assert not os.path.exists(tmp_path / "run")
    usage = cli("--helpfull")  # absl exits with status 1 after printing the help
    for name in ("--data_dir", "--warm_start", "--strategy", "--[no]mixed_precision", "--flagfile"):
        assert name in usage.stdout

"""The paper configs carry their official runs' recipes (docs/method.md §5), value by value."""

import os

import pytest

from imcl_tf import train
from imcl_tf.flagfiles import CONFIG_DIR
from imcl_tf.training.optimizer import part_learning_rates
from test_train_config import fresh_flags


def parsed(name):
    flag_values = fresh_flags()
    train.parse_flags(["train", f"--flagfile={os.path.join(CONFIG_DIR, name)}"],
                      flag_values)
    return train.config_from_flags(flag_values)


# name: {option: official value} (the official runs' hyperparameters, docs/method.md §5)
OFFICIAL = {
    "cub.flags": dict(
        optimizer="rmsprop", graph_optimizer="rmsprop", batch_size=32, train_steps=1000,
        warm_start_steps=2000, k=3, asym_c=2.0, omp_score_threshold=1e-6,
        omp_balance_scores=False, lambda_y=2.0, lambda_f=0.5, feature_loss=True,
        dictionary_per_class=0, refresh_every=1, label_graph="identity",
        learn_label_graph=False, class_label_weight=10.0, head_weight_decay=1e-4, eval_every=10,
        plateau_alpha=0.3, plateau_patience=2, plateau_min_lr=1e-4, freeze_batchnorm=True,
        bce_unknown_as_negative=False, reconstruction="linear", image_size=224),
    "coco.flags": dict(
        optimizer="rmsprop", graph_optimizer="rmsprop", batch_size=1, train_steps=320000, k=3,
        asym_c=1.0, omp_score_threshold=1e-20, omp_balance_scores=False, lambda_y=0.5,
        lambda_f=0.25, feature_loss=False, dictionary_per_class=10, refresh_every=3000,
        learn_label_graph=True, clip_label_graph=False, class_label_weight=0.0,
        head_weight_decay=0.0, eval_every=6400, plateau_alpha=0.3, plateau_patience=5,
        bce_unknown_as_negative=True, reconstruction="linear", image_size=224),
    "openimages.flags": dict(
        optimizer="rmsprop", graph_optimizer="rmsprop", batch_size=20, train_steps=182867, k=3,
        asym_c=2.0, omp_score_threshold=1e-3, omp_balance_scores=True, lambda_y=1.0,
        lambda_f=0.0, feature_loss=False, dictionary_per_class=10, refresh_every=250,
        learn_label_graph=True, clip_label_graph=False, class_label_weight=0.0,
        head_weight_decay=0.0, eval_every=500, plateau_alpha=0.5, plateau_patience=3,
        bce_unknown_as_negative=False, reconstruction="linear"),
    "openimages_features.flags": dict(
        optimizer="rmsprop", graph_optimizer="rmsprop", backbone="features", batch_size=32,
        train_steps=114292, k=1, asym_c=2.0, omp_score_threshold=1e-3,
        omp_balance_scores=False, lambda_y=1.0, lambda_f=0.5, feature_loss=True,
        dictionary_per_class=10, refresh_every=1, learn_label_graph=True,
        clip_label_graph=True, class_label_weight=0.0, head_weight_decay=0.0, eval_every=100,
        plateau_alpha=0.1, plateau_patience=11, plateau_min_lr=1.25e-4,
        bce_unknown_as_negative=False, reconstruction="linear"),
}
# (backbone, head, graph) base learning rates of the official runs.
RATES = {"cub.flags": (0.01, 0.01, 0.01), "coco.flags": (0.01, 0.01, 0.01),
         "openimages.flags": (1e-8, 1e-3, 0.5), "openimages_features.flags": (1e-3, 1e-3, 0.5)}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_config_reproduces_the_official_run(name):
    config = parsed(name)
    assert config.method == "imcl" and config.warm_start == "auto"
    for option, value in OFFICIAL[name].items():
        assert getattr(config, option) == pytest.approx(value) if isinstance(value, float) \
            else getattr(config, option) == value, f"{name}: --{option}"
    rates = part_learning_rates(config)
    assert (rates.backbone, rates.head, rates.graph) == pytest.approx(RATES[name])


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_config_says_where_it_differs_from_the_paper(name):
    with open(os.path.join(CONFIG_DIR, name), encoding="utf-8") as f:
        text = f.read()
    assert "# Differences from the paper" in text and "# Matches the official run" in text

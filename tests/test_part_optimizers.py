"""Per-part learning rates and optimizers against NumPy updates."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from imcl_tf import label_graph as graph_lib
from imcl_tf.models import IMCLModel
from imcl_tf.training.config import TrainConfig
from imcl_tf.training.optimizer import OfficialRMSprop, PlateauState, make_optimizer
from imcl_tf.training.trainer import _Trainer
from test_train_common import write_dataset

CLASSES, DIM, IMAGES = 4, 6, 24


def features_model(rng, **kwargs):
    """A features-mode IMCL model with a learnable dense graph and a filled bank."""
    keras.utils.set_random_seed(int(rng.integers(1 << 30)))  # the head's initial weights
    labels = np.where(rng.random((IMAGES, CLASSES)) < 0.5, 1.0, -1.0)
    labels *= rng.random((IMAGES, CLASSES)) < 0.6
    graph = graph_lib.normalize_graph(rng.random((CLASSES, CLASSES)) + 0.2)
    model = IMCLModel(CLASSES, (DIM,), backbone="features", method="imcl", dictionary_size=12,
                      k=2, balance="none", multiplier_y=0.7, multiplier_f=0.3,
                      label_graph_init=graph, clip_label_graph=False, omp_jit_compile=False,
                      **kwargs)
    inputs = rng.normal(size=(IMAGES, DIM)).astype(np.float32)
    ids = np.arange(IMAGES, dtype=np.int64) + 100
    model.method.fill_bank(inputs[:12], labels[:12].astype(np.float32), ids[:12])
    batch = (tf.constant(inputs[12:20]), tf.constant(labels[12:20], tf.float32),
             tf.constant(ids[12:20]))
    return model, batch


def gradients(model, batch):
    """{part: [gradient of each variable]} of the training loss, by a tape here."""
    with tf.GradientTape() as tape:
        loss = model._loss_terms(*batch, training=True)["loss"]
    parts = {part: model.part_variables(part) for part in ("backbone", "head", "graph")}
    flat = [v for part in parts.values() for v in part]
    grads = iter(tape.gradient(loss, flat))
    return {part: [next(grads).numpy() for _ in variables] for part, variables in parts.items()}


def values(model):
    return {part: [v.numpy().copy() for v in model.part_variables(part)]
            for part in ("backbone", "head", "graph")}


def test_each_part_moves_by_its_own_learning_rate(rng):
    model, batch = features_model(rng)
    rates = {"head": 0.05, "backbone": 0.002, "graph": 0.3}
    model.compile(optimizer=keras.optimizers.SGD(rates["head"]), jit_compile=False)
    model.set_part_optimizers({"backbone": keras.optimizers.SGD(rates["backbone"]),
                               "graph": keras.optimizers.SGD(rates["graph"])})
    assert all(model.part_variables(part) for part in rates)
    before, grads = values(model), gradients(model, batch)
    model.train_step(batch)
    after = values(model)
    for part, rate in rates.items():
        for old, new, grad in zip(before[part], after[part], grads[part]):
            assert np.abs(grad).max() > 0, part
            np.testing.assert_allclose(new, old - rate * grad, rtol=1e-4, atol=1e-7,
                                       err_msg=part)
    assert int(model.optimizer.iterations.numpy()) == 1


def test_graph_step_is_the_official_rmsprop_update(rng):
    """TF1 RMSProp(decay 0.9, momentum 0.9, epsilon 1.0, mean square starting at 1), in NumPy."""
    model, batch = features_model(rng)
    model.compile(optimizer=keras.optimizers.SGD(0.01), jit_compile=False)
    learning_rate = 0.5
    model.set_part_optimizers({"graph": make_optimizer("rmsprop", learning_rate)})
    assert isinstance(model.part_optimizers["graph"], OfficialRMSprop)
    [graph_values] = model.part_variables("graph")
    value = graph_values.numpy().astype(np.float64)
    mean_square, momentum = np.ones_like(value), np.zeros_like(value)
    for _ in range(3):
        [grad] = gradients(model, batch)["graph"]
        mean_square = 0.9 * mean_square + 0.1 * grad ** 2
        momentum = 0.9 * momentum + learning_rate * grad / np.sqrt(mean_square + 1.0)
        value = value - momentum
        model.train_step(batch)
        np.testing.assert_allclose(graph_values.numpy(), value, rtol=1e-5, atol=1e-7)


def test_the_graph_step_scales_with_lambda_y_under_rmsprop(rng):
    """Halving lambda_y halves the graph's first step (epsilon 1.0 >> g^2); Adam would not care.

    lambda_f = 0 keeps the OMP's choice independent of lambda_y's scale.
    """
    steps = []
    for multiplier in (0.002, 0.001):
        model, batch = features_model(np.random.default_rng(5))
        model.method.lambda_y.assign(multiplier)
        model.method.lambda_f.assign(0.0)
        model.compile(optimizer=keras.optimizers.SGD(0.0), jit_compile=False)
        model.set_part_optimizers({"graph": make_optimizer("rmsprop", 0.5)})
        [graph_values] = model.part_variables("graph")
        before = graph_values.numpy().copy()
        model.train_step(batch)
        steps.append(np.abs(graph_values.numpy() - before).mean())
    assert steps[0] > 0
    np.testing.assert_allclose(steps[1] / steps[0], 0.5, rtol=1e-3)


def test_a_frozen_backbone_does_not_move(rng):
    model, batch = features_model(rng)
    model.backbone.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(0.01), jit_compile=False)
    assert model.part_variables("backbone") == []
    with pytest.raises(ValueError, match="backbone has no trainable variables"):
        model.set_part_optimizers({"backbone": keras.optimizers.SGD(0.1)})
    model.set_part_optimizers({"graph": keras.optimizers.SGD(0.1)})
    backbone = [w.copy() for w in model.backbone.get_weights()]
    head = model.head.kernel.numpy().copy()
    for _ in range(2):
        model.train_step(batch)
    for old, new in zip(backbone, model.backbone.get_weights()):
        np.testing.assert_array_equal(old, new)
    assert np.abs(model.head.kernel.numpy() - head).max() > 0


def test_part_optimizers_of_a_config():
    """The backbone shares the head's optimizer at the same rate; frozen or other rates differ."""
    from imcl_tf.training.optimizer import make_part_optimizers, part_learning_rates
    config = TrainConfig(learning_rate=0.01, optimizer="sgd", graph_optimizer="rmsprop")
    rates = part_learning_rates(config)
    head, parts = make_part_optimizers(config, rates, graph_learnable=True)
    assert set(parts) == {"graph"} and isinstance(parts["graph"], OfficialRMSprop)
    assert isinstance(head, keras.optimizers.SGD)
    for value in (head.learning_rate, parts["graph"].learning_rate):
        assert float(value.numpy()) == pytest.approx(0.01)
    other = TrainConfig(learning_rate=0.01, backbone_learning_rate=1e-8, graph_learning_rate=0.5)
    head, parts = make_part_optimizers(other, part_learning_rates(other), graph_learnable=False)
    assert set(parts) == {"backbone"}
    assert float(parts["backbone"].learning_rate.numpy()) == pytest.approx(1e-8)
    frozen = TrainConfig(backbone_learning_rate=0.0)
    assert make_part_optimizers(frozen, part_learning_rates(frozen), False)[1] == {}


def test_plateau_scales_every_part_together():
    config = TrainConfig(learning_rate=0.1, plateau_alpha=1.0, plateau_patience=0)
    head, graph = keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.5)
    state = PlateauState()
    state.update(0.5, head, config, step=1, others=[graph])
    state.update(0.4, head, config, step=2, others=[graph])  # the EMA dropped: x 0.8
    assert float(head.learning_rate.numpy()) == pytest.approx(0.08)
    assert float(graph.learning_rate.numpy()) == pytest.approx(0.4)


@pytest.mark.slow
def test_trainer_gives_each_part_its_rate_and_checkpoints_every_optimizer(tmp_path):
    data_dir = write_dataset(str(tmp_path / "data"), num_train=32, num_val=8)
    config = TrainConfig(data_dir=data_dir, model_dir=str(tmp_path / "run"), method="imcl",
                         train_steps=3, eval_every=3, checkpoint_every=3, batch_size=8,
                         dictionary_per_class=3, calibration_batches=1, optimizer="rmsprop",
                         learning_rate=1e-3, backbone_learning_rate=0.0,
                         graph_learning_rate=0.5, label_graph="cooccurrence", verbose=0,
                         val_split="")
    config.validate()
    trainer = _Trainer(config)
    trainer.setup()
    model = trainer.model
    assert set(model.part_optimizers) == {"graph"}  # the backbone is frozen
    assert not model.backbone.trainable and model.part_variables("backbone") == []
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-3)
    assert float(model.part_optimizers["graph"].learning_rate.numpy()) == pytest.approx(0.5)
    assert trainer.learning_rates == {"backbone": 0.0, "head": 1e-3, "graph": 0.5}
    backbone = [w.copy() for w in model.backbone.get_weights()]
    trainer.fit()
    trainer.finish()
    for old, new in zip(backbone, model.backbone.get_weights()):
        np.testing.assert_array_equal(old, new)
    graph_state = [v.numpy() for v in model.part_optimizers["graph"].variables]
    assert any(np.abs(v).sum() > 0 for v in graph_state[2:])

    resumed = _Trainer(dataclasses.replace(config, train_steps=5))
    resumed.setup()
    assert resumed.start_step == 3
    restored = [v.numpy() for v in resumed.model.part_optimizers["graph"].variables]
    assert len(restored) == len(graph_state)
    for old, new in zip(graph_state, restored):
        np.testing.assert_array_equal(old, new)

"""BatchNorm frozen in the IMCL stage: queries and bank atoms are the same function of an image.

Issue 14, defect 2: in cached mode the queries' features and label states came from the backbone
in training mode (batch statistics), the bank's from inference mode (moving statistics), so the
smoothness terms pulled one function of the images towards another.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from imcl_tf.methods.imcl import _with_bias
from imcl_tf.models import IMCLModel, build_backbone
from imcl_tf.training.config import TrainConfig
from imcl_tf.training.trainer import _Trainer
from test_train_common import write_dataset

SIZE, CLASSES = 16, 5


def model_and_batch(rng, freeze):
    keras.utils.set_random_seed(3)
    model = IMCLModel(CLASSES, (SIZE, SIZE, 3), method="imcl", dictionary_size=8, k=2,
                      freeze_batchnorm=freeze, omp_jit_compile=False)
    # Moving statistics and affine parameters far from what a batch gives.
    for layer in model.backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(size=shape).astype(np.float32))
            layer.moving_variance.assign(rng.uniform(0.5, 3.0, size=shape).astype(np.float32))
            layer.gamma.assign(rng.uniform(0.5, 1.5, size=shape).astype(np.float32))
            layer.beta.assign(rng.normal(scale=0.3, size=shape).astype(np.float32))
    images = rng.uniform(0, 255, (8, SIZE, SIZE, 3)).astype(np.float32)
    labels = (np.where(rng.random((8, CLASSES)) < 0.4, 1.0, -1.0)
              * (rng.random((8, CLASSES)) < 0.5)).astype(np.float32)
    ids = np.arange(8, dtype=np.int64) + 7
    model.method.fill_bank(images, labels, ids)
    return model, (tf.constant(images), tf.constant(labels), tf.constant(ids))


def query_and_bank(model, batch):
    """The queries' OMP inputs as train_step computes them, and the bank's for the same images."""
    inputs, labels, ids = batch
    features = model.extract_features(inputs, training=True)
    logits = model.head(features)
    fit = model.method._neighbour_fit(inputs, features, logits, labels, ids, True,
                               model.method.lambda_y, model.method.lambda_f)
    # Identity graph: an atom's label state is the query's formula on the same image.
    return (fit["query_f"].numpy(), fit["query_y"].numpy(),
            _with_bias(model.method.bank.features).numpy(), model.method.selection_atom_states().numpy())


def test_frozen_batchnorm_queries_and_bank_agree(rng):
    model, batch = model_and_batch(rng, freeze=True)
    query_f, query_y, bank_f, bank_y = query_and_bank(model, batch)
    np.testing.assert_allclose(query_f, bank_f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(query_y, bank_y, rtol=1e-4, atol=1e-5)


def test_training_batchnorm_queries_and_bank_differ(rng):
    """The control: without freezing, the same images give other features and label states."""
    model, batch = model_and_batch(rng, freeze=False)
    query_f, query_y, bank_f, bank_y = query_and_bank(model, batch)
    assert np.abs(query_f - bank_f).max() > 1e-2
    assert np.abs(query_y - bank_y).max() > 1e-3


def test_frozen_batchnorm_keeps_statistics_and_affine_while_the_rest_trains(rng):
    model, batch = model_and_batch(rng, freeze=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
    norms = [layer for layer in model.backbone.layers
             if isinstance(layer, keras.layers.BatchNormalization)]
    frozen = [[w.numpy().copy() for w in layer.weights] for layer in norms]
    kernel = model.backbone.get_layer("stem_conv").kernel.numpy().copy()
    for _ in range(2):
        model.train_step(batch)
    for layer, before in zip(norms, frozen):
        for weight, old in zip(layer.weights, before):
            np.testing.assert_array_equal(weight.numpy(), old, weight.path)
    assert np.abs(model.backbone.get_layer("stem_conv").kernel.numpy() - kernel).max() > 0


@pytest.mark.slow
def test_trainer_freezes_batchnorm_only_when_starting_from_trained_weights(tmp_path):
    data_dir = write_dataset(str(tmp_path / "data"), num_train=16, num_val=8)
    weights = str(tmp_path / "backbone.weights.h5")
    build_backbone("small_cnn", (SIZE, SIZE, 3)).save_weights(weights)
    base = TrainConfig(data_dir=data_dir, model_dir=str(tmp_path / "run"), method="logistic",
                       train_steps=1, verbose=0)
    for overrides, frozen in ((dict(), False), (dict(backbone_weights=weights), True),
                              (dict(backbone_weights=weights, freeze_batchnorm=False), False)):
        trainer = _Trainer(dataclasses.replace(base, **overrides))
        trainer._build()
        assert trainer.freeze_batchnorm == frozen, overrides
        assert trainer.model.freeze_batchnorm == frozen
        norms = [layer for layer in trainer.model.backbone.layers
                 if isinstance(layer, keras.layers.BatchNormalization)]
        assert norms and all(layer.trainable != frozen for layer in norms)

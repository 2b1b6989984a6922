"""The CUB class-label augmentation (--class_label_weight, official weight_class), against NumPy.

The image-class one-hot enters the label states only: value a at the image's class and -1/c at
the others, always known, appended after the graph propagation; the cross-entropy and the outputs
keep the L classes.
"""

import dataclasses
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from imcl_tf import data, label_graph as graph_lib
from imcl_tf.models import IMCLModel
from imcl_tf.training.config import TrainConfig, image_class_count
from imcl_tf.training.trainer import _Trainer, run
from test_train_common import CLASS_NAMES, scene

CLASSES, SPECIES, DIM = 4, 3, 5


def np_asym_tanh(x, c):
    x = x.astype(np.float64)
    return (np.exp(x) - np.exp(-x)) / (np.exp(x) + c * np.exp(-x))


def reference_states(logits, labels, species, graph, c, weight, propagate):
    """[N, L + C]: u * (sigma_c(z) [G]) + clip(l, -1/c, 10), then a / -1/c on the classes."""
    predicted = np_asym_tanh(logits, c)
    if propagate:
        predicted = predicted @ graph
    unknown = 1.0 - np.abs(labels)
    states = unknown * predicted + np.clip(labels, -1.0 / c, 10.0)
    block = np.where(species > 0, weight, -1.0 / c)
    return np.concatenate([states, block], axis=1)


def test_label_states_and_losses_match_numpy(rng):
    keras.utils.set_random_seed(11)
    c, weight, atoms, batch = 2.0, 10.0, 10, 6
    graph = graph_lib.normalize_graph(rng.random((CLASSES, CLASSES)) + 0.1)
    model = IMCLModel(CLASSES, (DIM,), backbone="features", method="imcl",
                      dictionary_size=atoms, k=2, asym_c=c, label_graph_init=graph,
                      balance="none", multiplier_y=1.0, multiplier_f=0.5, omp_jit_compile=False,
                      class_label_weight=weight, num_image_classes=SPECIES)
    def rows(count):
        labels = np.where(rng.random((count, CLASSES)) < 0.5, 1.0, -1.0)
        labels *= rng.random((count, CLASSES)) < 0.5
        species = -np.ones((count, SPECIES))
        species[np.arange(count), rng.integers(0, SPECIES, count)] = 1.0
        return labels.astype(np.float32), species.astype(np.float32)
    bank_labels, bank_species = rows(atoms)
    bank_inputs = rng.normal(size=(atoms, DIM)).astype(np.float32)
    model.method.fill_bank(bank_inputs, np.concatenate([bank_labels, bank_species], 1),
                    np.arange(atoms, dtype=np.int64))
    labels, species = rows(batch)
    inputs = rng.normal(size=(batch, DIM)).astype(np.float32)
    full = tf.constant(np.concatenate([labels, species], 1))
    ids = tf.constant(np.arange(batch, dtype=np.int64) + 50)

    features = model.extract_features(inputs, training=True)
    logits = model.head(features)
    fit = model.method._neighbour_fit(inputs, features, logits, full, ids, True, model.method.lambda_y,
                               model.method.lambda_f)
    expected_query = reference_states(logits.numpy(), labels, species, graph, c, weight, False)
    np.testing.assert_allclose(fit["query_y"].numpy(), expected_query, rtol=1e-5, atol=1e-6)
    bank_logits = model.head(model.method.bank.features).numpy()
    matrix = model.method.label_graph.matrix.numpy()
    expected_atoms = reference_states(bank_logits, bank_labels, bank_species, matrix, c, weight,
                                      True)
    np.testing.assert_allclose(model.method.selection_atom_states().numpy(), expected_atoms,
                               rtol=1e-5, atol=1e-6)
    chosen = np.maximum(fit["omp"].indices.numpy(), 0)
    np.testing.assert_allclose(fit["neighbour_y"].numpy(), expected_atoms[chosen], rtol=1e-5,
                               atol=1e-6)

    terms = model._loss_terms(tf.constant(inputs), full, ids, training=True)
    probability = 1 / (1 + np.exp(-logits.numpy().astype(np.float64)))
    known = labels != 0
    targets = labels > 0
    bce = -np.sum(np.where(targets, np.log(probability), np.log(1 - probability)) * known)
    np.testing.assert_allclose(terms["bce"].numpy(), bce / known.sum(), rtol=1e-5)
    valid = fit["valid"].numpy()
    coef = np.where(valid, fit["coef_y"].numpy(), 0.0)
    recon = np.einsum("bk,bkl->bl", coef, np.where(valid[..., None], expected_atoms[chosen], 0))
    loss_y = np.sum((expected_query - recon) ** 2) / batch
    np.testing.assert_allclose(terms["loss_y"].numpy(), loss_y, rtol=1e-4)
    assert model(inputs).shape == (batch, CLASSES)  # the outputs keep the L classes


def test_the_class_block_steers_the_omp_to_same_class_atoms(rng):
    """With a = 10 the species entries dominate <r_y, y~>: the first neighbour shares the class."""
    keras.utils.set_random_seed(12)
    model = IMCLModel(CLASSES, (DIM,), backbone="features", method="imcl", dictionary_size=12,
                      k=1, balance="none", multiplier_f=0.0, omp_jit_compile=False,
                      class_label_weight=10.0, num_image_classes=SPECIES)
    species = np.arange(12) % SPECIES
    block = np.where(np.eye(SPECIES)[species] > 0, 1.0, -1.0)
    labels = np.zeros((12, CLASSES))
    model.method.fill_bank(rng.normal(size=(12, DIM)).astype(np.float32),
                    np.concatenate([labels, block], 1).astype(np.float32), np.arange(12))
    inputs = rng.normal(size=(6, DIM)).astype(np.float32)
    query_species = np.arange(6) % SPECIES
    query_block = np.where(np.eye(SPECIES)[query_species] > 0, 1.0, -1.0)
    full = tf.constant(np.concatenate([np.zeros((6, CLASSES)), query_block], 1), tf.float32)
    features = model.extract_features(inputs)
    fit = model.method._neighbour_fit(inputs, features, model.head(features), full,
                               tf.constant(np.arange(6) + 100), True, model.method.lambda_y, 0.0)
    chosen = fit["omp"].indices.numpy()[:, 0]
    np.testing.assert_array_equal(species[chosen], query_species)


def write_species_dataset(data_dir, rng, with_class=True, num=24, size=16, splits=("train",)):
    infos = {}
    for split in splits:
        with data.SplitWriter(data_dir, split, num_shards=2) as writer:
            for index in range(num):
                row = np.where(rng.random(len(CLASS_NAMES)) < 0.4, 1.0, -1.0)
                row[:2] = (1.0, -1.0) if index % 2 else (-1.0, 1.0)  # both kinds in every split
                if split == "train":
                    row[2:][rng.random(len(CLASS_NAMES) - 2) < 0.4] = 0.0
                png = tf.io.encode_png(scene(np.abs(row), rng, size)).numpy()
                writer.write(data.make_example(
                    f"{split}-{index:03d}", np.flatnonzero(row > 0), np.flatnonzero(row < 0),
                    len(CLASS_NAMES), png, image_class=index % SPECIES if with_class else None))
        infos[split] = writer.split_info
    labels = {"image_class_names": [f"s{i}" for i in range(SPECIES)]}
    data.save_dataset_info(data_dir, data.DatasetInfo(
        class_names=list(CLASS_NAMES), splits=infos, image_size=size, labels=labels))
    return data_dir


def test_make_dataset_appends_the_image_class_one_hot(tmp_path, rng):
    data_dir = write_species_dataset(str(tmp_path / "d"), rng)
    plain = data.load_split_arrays(data_dir, "train")[1]
    _, labels, _ = next(iter(data.make_dataset(data_dir, "train", batch_size=24,
                                               deterministic=True, image_classes=SPECIES)))
    labels = labels.numpy()
    assert labels.shape == (24, len(CLASS_NAMES) + SPECIES)
    np.testing.assert_array_equal(labels[:, :len(CLASS_NAMES)], plain)
    expected = -np.ones((24, SPECIES))
    expected[np.arange(24), np.arange(24) % SPECIES] = 1.0
    np.testing.assert_array_equal(labels[:, len(CLASS_NAMES):], expected)
    assert image_class_count(data.load_dataset_info(data_dir)) == SPECIES

    missing = write_species_dataset(str(tmp_path / "m"), rng, with_class=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="image/class is missing"):
        next(iter(data.make_dataset(missing, "train", batch_size=4, image_classes=SPECIES)))


@pytest.mark.slow
def test_a_run_with_class_labels_trains_and_refuses_data_without_classes(tmp_path, rng):
    data_dir = write_species_dataset(str(tmp_path / "d"), rng, splits=("train", "val"))
    config = TrainConfig(data_dir=data_dir, model_dir=str(tmp_path / "run"), method="imcl",
                         train_steps=2, eval_every=2, batch_size=8, dictionary_per_class=3,
                         calibration_batches=1, class_label_weight=10.0, val_split="val",
                         verbose=0)
    summary = run(config)
    assert np.isfinite(summary["final_train_logs"]["loss"])
    assert np.isfinite(summary["last_val_mAP"])
    trainer = _Trainer(dataclasses.replace(config, model_dir=str(tmp_path / "other")))
    trainer._build()
    assert trainer.model.method.num_image_classes == SPECIES
    assert trainer.model.method.bank.labels.shape[-1] == len(CLASS_NAMES) + SPECIES
    other = str(tmp_path / "plain")
    write_species_dataset(other, rng)
    info = data.load_dataset_info(other)
    data.replace_dataset_info(other, dataclasses.replace(info, labels={}))
    with pytest.raises(ValueError, match="--class_label_weight: needs image classes"):
        dataclasses.replace(config, data_dir=other, model_dir=str(tmp_path / "r2"),
                            val_split="").validate()

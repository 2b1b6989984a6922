"""Distributed training: MirroredStrategy on two logical CPUs, MultiWorkerMirroredStrategy on two
local worker processes.

Logical devices must be configured before TensorFlow initialises its runtime, so the mirrored
checks run in a fresh interpreter: this file executed as a script (`python
tests/test_train_distribution.py mirrored <folder>`). The multi-worker test starts two training
processes that find each other through TF_CONFIG on free 127.0.0.1 ports.
"""

import glob
import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(HERE)
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": os.pathsep.join(
    [REPO_ROOT, HERE, os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_mirrored_strategy_on_two_logical_cpus(tmp_path):
    result = subprocess.run([sys.executable, os.path.abspath(__file__), "mirrored",
                             str(tmp_path)], cwd=REPO_ROOT, env=ENV, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert "mirrored checks passed" in result.stdout


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_multi_worker_strategy_with_two_local_workers(tmp_path):
    from test_train_common import write_dataset

    data_dir = write_dataset(str(tmp_path / "data"), num_train=48, num_val=8, num_shards=4)
    model_dir = tmp_path / "run"
    export_dir = tmp_path / "export"
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    processes, logs = [], []
    for index in range(2):
        temp = tmp_path / f"tmp{index}"
        temp.mkdir()
        env = {**ENV, "TMPDIR": str(temp), "TF_CONFIG": json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}})}
        log = open(tmp_path / f"worker{index}.log", "w")
        logs.append(log)
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "imcl_tf.train", f"--data_dir={data_dir}",
             f"--model_dir={model_dir}", "--method=imcl", "--strategy=multi_worker",
             "--train_steps=4", "--eval_every=2", "--checkpoint_every=2", "--log_every=1",
             "--batch_size=8", "--dictionary_per_class=3", "--calibration_batches=1",
             "--refresh_every=2", "--verbose=2", f"--export_dir={export_dir}",
             "--export_model_name=mw"], cwd=REPO_ROOT, env=env, stdout=log, stderr=log))
    try:
        codes = [process.wait(timeout=900) for process in processes]
    finally:
        for process in processes:
            process.kill()
        for log in logs:
            log.close()
    outputs = [open(tmp_path / f"worker{i}.log").read() for i in range(2)]
    assert codes == [0, 0], "\n\n".join(output[-4000:] for output in outputs)

    summary = json.load(open(model_dir / "summary.json"))
    assert summary["num_replicas"] == 2 and summary["steps"] == 4 and summary["is_chief"]
    # Only the chief wrote into model_dir: one event file per log folder, nothing else.
    for folder in ("logs/train", "logs/validation"):
        assert len(glob.glob(str(model_dir / folder / "events.out.tfevents.*"))) == 1
    assert sorted(os.listdir(model_dir)) == ["best.keras", "checkpoints", "export.json",
                                             "latest.keras", "logs", "model_config.json",
                                             "run.lock", "run_config.json", "summary.json"]
    assert os.listdir(export_dir / "mw") == ["1"]  # one export, by the chief
    # The non-chief's private checkpoint folder was removed; the chief never made one.
    assert os.listdir(tmp_path / "tmp1") == [] and os.listdir(tmp_path / "tmp0") == []
    assert "step 4/4 (100%)" in outputs[0] and "step 4/4 (100%)" not in outputs[1]
    assert "validation mAP" in outputs[0]


# ---- the mirrored checks, run in a fresh interpreter ---------------------------------------------


def mirrored_checks(folder):
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])
    import keras

    from imcl_tf import models
    from imcl_tf.methods.imcl import BankRefresh
    from imcl_tf.training.config import TrainConfig
    from imcl_tf.training.distribution import make_strategy
    from imcl_tf.training.trainer import _Trainer
    from test_train_common import write_dataset

    strategy = make_strategy("mirrored")
    assert strategy.num_replicas_in_sync == 2, strategy.extended.worker_devices

    # 1. One step on the same global batch: the mirrored loss and update equal the default ones.
    rng = np.random.default_rng(0)
    num_classes, dim, bank_size, batch = 5, 6, 12, 8
    features = rng.normal(size=[batch, dim]).astype(np.float32)
    labels = rng.choice([-1.0, 1.0], size=[batch, num_classes]).astype(np.float32)
    for row in labels:  # 3 known entries per image: each replica's BCE mean has equal weight
        row[rng.choice(num_classes, 2, replace=False)] = 0.0
    ids = np.arange(100, 100 + batch, dtype=np.int64)
    bank_inputs = rng.normal(size=[bank_size, dim]).astype(np.float32)
    bank_labels = rng.choice([-1.0, 0.0, 1.0], size=[bank_size, num_classes])
    bank_ids = np.arange(bank_size, dtype=np.int64) + 100 - 4  # 4 queries are in the bank

    def one_step(scope_strategy):
        with scope_strategy.scope():
            keras.utils.set_random_seed(7)
            model = models.IMCLModel(num_classes, (dim,), backbone="features", method="imcl",
                                     dictionary_size=bank_size, k=2, balance="none",
                                     multiplier_y=1.0, multiplier_f=0.5,
                                     label_graph_init=np.full([num_classes] * 2, 0.2))
            model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
        model.method.fill_bank(bank_inputs, bank_labels, bank_ids)
        initial = [v.numpy() for v in model.trainable_variables]
        dataset = tf.data.Dataset.from_tensors((features, labels, ids))
        history = model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0)
        return model, history.history, initial

    reference, reference_logs, initial = one_step(tf.distribute.get_strategy())
    mirrored, mirrored_logs, _ = one_step(strategy)
    assert mirrored.distribute_strategy is strategy
    for name in ("loss", "bce", "loss_y", "loss_f"):
        np.testing.assert_allclose(mirrored_logs[name], reference_logs[name], rtol=1e-5,
                                   err_msg=name)
    assert reference_logs["loss_y"][0] > 0 and reference_logs["loss_f"][0] > 0
    # Same update = same gradient: the per-replica losses are divided by num_replicas_in_sync
    # before Keras sums the replicas' gradients (without it this would be twice the step).
    for ref, mir, start in zip(reference.trainable_variables, mirrored.trainable_variables,
                               initial):
        np.testing.assert_allclose(mir.numpy() - start, ref.numpy() - start, rtol=1e-4,
                                   atol=1e-7, err_msg=ref.path)
    assert all(np.abs(ref.numpy() - start).max() > 1e-4
               for ref, start in zip(reference.trainable_variables, initial))  # all did move
    print("mirrored: same loss and update as one device")

    # 2. A short IMCL run under --strategy=mirrored: the bank refresh happens between steps, in
    # cross-replica context, and updates every replica's copy of the bank.
    data_dir = write_dataset(os.path.join(folder, "data"), num_train=32, num_val=8)
    config = TrainConfig(
        data_dir=data_dir, model_dir=os.path.join(folder, "run"), method="imcl",
        strategy="mirrored", train_steps=4, eval_every=2, checkpoint_every=2, batch_size=8,
        dictionary_per_class=3, calibration_batches=1, refresh_every=2, verbose=0)
    config.validate()
    trainer = _Trainer(config)
    summary = trainer.train()
    assert summary["num_replicas"] == 2 and summary["steps_this_run"] == 4
    assert np.isfinite(summary["final_train_logs"]["loss"])
    refresher = trainer.callbacks[0]
    assert isinstance(refresher, BankRefresh) and refresher.refreshes >= 1
    model = trainer.model
    model.method.refresh_bank()
    expected = model.extract_features(tf.cast(model.method.bank.inputs, tf.float32)).numpy()
    copies = strategy.experimental_local_results(model.method.bank.features.value)
    assert len(copies) == 2
    for copy in copies:
        np.testing.assert_allclose(copy.numpy(), expected, rtol=1e-5, atol=1e-5)
    print("mirrored: training run and cross-replica bank refresh")
    print("mirrored checks passed")


if __name__ == "__main__":
    if sys.argv[1:2] == ["mirrored"]:
        mirrored_checks(sys.argv[2])
    else:
        sys.exit(f"usage: {sys.argv[0]} mirrored FOLDER")

"""tf.distribute for training: building the strategy, the chief, TF_CONFIG, multi-worker fixes."""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import keras
import tensorflow as tf

from imcl_tf.choices import STRATEGIES
from imcl_tf.training.errors import bad_flag


# One strategy object per process: MultiWorkerMirroredStrategy configures the collective runtime
# once, and the two stages of --warm_start=auto must share it.
_STRATEGIES: dict[str, tf.distribute.Strategy] = {}


def make_strategy(name: str) -> tf.distribute.Strategy:
    if name == "default":
        return tf.distribute.get_strategy()
    if name not in _STRATEGIES:
        if name == "mirrored":
            devices = ([d.name for d in tf.config.list_logical_devices("GPU")]
                       or [d.name for d in tf.config.list_logical_devices("CPU")])
            _STRATEGIES[name] = tf.distribute.MirroredStrategy(devices)
        elif name == "multi_worker":
            cluster_size()  # a clear error before TensorFlow's own
            _STRATEGIES[name] = tf.distribute.MultiWorkerMirroredStrategy()
        else:
            raise ValueError(f"--strategy: must be one of {', '.join(STRATEGIES)}; received "
                             f"{name!r}.")
    return _STRATEGIES[name]


@contextlib.contextmanager
def local_byte_variables(strategy: tf.distribute.Strategy):
    """Under MultiWorkerMirroredStrategy, creates uint8/int8 variables as plain local variables.

    The strategy broadcasts every new variable's initial value from the chief, but its collective
    ops have no uint8/int8 kernels ("Value for attr 'T' of uint8 is not in the list of allowed
    values"). The only such variables are the dictionary bank's stored images and label rows:
    non-trainable, never updated by a step, and filled by `fill_bank` with the same training
    records on every worker, so a local copy per worker is all they need.
    """
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        yield
        return
    from tensorflow.python.ops import resource_variable_ops  # the creator below the strategy's

    def creator(next_creator, **kwargs):
        dtype = kwargs.get("dtype")
        if dtype is not None and tf.as_dtype(dtype) in (tf.uint8, tf.int8):
            return resource_variable_ops.default_variable_creator_v2(None, **kwargs)
        return next_creator(**kwargs)

    with tf.variable_creator_scope(creator):
        yield


def prepare_multi_worker_fit(model: keras.Model, strategy: tf.distribute.Strategy,
                             input_shape: tuple[int, ...], batch_size: int,
                             num_classes: int) -> None:
    """Works around two places where Keras' `fit` fails with several workers.

    1. `fit` starts with `_maybe_symbolic_build`, which passes the whole (inputs, labels, ids)
       sample batch to `strategy.reduce`; MultiWorkerMirroredStrategy cannot reduce a nested
       structure ("Attempt to convert a value (PerReplica...) to a Tensor"). The reduced batch
       only serves as a shape template, so the same build is done here from a batch spec and
       `fit`'s is turned off.
    2. The logs of every step are reduced across workers with `strategy.reduce("MEAN", v,
       axis=0)`, which fails for scalars ("Invalid reduction dimension 0 for input with 0
       dimensions"). The train step's logs get a leading axis of 1 so the reduction returns the
       scalar mean (the loss trackers are already summed over replicas, so it is their value).
    """
    sample = (tf.TensorSpec((batch_size,) + tuple(input_shape), tf.float32),
              tf.TensorSpec((batch_size, num_classes), tf.float32),
              tf.TensorSpec((batch_size,), tf.int64))
    with strategy.scope():
        model._symbolic_build(data_batch=sample)
    model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    train_step = model.train_step

    def train_step_with_vector_logs(data):
        return {name: tf.reshape(value, [1]) for name, value in train_step(data).items()}

    model.train_step = train_step_with_vector_logs


def _tf_config() -> dict[str, Any]:
    text = os.environ.get("TF_CONFIG", "")
    if not text:
        bad_flag("strategy", "multi_worker needs the TF_CONFIG environment variable (the cluster "
                             "spec and this worker's task), e.g. TF_CONFIG='{\"cluster\": "
                             "{\"worker\": [\"host1:12345\", \"host2:12345\"]}, \"task\": "
                             "{\"type\": \"worker\", \"index\": 0}}'.")
    try:
        tf_config = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--strategy: TF_CONFIG is not valid JSON ({e}); received {text!r}.")
    if not isinstance(tf_config, dict) or "cluster" not in tf_config or "task" not in tf_config:
        bad_flag("strategy", f"TF_CONFIG needs 'cluster' and 'task' entries; received {text!r}.")
    return tf_config


def cluster_size() -> int:
    """Workers (chief included) in TF_CONFIG's cluster."""
    cluster = _tf_config()["cluster"]
    size = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
    if size < 1:
        bad_flag("strategy", f"TF_CONFIG's cluster has no worker or chief; received {cluster!r}.")
    return size


def task_id() -> int:
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    return int(tf_config.get("task", {}).get("index", 0))


def _is_chief_task() -> bool:
    """The chief of TF_CONFIG: task 'chief', or worker 0 when the cluster has no chief."""
    tf_config = json.loads(os.environ.get("TF_CONFIG", "{}"))
    task = tf_config.get("task", {})
    if "chief" in tf_config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0


def is_chief(strategy) -> bool:
    """Only the chief writes logs, checkpoints and exports (docs/architecture.md)."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return True
    return _is_chief_task()


def is_chief_process(strategy_name: str) -> bool:
    return strategy_name != "multi_worker" or _is_chief_task()

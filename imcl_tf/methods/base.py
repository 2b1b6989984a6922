"""What a training method is: the `Method` layer the model holds, and the run it is given.

The model (`imcl_tf.models.IMCLModel`) owns the backbone and the classifier head and knows
nothing of any method. It holds one `Method` (`model.method`), a Keras layer whose weights are
saved and checkpointed with the model's, and asks it for

  - `logits(model, features, training, output)`: the per-class scores [B, L] (before a sigmoid)
    that calling the model, evaluation and the exported signatures return; by default the
    classifier head's;
  - `loss_terms(model, batch, training)`: the training loss ("loss") and its named parts
    (TERMS), each logged to TensorBoard under loss/<name>.

The training application (`imcl_tf.training.trainer`) builds a method with `from_run(run)` and
gives it a `RunContext` at three moments: `prepare` (a new run, after any warm start), `restore`
(after a checkpoint restore) and `callbacks` (Keras callbacks for the fit loop). What a method
keeps per training image (a curriculum's label state, a bank) lives in its weights, so it
survives a resume.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import keras
import numpy as np
import tensorflow as tf

from imcl_tf import losses


@dataclasses.dataclass
class Batch:
    """One training (or validation) batch as a method sees it.

    inputs: the model's inputs; labels: float32 [B, L (+ C)] in {+1, -1, 0} (C image-class
    columns when the method asks for them, see Method.image_classes); ids: int64 [B] id hashes;
    features: float32 [B, D], the backbone's pooled features of `inputs` (training mode in a
    training step).
    """
    inputs: Any
    labels: tf.Tensor
    ids: tf.Tensor
    features: tf.Tensor


class RunContext:
    """What the training application gives a method: the options, the data, the pipelines.

    config: the run's TrainConfig; info: the dataset's DatasetInfo; image_size: the input size
    (None for features); strategy: the tf.distribute strategy; seed: the run's seed.
    `dataset(split, training, seed=None)` makes a pipeline of (inputs, labels, ids) batches of
    the run's batch size (training: shuffled, repeated); `read_train_subset(indices)` yields the
    training records at `indices` (positions in the split's shard order) as (inputs, labels,
    ids) chunks. `train_labels` and `train_ids` (the split's rows [N, L] int8 and id hashes [N],
    in shard order) are read on first use.
    """

    def __init__(self, config, info, image_size: int | None, strategy,
                 dataset: Callable[..., tf.data.Dataset],
                 read_train_subset: Callable[[np.ndarray], Iterable],
                 read_train_labels: Callable[[], tuple[np.ndarray, np.ndarray]],
                 warm_started: bool = False):
        self.config = config
        self.info = info
        self.image_size = image_size
        self.strategy = strategy
        self.seed = int(config.seed)
        self.dataset = dataset
        self.read_train_subset = read_train_subset
        self._read_train_labels = read_train_labels
        self.warm_started = warm_started

    @functools.cached_property
    def _train_rows(self) -> tuple[np.ndarray, np.ndarray]:
        return self._read_train_labels()

    @property
    def train_labels(self) -> np.ndarray:
        return self._train_rows[0]

    @property
    def train_ids(self) -> np.ndarray:
        return self._train_rows[1]

    def option(self, name: str) -> Any:
        """The value of method option `name` (its flag, or the default its module declares)."""
        from imcl_tf.methods import registry
        values = dict(registry.option_defaults(self.config.method))
        if name not in values:
            raise KeyError(f"method {self.config.method!r} declares no option {name!r}.")
        values.update(self.config.method_options or {})
        return values[name]


class Method(keras.layers.Layer):
    """A way of training the multi-label model from partial labels; subclass per method.

    Subclasses set NAME (the registry name), TERMS (the loss parts their loss_terms returns
    besides "loss"), and override what differs from the logistic baseline. Constructor
    arguments are the method's options (plain Python values) and are returned by get_config, so
    a saved model rebuilds its method.
    """

    NAME = ""
    TERMS: tuple[str, ...] = ("bce",)
    # Named score outputs; the first is the one calling the model returns (Latent Noise has two).
    OUTPUTS: tuple[str, ...] = ("scores",)
    # Parts besides "backbone" that may be given an optimizer of their own (set_part_optimizers).
    PARTS: tuple[str, ...] = ()
    # Options shown in TensorBoard's HParams dashboard (TrainConfig fields or method options).
    HPARAMS: tuple[str, ...] = ()

    def __init__(self, num_classes: int, **kwargs):
        kwargs.setdefault("name", f"method_{self.NAME}")
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"{type(self).__name__}: num_classes must be >= 1, received "
                             f"{num_classes}.")
        self.num_classes = int(num_classes)

    # ---- building ------------------------------------------------------------------------------

    @classmethod
    def from_run(cls, run: RunContext) -> "Method":
        """The method a training run asks for (its options from run.config / run.option)."""
        from imcl_tf.methods import registry
        return cls(num_classes=run.info.num_classes,
                   **{o.name: run.option(o.name) for o in registry.options(cls.NAME)})

    def attach(self, model) -> None:
        """Creates the method's own weights; called once by the model after its backbone and
        head exist (model.feature_dim, model.num_classes, model.head)."""
        self.built = True

    @property
    def image_classes(self) -> int:
        """Image-class columns the training batches should carry after the L labels (IMCL's
        class-label augmentation); 0 for most methods."""
        return 0

    # ---- the model's questions -----------------------------------------------------------------

    def logits(self, model, features, training=False, output: str | None = None) -> tf.Tensor:
        """Per-class scores [B, L] before a sigmoid (higher: more likely present)."""
        return model.head(features)

    def loss_terms(self, model, batch: Batch, training: bool) -> dict[str, tf.Tensor]:
        """{"loss": the scalar to minimise, and each name of TERMS}: float32 scalars."""
        raise NotImplementedError

    def validation_terms(self, model, batch: Batch) -> dict[str, tf.Tensor]:
        """Extra validation losses as per-batch SUMS (name -> scalar); logged as loss/<name>."""
        return {}

    def part_variables(self, part: str) -> list:
        """The trainable variables of one of PARTS."""
        return []

    # ---- the training application's moments ----------------------------------------------------

    def prepare(self, model, run: RunContext) -> dict[str, Any]:
        """A new run, after the warm start: fill state, calibrate. Returns values to record in
        run_config.json's "resolved"."""
        return {}

    def restore(self, model, run: RunContext) -> None:
        """After a checkpoint restore: rebuild what checkpoints do not hold."""

    def callbacks(self, model, run: RunContext) -> list[keras.callbacks.Callback]:
        """Keras callbacks for the fit loop (run before TensorBoard logging and checkpoints)."""
        return []

    def scalars(self) -> dict[str, float]:
        """Extra TensorBoard scalars of the training run at each log step (tag -> value)."""
        return {}

    def get_config(self):
        return {"num_classes": self.num_classes}


def known_bce(labels, logits, unknown_as_negative: bool = False) -> tf.Tensor:
    """The masked BCE over the L label columns of `labels` (every method's reference loss)."""
    num_classes = logits.shape[-1]
    return losses.masked_bce(labels[..., :num_classes], logits, unknown_as_negative)


class Untracked:
    """Holds a value (optimizers, derived variables) out of sight of Keras saving and tf.train
    dependency tracking: not saved, not checkpointed."""

    def __init__(self, value):
        self.value = value


def unpack(data):
    """(inputs, labels, ids) of a batch, with a clear error for anything else."""
    if not (isinstance(data, (tuple, list)) and len(data) == 3):
        raise ValueError("IMCLModel expects batches (inputs, labels, ids) as made by "
                         "imcl_tf.data.make_dataset; received a batch of structure "
                         f"{tf.nest.map_structure(lambda t: getattr(t, 'shape', t), data)}.")
    return data

"""Curriculum Labeling: the partial-BCE, and a curriculum that labels the confident unknowns.

Durand, Mehrasa & Mori, "Learning a Deep ConvNet for Multi-label Classification with Partial
Labels", CVPR 2019; the "Curriculum Labeling" column of the IMCL paper's supplement (Tables 1-2).

The paper, and how it is followed here:

  - Partial-BCE (their Eq. 2): per image, g(p_y) / L * sum over the KNOWN classes of the BCE,
    where p_y is the proportion of the image's L labels that are known and
    g(p) = alpha * p^gamma + beta. alpha and beta are fixed by g(0.1) = 5 and g(1) = 1, so
    gamma is the one hyperparameter (`--curriculum_gamma`); gamma = 1 (a linear g, alpha =
    -4/0.9, beta = 1 + 4/0.9) is the paper's choice (an independent public reimplementation
    uses the same alpha = -4.45, beta = 5.45, gamma = 1). The batch loss is the mean over the
    batch's images (the paper is silent; a per-image loss averaged over the minibatch is the
    usual reading).
  - Curriculum (their Algorithm 1, "score threshold" strategy): training proceeds in stages of
    `--curriculum_stage_steps` steps; between stages the model scores every training image
    (inference mode, every image once) and an UNKNOWN entry becomes +1 when its probability is
    above theta and -1 when it is below 1 - theta. The paper thresholds the score (logit) x at
    +theta_x / -theta_x; on probabilities that is theta = sigmoid(theta_x), and the default
    0.8808 is sigmoid(2), a score threshold theta_x = 2. The rule itself (unknown entries whose
    logit is above +theta_x or below -theta_x take its sign) matches a public reimplementation
    of the paper's strategies; the value 2 is recalled, not checked against the paper's text,
    which was not at hand: set `--curriculum_theta` if yours differs. Both signs are
    labelled, as in the paper's score-threshold strategy; `--curriculum_signs=positive` is its
    "positive only" variant, which the paper found worse. theta = 0.5 labels every unknown entry
    at once (the paper's "2 steps" baseline).
  - Labels once given are kept: later passes only look at entries still unknown, and the
    dataset's known entries never change. The pseudo-labels count as known in p_y afterwards
    (they join the training set in the paper).

Where the paper is silent: the stage length (a number of steps here, default 2000: set it to
the run's length divided by the number of stages wanted); the first relabelling happens at the
first stage boundary, none at the end of training (no stage would use it); a pass runs at the
first training step that begins at or after a boundary, so a resumed run relabels exactly
where an uninterrupted run would.

The label state lives PER TRAINING IMAGE in the method's weights (non-trainable): the sorted id
hashes [N] and the int8 label rows [N, L], plus the stage reached and the counts of labelled
entries. A checkpoint holds them, so a resume continues with the same labels. A training
batch's rows are replaced by the state's rows (looked up by id); an id the state does not hold
(a validation image) keeps its batch labels. The state costs N * L bytes: fine for MS-COCO or
CUB, too much for all of Open Images.

Left out: the paper's graph head (a GNN over the classifier's scores, their Sec. 3.2), an
optional module independent of the labelling; its Bayesian-uncertainty and proportion
strategies (the IMCL paper compares with the score-threshold curriculum). The dataset's
unknown-as-negative mode (`--bce_unknown_as_negative`) leaves nothing to label and is refused.
"""

from __future__ import annotations

import math

import keras
import numpy as np
import tensorflow as tf

from imcl_tf import losses
from imcl_tf.methods.base import Batch, Method, RunContext

OPTIONS = (
    ("curriculum_gamma", 1.0, "Exponent gamma of the partial-BCE's normalisation "
     "g(p) = alpha p^gamma + beta of the proportion p of known labels (alpha, beta from "
     "g(0.1) = 5 and g(1) = 1); not 0. The paper uses 1.", None),
    ("curriculum_theta", 0.8808, "Score threshold on probabilities, in [0.5, 1): an unknown "
     "entry becomes +1 above it and -1 below 1 - theta. sigmoid(2), the paper's threshold 2 on "
     "the logit.", None),
    ("curriculum_stage_steps", 2000, "Training steps per curriculum stage; the unknown entries "
     "of every training image are relabelled between stages.", None),
    ("curriculum_signs", "both", "Which labels the curriculum gives: both (+1 and -1, the "
     "paper's score-threshold strategy) or positive (its positive-only variant).",
     ("both", "positive")),
)

# The two constraints that leave gamma as g's only free parameter: g(0.1) = 5, g(1) = 1.
_LOW_PROPORTION = 0.1
_G_AT_LOW_PROPORTION = 5.0


def normalization_coefficients(gamma: float) -> tuple[float, float]:
    """(alpha, beta) of g(p) = alpha p^gamma + beta with g(0.1) = 5 and g(1) = 1.

    Example:
      >>> [round(c, 4) for c in normalization_coefficients(1.0)]
      [-4.4444, 5.4444]
    """
    gamma = float(gamma)
    if gamma == 0.0 or not math.isfinite(gamma):
        raise ValueError(f"curriculum_gamma must be a finite number other than 0 (g would be a "
                         f"constant, which cannot meet g(0.1) = 5 and g(1) = 1). Received: "
                         f"curriculum_gamma={gamma}.")
    alpha = (_G_AT_LOW_PROPORTION - 1.0) / (_LOW_PROPORTION ** gamma - 1.0)
    return alpha, 1.0 - alpha


def normalization(proportion, gamma: float) -> tf.Tensor:
    """g(p) = alpha p^gamma + beta, float32 (infinite at p = 0 when gamma < 0)."""
    alpha, beta = normalization_coefficients(gamma)
    proportion = tf.cast(proportion, tf.float32)
    return alpha * tf.pow(proportion, gamma) + beta


def partial_bce(labels, logits, gamma: float) -> tf.Tensor:
    """The partial-BCE of a batch, float32 scalar: mean over images of g(p) / L * sum BCE_known.

    An image without any known label contributes 0 (and g is never evaluated at p = 0, where it
    is infinite for gamma < 0).

    Args:
      labels: [B, L] in {+1, -1, 0}.
      logits: [B, L], any float dtype.
      gamma: g's exponent (see `normalization_coefficients`).
    """
    per_entry, known = losses.masked_bce_per_entry(labels, logits)  # [B, L] each
    num_classes = tf.cast(tf.shape(known)[-1], tf.float32)
    proportion = tf.reduce_sum(known, axis=-1) / num_classes  # [B], p_y
    has_known = proportion > 0.0
    # A safe p in the untaken branch keeps both the value and its gradient finite.
    weight = tf.where(has_known,
                      normalization(tf.where(has_known, proportion, 1.0), gamma), 0.0)  # [B]
    per_image = weight * tf.reduce_sum(per_entry, axis=-1) / num_classes  # [B]
    return tf.math.divide_no_nan(tf.reduce_sum(per_image),
                                 tf.cast(tf.size(per_image), tf.float32))


def threshold_labels(rows, probabilities, theta: float, positive_only: bool = False
                     ) -> tf.Tensor:
    """The score-threshold rule: unknown entries (0) of `rows` become +1 where the probability
    is above theta and -1 where it is below 1 - theta; every other entry is returned unchanged.

    Args:
      rows: [B, L] label rows in {+1, -1, 0}, any numeric dtype (returned in that dtype).
      probabilities: [B, L] predicted probabilities.
      theta: the threshold, in [0.5, 1).
      positive_only: give +1 labels only (the paper's positive-only variant).
    """
    rows = tf.convert_to_tensor(rows)
    probabilities = tf.cast(probabilities, tf.float32)
    unknown = tf.equal(rows, tf.zeros_like(rows))
    positive = unknown & (probabilities > theta)
    negative = unknown & (probabilities < 1.0 - theta) & tf.constant(not positive_only)
    return tf.where(positive, tf.ones_like(rows), tf.where(negative, -tf.ones_like(rows), rows))


def lookup_positions(sorted_ids, ids) -> tuple[tf.Tensor, tf.Tensor]:
    """Where each of `ids` sits in `sorted_ids`: (positions int64 [B], found bool [B]).

    A position is only meaningful where found; it is clipped into range elsewhere so that a
    gather with it is safe. `sorted_ids` must be sorted ascending (and non-empty).
    """
    sorted_ids = tf.convert_to_tensor(sorted_ids, tf.int64)
    ids = tf.convert_to_tensor(ids, tf.int64)
    positions = tf.searchsorted(sorted_ids, ids, side="left", out_type=tf.int64)  # [B]
    positions = tf.minimum(positions, tf.cast(tf.size(sorted_ids), tf.int64) - 1)
    found = tf.equal(tf.gather(sorted_ids, positions), ids)
    return positions, found


def state_rows(sorted_ids, state_labels, ids, labels) -> tf.Tensor:
    """The batch's label rows with those of images the state holds replaced by the state's.

    Args:
      sorted_ids: int64 [N] ascending id hashes of the state (N may be 0).
      state_labels: [N, L] label rows of the state, any numeric dtype.
      ids: int64 [B] id hashes of the batch.
      labels: [B, L] the batch's label rows (their dtype is kept).
    """
    labels = tf.convert_to_tensor(labels)
    if sorted_ids.shape[0] == 0:
        return labels
    positions, found = lookup_positions(sorted_ids, ids)
    rows = tf.cast(tf.gather(state_labels, positions), labels.dtype)  # [B, L]
    return tf.where(found[:, tf.newaxis], rows, labels)


class Curriculum(Method):
    """Partial-BCE and a score-threshold curriculum; the label state lives in the weights."""

    NAME = "curriculum"
    TERMS = ("partial_bce",)
    HPARAMS = ("curriculum_gamma", "curriculum_theta", "curriculum_stage_steps",
               "curriculum_signs")

    def __init__(self, num_classes: int, num_train_images: int = 0,
                 curriculum_gamma: float = 1.0, curriculum_theta: float = 0.8808,
                 curriculum_stage_steps: int = 2000, curriculum_signs: str = "both", **kwargs):
        super().__init__(num_classes, **kwargs)
        normalization_coefficients(curriculum_gamma)  # refuses gamma = 0 here, not mid-run
        if not 0.5 <= float(curriculum_theta) < 1.0:
            raise ValueError(f"curriculum_theta must be in [0.5, 1) (a probability threshold; "
                             f"0.5 labels every unknown entry). Received: "
                             f"curriculum_theta={curriculum_theta}.")
        if int(curriculum_stage_steps) < 1:
            raise ValueError(f"curriculum_stage_steps must be >= 1. Received: "
                             f"curriculum_stage_steps={curriculum_stage_steps}.")
        if curriculum_signs not in ("both", "positive"):
            raise ValueError(f"curriculum_signs must be 'both' or 'positive'. Received: "
                             f"curriculum_signs={curriculum_signs!r}.")
        if int(num_train_images) < 0:
            raise ValueError(f"num_train_images must be >= 0. Received: "
                             f"num_train_images={num_train_images}.")
        self.num_train_images = int(num_train_images)
        self.gamma = float(curriculum_gamma)
        self.theta = float(curriculum_theta)
        self.stage_steps = int(curriculum_stage_steps)
        self.signs = curriculum_signs

    @classmethod
    def from_run(cls, run: RunContext) -> "Curriculum":
        if run.config.bce_unknown_as_negative:
            raise ValueError("--method=curriculum labels the unknown entries of the training "
                             "labels; --bce_unknown_as_negative turns them all into negatives, "
                             "leaving nothing to label. Drop one of the two.")
        from imcl_tf.methods import registry
        return cls(num_classes=run.info.num_classes, num_train_images=len(run.train_ids),
                   **{o.name: run.option(o.name) for o in registry.options(cls.NAME)})

    def attach(self, model) -> None:
        n, num_classes = self.num_train_images, self.num_classes
        self.state_ids = self.add_weight(shape=(n,), dtype="int64", initializer="zeros",
                                         trainable=False, name="state_ids")
        self.state_labels = self.add_weight(shape=(n, num_classes), dtype="int8",
                                            initializer="zeros", trainable=False,
                                            name="state_labels")
        # Stages finished, and the entries labelled so far as [positives, negatives].
        self.stage = self.add_weight(shape=(), dtype="int64", initializer="zeros",
                                     trainable=False, name="stage")
        self.labelled = self.add_weight(shape=(2,), dtype="int64", initializer="zeros",
                                        trainable=False, name="labelled")
        super().attach(model)

    # ---- the model's questions -----------------------------------------------------------------

    def current_labels(self, ids, labels) -> tf.Tensor:
        """The batch's L label columns with the state's rows for the training images."""
        return state_rows(self.state_ids.value, self.state_labels.value, ids,
                          labels[..., :self.num_classes])

    def loss_terms(self, model, batch: Batch, training: bool):
        labels = self.current_labels(batch.ids, batch.labels)
        loss = partial_bce(labels, self.logits(model, batch.features, training), self.gamma)
        return {"loss": loss, "partial_bce": loss}

    # ---- the training application's moments ----------------------------------------------------

    def prepare(self, model, run: RunContext):
        ids, labels = self._checked_train_rows(run)
        order = np.argsort(ids, kind="stable")
        self.state_ids.assign(ids[order])
        self.state_labels.assign(labels[order].astype(np.int8))
        self.stage.assign(0)
        self.labelled.assign(np.zeros([2], np.int64))
        alpha, beta = normalization_coefficients(self.gamma)
        return {"curriculum_train_images": self.num_train_images, "curriculum_alpha": alpha,
                "curriculum_beta": beta}

    def restore(self, model, run: RunContext) -> None:
        # The checkpoint holds the state; make sure it belongs to this run's training split.
        ids, _ = self._checked_train_rows(run)
        if not np.array_equal(np.sort(ids), self.state_ids.numpy()):
            raise ValueError("curriculum: the checkpoint's label state holds other training "
                             "images than this run's training split (a different --data_dir?). "
                             "Resume with the data the run was started with, or start a new "
                             "--model_dir.")

    def callbacks(self, model, run: RunContext):
        return [CurriculumCallback(self, model, lambda: run.dataset("train", training=False))]

    def scalars(self):
        positives, negatives = (int(v) for v in self.labelled.numpy())
        return {"curriculum/labelled": float(positives + negatives),
                "curriculum/labelled_positive": float(positives),
                "curriculum/labelled_negative": float(negatives),
                "curriculum/stage": float(self.stage.numpy())}

    # ---- the curriculum ------------------------------------------------------------------------

    def relabel(self, model, dataset: tf.data.Dataset) -> tuple[int, int]:
        """One pass of the score-threshold rule over `dataset` ((inputs, labels, ids) batches,
        every training image once); updates the state in place. Returns the (positives,
        negatives) it labelled."""
        if self.num_train_images == 0:
            return 0, 0
        step = self._relabel_step(model)
        counts = tf.zeros([2], tf.int64)
        for inputs, _, ids in dataset:
            counts += step(inputs, ids)
        self.labelled.assign_add(counts)
        positives, negatives = (int(v) for v in counts.numpy())
        return positives, negatives

    def _relabel_step(self, model):
        positive_only = self.signs == "positive"

        @tf.function(reduce_retracing=True)
        def step(inputs, ids):
            positions, found = lookup_positions(self.state_ids.value, ids)
            positions = tf.boolean_mask(positions, found)  # only training images count
            rows = tf.gather(self.state_labels.value, positions)  # [B', L]
            probabilities = tf.sigmoid(tf.cast(
                tf.boolean_mask(model(inputs, training=False), found), tf.float32))
            new_rows = threshold_labels(rows, probabilities, self.theta, positive_only)
            self.state_labels.value.scatter_update(tf.IndexedSlices(new_rows, positions))
            changed = tf.not_equal(new_rows, rows)
            return tf.stack([
                tf.math.count_nonzero(changed & (new_rows > 0), dtype=tf.int64),
                tf.math.count_nonzero(changed & (new_rows < 0), dtype=tf.int64)])

        return step

    def _checked_train_rows(self, run: RunContext) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(run.train_ids, np.int64)
        labels = np.asarray(run.train_labels)
        if len(ids) != self.num_train_images or labels.shape != (len(ids), self.num_classes):
            raise ValueError(f"curriculum: the method was built for {self.num_train_images} "
                             f"training images of {self.num_classes} classes; the run's "
                             f"training split has labels of shape {labels.shape}. Build it "
                             f"with Curriculum.from_run(run).")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("curriculum: two training images share an id hash, so the label "
                             "state cannot tell them apart. Give every image of the training "
                             "split a distinct image/id.")
        return ids, labels

    def get_config(self):
        return {**super().get_config(), "num_train_images": self.num_train_images,
                "curriculum_gamma": self.gamma, "curriculum_theta": self.theta,
                "curriculum_stage_steps": self.stage_steps, "curriculum_signs": self.signs}


class CurriculumCallback(keras.callbacks.Callback):
    """Runs the relabelling pass at the first training step that begins at or after a stage
    boundary (optimizer step a multiple of curriculum_stage_steps), so a resumed run relabels
    where an uninterrupted run does; never at the end of training."""

    def __init__(self, method: Curriculum, model, train_images):
        super().__init__()
        self.method = method
        self.imcl_model = model
        self.train_images = train_images  # () -> every training image once, fixed order

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.imcl_model.optimizer.iterations.numpy())
        reached = step // self.method.stage_steps
        if reached > int(self.method.stage.numpy()):
            self.method.relabel(self.imcl_model, self.train_images())
            self.method.stage.assign(reached)


METHOD = Curriculum

"""LSEP: the log-sum-exp pairwise ranking loss on the known labels (a comparison method).

Li, Song & Luo, "Improving Pairwise Ranking for Multi-label Image Classification", CVPR 2017;
one of the baselines of the IMCL paper (Huynh & Elhamifar, CVPR 2020, supplement Table 2). Per
image, with V its positives and U its negatives,

    l(f) = log(1 + sum_{v in V} sum_{u in U} exp(f_u - f_v)),

a smooth surrogate of the pairwise hinge ranking loss: every negative class should score below
every positive one. The scores f are the classifier head's logits.

Adapted to partial labels: V and U are the KNOWN positives (+1) and KNOWN negatives (-1) of the
label row; unknown entries (0) take part in no pair, so their logits get no gradient. This is the
partial-label reading of the IMCL paper's comparison (a missing label is neither above nor below
anything). The batch loss is the mean of l over the images that have at least one pair; an image
without a known positive or without a known negative adds 0 and is not counted, and a batch
without any pair gives 0 (not NaN).

Choices where the paper is silent or where this implementation differs:
  - All pairs (`lsep_max_pairs=0`, the default) are computed exactly, in O(L) per image rather
    than O(|V| |U|): the double sum factorises, sum_u sum_v exp(f_u - f_v) =
    (sum_u exp f_u)(sum_v exp -f_v), so l = softplus(logsumexp_U(f) + logsumexp_V(-f)), which is
    also numerically stable (no exponential of a raw logit is ever formed).
  - The paper's negative sampling ("sample at most t pairs" per image, to cut the
    O(|V| |U|) cost) is kept as `lsep_max_pairs = t` for fidelity, since it changes the loss
    being minimised. An image with at most t pairs uses all of them (the exact value above); one
    with more uses exactly t pairs, each a known positive and a known negative drawn uniformly
    and independently, i.e. pairs drawn uniformly from V x U WITH replacement (the paper does
    not say; drawing with replacement costs O(t + L) per image, and for t much smaller than
    |V| |U| it hardly differs from drawing without). The draws are in-graph `tf.random` ops,
    seeded by the global seed (the run's seed), so a run is reproducible under op determinism.
  - The loss is a mean over images, not a sum (the paper's per-image losses are summed over a
    minibatch of fixed size; a mean keeps the learning rate independent of the batch size, as
    the masked BCE of every other method here does).

Left out: the paper's label decision module (a label-count estimator and per-class thresholds
learnt on top of the ranking scores, to turn a ranking into a set of labels). The IMCL
comparison reports mAP, which needs only the ranking scores, so the thresholds play no part in
it; predictions here are the logits (and their sigmoids), as for every method.
"""

from __future__ import annotations

import tensorflow as tf

from imcl_tf.methods.base import Batch, Method
from imcl_tf.methods.ranking import known_sets

OPTIONS = (
    ("lsep_max_pairs", 0, "LSEP negative sampling: an image with more (known positive, known "
     "negative) pairs than this uses this many, drawn uniformly with replacement (the paper's "
     "t); 0: every pair, exactly.", None),
)

# The value an entry outside the mask takes in masked_logsumexp: exp(_NO_ENTRY - f) is 0 in
# float32 for any real logit f, and _NO_ENTRY + _NO_ENTRY is still finite.
_NO_ENTRY = -1e30


def lsep_loss(logits, labels, max_pairs: int = 0, seed: int | None = None,
              pairs: tuple[tf.Tensor, tf.Tensor] | None = None) -> tf.Tensor:
    """The LSEP loss of a batch on its known labels, float32 scalar.

    The mean over images with at least one (known positive, known negative) pair of
    log(1 + sum over the pairs (v, u) of exp(f_u - f_v)); 0 for a batch without any pair.

    Args:
      logits: [B, L] scores f, any float dtype.
      labels: [B, L] in {+1, -1, 0} (present, absent, unknown).
      max_pairs: 0 for every pair; t > 0: an image with more than t pairs uses t pairs drawn
        uniformly with replacement (`sample_lsep_pairs`).
      seed: the op seed of the draw (with the global seed, as for any tf.random op).
      pairs: (positive, negative) [B, t] class indices to use instead of drawing them, as
        `sample_lsep_pairs(labels, t)` returns them; t must equal max_pairs.

    Example:
      >>> round(float(lsep_loss([[2.0, 0.0, 1.0]], [[1.0, -1.0, -1.0]])), 4)
      0.4076
    """
    if max_pairs < 0:
        raise ValueError(f"lsep_loss: max_pairs must be >= 0 (0: every pair). Received: "
                         f"max_pairs={max_pairs!r}; set --lsep_max_pairs to 0 or more.")
    if pairs is not None and max_pairs == 0:
        raise ValueError("lsep_loss: pairs were given with max_pairs=0 (every pair); give "
                         "max_pairs = their number of columns, or no pairs.")
    logits, positive, negative = known_sets("lsep_loss", logits, labels)
    num_positive = tf.reduce_sum(tf.cast(positive, tf.int32), axis=-1)  # [B]
    num_negative = tf.reduce_sum(tf.cast(negative, tf.int32), axis=-1)  # [B]
    num_pairs = num_positive * num_negative  # [B]
    has_pairs = num_pairs > 0
    # log sum_u sum_v exp(f_u - f_v) = logsumexp_U(f) + logsumexp_V(-f): every pair, in O(L).
    all_pairs = masked_logsumexp(logits, negative) + masked_logsumexp(-logits, positive)  # [B]
    pair_term = all_pairs
    if max_pairs > 0:
        if pairs is None:
            pairs = sample_lsep_pairs(labels, max_pairs, seed)
        positive_index, negative_index = _checked_pairs(pairs, max_pairs)
        differences = (tf.gather(logits, negative_index, batch_dims=1)
                       - tf.gather(logits, positive_index, batch_dims=1))  # [B, t]
        pair_term = tf.where(num_pairs > max_pairs, tf.reduce_logsumexp(differences, axis=-1),
                             all_pairs)
    # The "1 +" is softplus: log(1 + exp(x)), stable for any x. Rows without a pair give 0 here
    # and, through tf.where, no gradient (their masked log-sum-exp is a finite stand-in).
    per_image = tf.where(has_pairs, tf.nn.softplus(pair_term), 0.0)  # [B]
    return tf.math.divide_no_nan(tf.reduce_sum(per_image),
                                 tf.reduce_sum(tf.cast(has_pairs, tf.float32)))


def sample_lsep_pairs(labels, max_pairs: int, seed: int | None = None
                      ) -> tuple[tf.Tensor, tf.Tensor]:
    """`max_pairs` (known positive, known negative) pairs per image, uniform over V x U.

    Each pair's positive and negative are drawn uniformly and independently among the image's
    known positives and known negatives (with replacement). In a row without a known positive
    (or negative) the indices are those of some class, and meaningless: `lsep_loss` uses
    the sampled pairs only of rows with more than max_pairs pairs.

    Args:
      labels: [B, L] in {+1, -1, 0}.
      max_pairs: t > 0, the pairs per image.
      seed: the op seed of the one tf.random.uniform draw.

    Returns:
      (positive, negative): int32 [B, t] class indices.
    """
    if max_pairs < 1:
        raise ValueError(f"sample_lsep_pairs: max_pairs must be >= 1. Received: "
                         f"max_pairs={max_pairs!r}.")
    labels = tf.cast(tf.convert_to_tensor(labels), tf.float32)
    batch = tf.shape(labels)[0]
    # One draw for both sides, so that a fixed op seed cannot make them the same sequence.
    uniform = tf.random.uniform([batch, max_pairs, 2], seed=seed)  # [B, t, 2]
    positive_index = _draw_among(labels > 0.0, uniform[..., 0])
    negative_index = _draw_among(labels < 0.0, uniform[..., 1])
    return positive_index, negative_index


def masked_logsumexp(values, mask) -> tf.Tensor:
    """log sum over the masked entries of exp(values), per row: [B, L] -> [B].

    A row without a masked entry gets a large negative finite value (not -inf), so that its
    gradient stays finite; callers mask such rows out.
    """
    stand_in = tf.fill(tf.shape(values), tf.constant(_NO_ENTRY, values.dtype))
    return tf.reduce_logsumexp(tf.where(mask, values, stand_in), axis=-1)


def _draw_among(members, uniform):
    """The class index of the floor(uniform * n)-th member of each row ([B, L] bool, [B, t])."""
    count = tf.reduce_sum(tf.cast(members, tf.int32), axis=-1, keepdims=True)  # [B, 1]
    # Members first, in class order (a stable sort of 0 for members, 1 for the others).
    members_first = tf.argsort(tf.cast(~members, tf.int32), axis=-1, stable=True)  # [B, L]
    position = tf.cast(tf.floor(uniform * tf.cast(count, tf.float32)), tf.int32)  # [B, t]
    # float32 rounding can reach n for a uniform just below 1; an empty row reads slot 0.
    position = tf.clip_by_value(position, 0, tf.maximum(count - 1, 0))
    return tf.gather(members_first, position, batch_dims=1)


def _checked_pairs(pairs, max_pairs):
    positive_index, negative_index = (tf.convert_to_tensor(p) for p in pairs)
    for name, index in (("positive", positive_index), ("negative", negative_index)):
        if index.shape.rank != 2 or index.shape[-1] not in (None, max_pairs):
            raise ValueError(f"lsep_loss: pairs must be (positive, negative) [B, max_pairs="
                             f"{max_pairs}] class indices. Received: {name}.shape="
                             f"{index.shape}.")
    return positive_index, negative_index


class LSEP(Method):
    """The LSEP ranking loss on the known pairs; `lsep_max_pairs` samples them (0: all)."""

    NAME = "lsep"
    TERMS = ("lsep",)
    HPARAMS = ("lsep_max_pairs",)

    def __init__(self, num_classes: int, lsep_max_pairs: int = 0, **kwargs):
        super().__init__(num_classes, **kwargs)
        if isinstance(lsep_max_pairs, bool) or int(lsep_max_pairs) != lsep_max_pairs \
                or lsep_max_pairs < 0:
            raise ValueError(f"LSEP: lsep_max_pairs must be an integer >= 0 (0: every pair). "
                             f"Received: lsep_max_pairs={lsep_max_pairs!r}; set "
                             "--lsep_max_pairs.")
        self.lsep_max_pairs = int(lsep_max_pairs)

    def loss_terms(self, model, batch: Batch, training: bool):
        logits = self.logits(model, batch.features, training)
        loss = lsep_loss(logits, batch.labels[..., :self.num_classes], self.lsep_max_pairs)
        return {"loss": loss, "lsep": loss}

    def get_config(self):
        return {**super().get_config(), "lsep_max_pairs": self.lsep_max_pairs}


METHOD = LSEP

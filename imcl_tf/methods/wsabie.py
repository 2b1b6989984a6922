"""WSABIE: the WARP (weighted approximate-rank pairwise) loss on the known labels, a baseline.

Weston, Bengio & Usunier, "WSABIE: Scaling Up To Large Vocabulary Image Annotation", IJCAI 2011;
one of the baselines of the IMCL paper (Huynh & Elhamifar, CVPR 2020, supplement Table 2).
For a positive label y of an image, negatives u are sampled until one violates the margin,
f_u > f_y - 1; if that took `tries` draws out of N negatives, the rank of y is estimated as
floor(N / tries) and the loss is

    L(rank) * max(0, 1 - f_y + f_u),    L(k) = sum_{j=1..k} 1 / j,

so a positive that many negatives outscore (found at once) is pushed harder than one that few
do: the loss approximates an optimisation of precision at the top of the ranking.

The model: WSABIE scores a label l as f_l(x) = <V x, W_l>, a linear embedding V of the image
features and an embedding W_l per label, i.e. x^T (V^T W)_l. With our backbone and linear
classifier head, the head's kernel [D, L] is exactly that product with an embedding of dimension
D (every [D, L] kernel is one; a smaller embedding would only cap its rank), so the scores are
the head's logits (Method.logits' default), and the backbone is trained through them. Left out:
the paper's max-norm constraints on the embeddings (the optimizer's weight decay plays that
role). Kept: the head's bias, which WSABIE lacks (a per-label offset, learnt like any other
weight), so that every method here shares the same model.

Adapted to partial labels: y runs over the KNOWN positives (+1) of the row and the negatives
are its KNOWN negatives (-1) only, N being their number; unknown entries (0) are never sampled
and their logits get no gradient. The batch loss is the mean over the (image, known positive)
pairs whose image has at least one known negative (a pair without a violator adds 0 but
counts); images without a known positive or without a known negative add nothing, and a batch
without any such pair gives 0 (not NaN).

Choices where the paper is silent or where this implementation differs:
  - Sampling: the paper draws negatives one at a time in a loop; here the draws are in-graph,
    as one uniformly random permutation of the classes per image (tf.random.uniform keys,
    sorted), the negatives being tried in that order; `tries` is the position of the first
    violator. This is sampling WITHOUT replacement (the paper draws with replacement, up to N
    draws): no draw is spent on a negative already tried, and "no violator" means that no
    negative violates at all. The permutation is shared by the image's positives: each
    positive's draw is still exactly uniform, so the expected loss is that of independent
    draws per positive, while the first violator of every positive is found in
    O(L log L) per image (a running maximum of the ordered negatives' scores and a binary search)
    instead of O(L^2), which matters at thousands of labels. The draws use the global seed (the
    run's seed), reproducible under op determinism.
  - The rank weight L(rank) carries no gradient (it is a count); the gradient is the hinge's,
    through f_y and the violator's f_u.
  - The margin is the paper's 1, not an option: it sets the scale of the logits, against which
    a different margin would only rescale the head.
  - The loss is a mean over the (image, positive) pairs, not a sum, so the learning rate does
    not depend on the batch size or the number of known positives.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from imcl_tf.methods.base import Batch, Method
from imcl_tf.methods.ranking import known_sets

# No options: the margin is the paper's 1 (see above) and the sampling has no parameter.
OPTIONS = ()

MARGIN = 1.0


def warp_loss(logits, labels, order=None, seed: int | None = None) -> tf.Tensor:
    """The WARP loss of a batch on its known labels, float32 scalar.

    Args:
      logits: [B, L] scores f, any float dtype.
      labels: [B, L] in {+1, -1, 0} (present, absent, unknown).
      order: optional int [B, L], each row a permutation of the L classes: the known negatives
        are tried in the order they appear in it. Default: a uniformly random permutation per
        image, drawn in-graph.
      seed: the op seed of that draw (with the global seed, as for any tf.random op).

    Example (one positive scored 0, negatives 0.5 and -3: in either order the first violator
    is the 0.5 one, found at the first or second try, so rank 2 or 1):
      >>> loss = warp_loss([[0.0, 0.5, -3.0]], [[1.0, -1.0, -1.0]], order=[[0, 1, 2]])
      >>> float(loss)  # first try: rank floor(2 / 1) = 2, L(2) = 1.5, hinge 1.5
      2.25
    """
    logits, positive, negative = known_sets("warp_loss", logits, labels)
    num_classes = logits.shape[-1]
    if num_classes is None:
        raise ValueError("warp_loss: the number of classes (logits' last dimension) must be "
                         "known when the graph is built.")
    num_negative = tf.reduce_sum(tf.cast(negative, tf.int32), axis=-1, keepdims=True)  # [B, 1]
    if order is None:
        order = tf.argsort(tf.random.uniform(tf.shape(logits), seed=seed), axis=-1)
    order = _checked_order(order, num_classes)  # [B, L]

    # The negatives in trial order first (a stable sort keeps the order among them).
    negative_in_order = tf.gather(negative, order, batch_dims=1)  # [B, L]
    trials = tf.gather(order, tf.argsort(tf.cast(~negative_in_order, tf.int32), axis=-1,
                                         stable=True), batch_dims=1)  # [B, L] classes
    scores = tf.stop_gradient(tf.gather(logits, trials, batch_dims=1))  # [B, L]
    best_so_far = _running_max(scores)  # [B, L], nondecreasing along the trials
    # The first trial whose negative violates y's margin, f_u > f_y - 1, is the first slot whose
    # running maximum exceeds f_y - 1. The slots after the N negatives hold the other classes:
    # a slot >= N found there means that no negative violates.
    first = tf.searchsorted(best_so_far, tf.stop_gradient(logits) - MARGIN,
                            side="right", out_type=tf.int32)  # [B, L], per class y
    violated = positive & (first < num_negative)  # [B, L]
    tries = first + 1
    rank = tf.clip_by_value(num_negative // tries, 1, num_classes)  # [B, L]; >= 1 if violated
    weight = tf.gather(_harmonic_numbers(num_classes), rank - 1)  # L(rank), a constant
    violator = tf.gather(trials, tf.minimum(first, num_classes - 1), batch_dims=1)  # [B, L]
    hinge = tf.nn.relu(MARGIN - logits + tf.gather(logits, violator, batch_dims=1))  # [B, L]
    per_pair = tf.where(violated, weight * hinge, 0.0)  # [B, L]
    counted = positive & (num_negative > 0)  # [B, L]
    return tf.math.divide_no_nan(tf.reduce_sum(per_pair),
                                 tf.reduce_sum(tf.cast(counted, tf.float32)))


def _running_max(values):
    """The maximum of each row's entries up to every position, [B, L] (log2 L doubling steps)."""
    num_classes = values.shape[-1]
    shift = 1
    while shift < num_classes:
        # values[:, j] becomes max(values[:, j], values[:, j - shift]), -inf before the start.
        shifted = tf.pad(values[:, :-shift], [[0, 0], [shift, 0]], constant_values=-np.inf)
        values = tf.maximum(values, shifted)
        shift *= 2
    return values


def _harmonic_numbers(count):
    """L(k) = sum_{j=1..k} 1/j for k = 1..count, float32 [count] (computed in float64)."""
    return tf.constant(np.cumsum(1.0 / np.arange(1, count + 1)), tf.float32)


def _checked_order(order, num_classes):
    order = tf.cast(tf.convert_to_tensor(order), tf.int32)
    if order.shape.rank != 2 or order.shape[-1] not in (None, num_classes):
        raise ValueError(f"warp_loss: order must be [B, L={num_classes}], each row a "
                         f"permutation of the classes. Received: order.shape={order.shape}.")
    # Each row holds every class once: sorted, it reads 0, 1, ..., L - 1.
    check = tf.debugging.Assert(
        tf.reduce_all(tf.equal(tf.sort(order, axis=-1), tf.range(num_classes)[None, :])),
        ["warp_loss: every row of order must be a permutation of 0..L-1."])
    with tf.control_dependencies([check]):
        return tf.identity(order)


class WSABIE(Method):
    """The WARP loss on the known labels, scores from the classifier head."""

    NAME = "wsabie"
    TERMS = ("warp",)

    def loss_terms(self, model, batch: Batch, training: bool):
        logits = self.logits(model, batch.features, training)
        loss = warp_loss(logits, batch.labels[..., :self.num_classes])
        return {"loss": loss, "warp": loss}


METHOD = WSABIE

"""What the ranking methods (LSEP, WSABIE) share: a label row as its known positives and negatives.

A pairwise ranking loss compares a known positive with a known negative of the same image;
unknown entries (0) belong to neither set, which is how these methods are adapted to partial
labels.
"""

from __future__ import annotations

import tensorflow as tf

from imcl_tf import losses


def known_sets(where: str, logits, labels) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(float32 logits, known positives, known negatives): [B, L] each, the sets as bool masks.

    Checks that logits and labels have the same shape and that labels are in {+1, -1, 0};
    `where` names the caller in the error.
    """
    logits = tf.cast(tf.convert_to_tensor(logits), tf.float32)
    labels = tf.cast(tf.convert_to_tensor(labels), tf.float32)
    losses._check_same_shape(where, "labels", labels, "logits", logits)
    if logits.shape.rank != 2:
        raise ValueError(f"{where}: logits and labels must be [B, L]. Received: "
                         f"logits.shape={logits.shape}.")
    with tf.control_dependencies([losses._assert_ternary(where, "labels", labels)]):
        positive = labels > 0.0
        negative = labels < 0.0
    return logits, positive, negative

"""Latent Noise: a visual-presence classifier seen through a learned, image-conditional noise of
human reporting.

Misra, Zitnick, Mitchell & Girshick, "Seeing through the Human Reporting Bias: Visual
Classifiers from Noisy Human-Centric Labels", CVPR 2016; the "Latent Noise (relevant)" and
"Latent Noise (visual)" columns of the IMCL paper's supplement (Table 2).

The model (their factorisation): for each class, a latent visual presence v with
P(v = 1 | x) = sigmoid(visual logit), and the probability that a human reports the class given
presence or absence, q1(x) = P(h = 1 | v = 1, x) and q0(x) = P(h = 1 | v = 0, x), both
conditioned on the image. The reported ("relevant") probability is

    h(x) = sum_{v in {0, 1}} P(h = 1 | v, x) P(v | x) = q1(x) v(x) + q0(x) (1 - v(x)),

and training is the BCE of h against the human labels; v is never supervised directly. Two
outputs: "relevant" (h, the first, what calling the model returns) and "visual" (v).

Adapted to partial labels: the known entries are the human reports (+1 reported present, -1
reported absent) and unknown entries (0) give no loss, with the masked BCE's reduction (the
mean over the batch's known entries, as the logistic baseline). With the shared
`--bce_unknown_as_negative` an unmentioned label is "not reported", which is Misra et al.'s own
setting (caption words) and the IMCL paper's MS-COCO runs.

Choices where the paper is silent (or that this code makes differently):
  - The visual classifier IS the model's classifier head (model.head), so a logistic warm start
    initialises v with the baseline's classifier: a good start, since h then begins close to
    the logistic prediction.
  - The noise branch is one linear layer on the backbone's pooled feature with 2L sigmoid
    outputs (q0 and q1 of each class), the method's own weights. Its kernel starts at 0 and its
    biases at logit(q0_init), logit(q1_init) (`--latent_noise_q0_init`, `--latent_noise_q1_init`,
    default 0.05 and 0.95): h starts near v, and q1 > q0 anchors which of the two latent states
    is "present" (the model is otherwise symmetric under swapping v with 1 - v).
  - log h and log(1 - h) are computed in log space (log-sum-exp of the two terms), so the
    "relevant" logit log h - log(1 - h) is exact and finite for any finite head outputs; no
    clipping of probabilities is needed. The "visual" logit is the head's logit itself.
Left out: the multiple-instance detector over image regions that Misra et al. build their
classifiers on (the captioning visual detectors of Fang et al.); here both heads read the
project's pooled backbone feature, like every other method.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from imcl_tf.methods.base import Batch, Method, RunContext, known_bce

OPTIONS = (
    ("latent_noise_q1_init", 0.95, "Initial P(reported | present, x) of every class (the noise "
     "branch's bias; its kernel starts at 0); must exceed latent_noise_q0_init.", None),
    ("latent_noise_q0_init", 0.05, "Initial P(reported | absent, x) of every class; in (0, "
     "latent_noise_q1_init).", None),
)


def reported_log_probabilities(visual_logits, absent_logits, present_logits
                               ) -> tuple[tf.Tensor, tf.Tensor]:
    """(log h, log(1 - h)), float32 [..., L], of h = q1 v + q0 (1 - v).

    Args:
      visual_logits: logits of v = P(visible | x).
      absent_logits: logits of q0 = P(reported | absent, x).
      present_logits: logits of q1 = P(reported | present, x).
    """
    z_v, z_0, z_1 = (tf.cast(t, tf.float32) for t in (visual_logits, absent_logits,
                                                     present_logits))
    log_v, log_not_v = tf.math.log_sigmoid(z_v), tf.math.log_sigmoid(-z_v)
    # log(q1 v + q0 (1 - v)) and log((1 - q1) v + (1 - q0) (1 - v)), each a log-sum-exp of 2.
    log_h = tf.reduce_logsumexp(tf.stack([tf.math.log_sigmoid(z_1) + log_v,
                                          tf.math.log_sigmoid(z_0) + log_not_v]), axis=0)
    log_not_h = tf.reduce_logsumexp(tf.stack([tf.math.log_sigmoid(-z_1) + log_v,
                                              tf.math.log_sigmoid(-z_0) + log_not_v]), axis=0)
    return log_h, log_not_h


def reported_probability(visual_logits, absent_logits, present_logits) -> tf.Tensor:
    """h = q1 v + q0 (1 - v), float32."""
    return tf.exp(reported_log_probabilities(visual_logits, absent_logits, present_logits)[0])


def reported_logits(visual_logits, absent_logits, present_logits) -> tf.Tensor:
    """logit(h) = log h - log(1 - h), float32: the "relevant" output's score."""
    log_h, log_not_h = reported_log_probabilities(visual_logits, absent_logits, present_logits)
    return log_h - log_not_h


def latent_noise_bce(labels, visual_logits, absent_logits, present_logits,
                     unknown_as_negative: bool = False) -> tf.Tensor:
    """The masked BCE of the reported probability h against the known entries of `labels`
    ([B, L] in {+1, -1, 0}), float32 scalar; sigmoid(logit(h)) = h, so it is the BCE of h."""
    return known_bce(labels, reported_logits(visual_logits, absent_logits, present_logits),
                     unknown_as_negative)


class LatentNoise(Method):
    """The visual head v (model.head) and an image-conditional noise branch (q0, q1)."""

    NAME = "latent_noise"
    TERMS = ("bce",)
    OUTPUTS = ("relevant", "visual")
    HPARAMS = ("latent_noise_q1_init", "latent_noise_q0_init")

    def __init__(self, num_classes: int, latent_noise_q1_init: float = 0.95,
                 latent_noise_q0_init: float = 0.05, bce_unknown_as_negative: bool = False,
                 **kwargs):
        super().__init__(num_classes, **kwargs)
        q1, q0 = float(latent_noise_q1_init), float(latent_noise_q0_init)
        if not 0.0 < q0 < q1 < 1.0:
            raise ValueError(f"latent_noise_q0_init and latent_noise_q1_init must satisfy "
                             f"0 < q0 < q1 < 1 (a reported label is likelier when the class "
                             f"is present). Received: latent_noise_q0_init={q0}, "
                             f"latent_noise_q1_init={q1}.")
        self.q1_init, self.q0_init = q1, q0
        self.bce_unknown_as_negative = bool(bce_unknown_as_negative)

    @classmethod
    def from_run(cls, run: RunContext) -> "LatentNoise":
        from imcl_tf.methods import registry
        return cls(run.info.num_classes,
                   bce_unknown_as_negative=run.config.bce_unknown_as_negative,
                   **{o.name: run.option(o.name) for o in registry.options(cls.NAME)})

    def attach(self, model) -> None:
        logit = lambda p: math.log(p / (1.0 - p))  # noqa: E731
        bias = [logit(self.q0_init)] * self.num_classes + [logit(self.q1_init)] * self.num_classes
        # [B, D] -> [B, 2L]: q0 logits of the L classes, then q1 logits.
        self.noise = keras.layers.Dense(
            2 * self.num_classes, kernel_initializer="zeros",
            bias_initializer=keras.initializers.Constant(bias), name="noise")
        self.noise.build((None, model.feature_dim))
        super().attach(model)

    def noise_logits(self, features) -> tuple[tf.Tensor, tf.Tensor]:
        """(q0 logits, q1 logits), each [B, L]."""
        both = tf.cast(self.noise(features), tf.float32)
        return both[..., :self.num_classes], both[..., self.num_classes:]

    def logits(self, model, features, training=False, output: str | None = None) -> tf.Tensor:
        output = output or self.OUTPUTS[0]
        if output not in self.OUTPUTS:
            raise ValueError(f"latent_noise has the outputs {self.OUTPUTS}. Received: "
                             f"output={output!r}.")
        visual = tf.cast(model.head(features), tf.float32)
        if output == "visual":
            return visual
        return reported_logits(visual, *self.noise_logits(features))

    def loss_terms(self, model, batch: Batch, training: bool):
        bce = known_bce(batch.labels, self.logits(model, batch.features, training, "relevant"),
                        self.bce_unknown_as_negative)
        return {"loss": bce, "bce": bce}

    def get_config(self):
        return {**super().get_config(), "latent_noise_q1_init": self.q1_init,
                "latent_noise_q0_init": self.q0_init,
                "bce_unknown_as_negative": self.bce_unknown_as_negative}


METHOD = LatentNoise

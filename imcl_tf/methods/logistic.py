"""Logistic: the masked binary cross-entropy on the known labels only (the baseline).

The IMCL paper's "Logistic" and the official code's first stage: one sigmoid per class, trained
on the known entries (+1 / -1) of each label row; unknown entries (0) give no loss. With
`--bce_unknown_as_negative` every unknown entry counts as a negative instead (the official
MS-COCO runs, where an unmentioned word is an absence). Every other method warm-starts from a
logistic run.
"""

from __future__ import annotations

from imcl_tf.methods.base import Batch, Method, RunContext, known_bce

# Its one option is the shared --bce_unknown_as_negative (a TrainConfig field, IMCL uses it too).
OPTIONS = ()


class Logistic(Method):
    """Masked BCE; `bce_unknown_as_negative` counts unknown entries as negatives."""

    NAME = "logistic"
    TERMS = ("bce",)

    def __init__(self, num_classes: int, bce_unknown_as_negative: bool = False, **kwargs):
        super().__init__(num_classes, **kwargs)
        self.bce_unknown_as_negative = bool(bce_unknown_as_negative)

    @classmethod
    def from_run(cls, run: RunContext) -> "Logistic":
        return cls(run.info.num_classes,
                   bce_unknown_as_negative=run.config.bce_unknown_as_negative)

    def loss_terms(self, model, batch: Batch, training: bool):
        logits = self.logits(model, batch.features, training)
        bce = known_bce(batch.labels, logits, self.bce_unknown_as_negative)
        return {"loss": bce, "bce": bce}

    def get_config(self):
        return {**super().get_config(), "bce_unknown_as_negative": self.bce_unknown_as_negative}


METHOD = Logistic

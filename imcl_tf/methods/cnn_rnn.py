"""CNN-RNN: an LSTM that emits an image's labels one by one, conditioned on the image feature.

Wang, Yang, Mao, Huang, Huang & Xu, "CNN-RNN: A Unified Framework for Multi-label Image
Classification", CVPR 2016; a comparison method of the IMCL paper (supplement Tables 1-2).
Labels are embedded by a matrix U (one row per label, plus END and START). At step t the LSTM
reads the embedding of the previous label and gives o(t); the projection layer joins it with the
image feature I,

    x(t) = h(U_o o(t) + U_I I),   h(z) = 1.7159 tanh(2 z / 3)   (LeCun's scaled tanh),

and label k scores s_k(t) = <x(t), U_k>, the SAME embedding matrix as the input (their
"joint image-label embedding"); a softmax over the labels and END gives p(t). Training is
teacher forcing with the cross-entropy of each step's target, the labels of an image ordered by
their training frequency (most frequent first) and followed by END; prediction is a beam search.

Adaptation to partial labels (+1 / -1 / 0):
  - The target sequence of an image is its KNOWN positives, most frequent first, then END.
    Unknown labels are never targets.
  - The softmax of step t is normalised over: its target, END, the known negatives, and the
    known positives already emitted at steps < t. Left out of the normaliser: the known
    positives still to come (the frequency order is a convention, not evidence that they are
    less likely now) and the unknown labels (they may be present). So a step pushes down known
    negatives, END before the sequence is over, and repeats of emitted labels (as the paper's
    full softmax does), but never a label that is present or may be.
  - An image without a known positive is taught END at step 0 (END against its known
    negatives: "none of these"). A step whose normaliser holds its target alone (every step of
    an all-unknown image) carries no information and no gradient: it is not counted. The loss
    is the mean cross-entropy over the counted steps of the batch (0 for a batch without any).

Choices where the paper is silent:
  - Frequency = the number of KNOWN positives of each class in the training split, computed in
    `from_run` and kept in the config (`label_order`), so a saved model keeps its order; ties
    go to the lower class index. Built without a run, the order is the class order.
  - Sequences are cut to `cnn_rnn_max_length` labels. An image with more known positives is
    taught its first max_length (the most frequent) and no END step (END would be a lie).
  - START is a learned input embedding (a row of U that is never an output). The image enters
    through the projection at every step, as in the paper, not through the LSTM's state.
  - Decoding: beam search of `cnn_rnn_beam_width` beams, at most max_length labels, a label is
    never emitted twice (the normaliser above teaches this, the search enforces it), a beam
    stops at END, and hypotheses are compared by their summed log-probability without length
    normalisation. The best beam is the one of highest log-probability.
  - Per-class scores (for mAP): for each class, the maximum over the best beam's decode steps
    (up to and including the step where it emitted END) of the class's softmax probability,
    returned as its logit log(p / (1 - p)) clipped to [-LOGIT_BOUND, LOGIT_BOUND], so the
    evaluation's sigmoid gives back the probability itself. Any monotone function of it ranks
    the same; the log-space computation keeps probabilities down to about e^-80 distinct
    (float32 probabilities would tie every class below 1e-38).
Left out: the paper's alternating schedule (CNN fixed while the RNN trains, then jointly) and its
fine-tuned VGG; any backbone of the model serves and trains with the decoder. The model's
classifier head is unused (frozen).
"""

from __future__ import annotations

import collections
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from imcl_tf.methods.base import Batch, Method, RunContext

OPTIONS = (
    ("cnn_rnn_embedding_dim", 64,
     "Width of the label embeddings and of the joint space the image feature and the LSTM "
     "output are projected into.", None),
    ("cnn_rnn_lstm_units", 512, "Units of the LSTM that reads the label sequence.", None),
    ("cnn_rnn_max_length", 10,
     "Most labels in a sequence: training keeps each image's first (most frequent) this many "
     "known positives; decoding emits at most this many labels.", None),
    ("cnn_rnn_beam_width", 3, "Beams of the beam search that decodes the labels.", None),
)

# Bound of the per-class logits: sigmoid(-80) ~ 1.8e-35 is still a normal float32, so the
# evaluation's sigmoid keeps the order of every score inside the bound.
LOGIT_BOUND = 80.0


def frequency_order(train_labels: np.ndarray) -> list[int]:
    """The classes by number of known positives in `train_labels` [N, L], most first; ties by
    class index."""
    counts = (np.asarray(train_labels) > 0).sum(axis=0)
    return [int(c) for c in np.argsort(-counts, kind="stable")]


def teacher_forcing_targets(labels, rank, max_length: int):
    """The teacher-forced sequences of a batch and each step's softmax normaliser.

    Tokens: class c is c, END is L, START is L + 1; T = max_length + 1 steps.

    Args:
      labels: [B, L] in {+1, -1, 0}.
      rank: [L] int, the position of each class in the frequency order (0: most frequent).
      max_length: most labels per sequence.

    Returns (inputs [B, T] int32, targets [B, T] int32, allowed [B, T, L + 1] bool,
    valid [B, T] bool): the input token of each step (START, then the previous target), its
    target (the known positives in rank order, then END; END on padding steps), the tokens of
    its softmax normaliser (module docstring), and whether the step is taught.
    """
    labels = tf.cast(labels, tf.float32)
    num_classes = labels.shape[-1]
    end, start = num_classes, num_classes + 1
    steps = max_length + 1
    rank = tf.cast(tf.convert_to_tensor(rank), tf.int32)
    positive = labels > 0
    negative = labels < 0
    # Known positives first, in frequency order, then everything else.
    key = tf.where(positive, rank[None, :], rank[None, :] + num_classes)  # [B, L]
    order = tf.argsort(key, axis=1, stable=True)  # [B, L]
    position = tf.argsort(order, axis=1)  # [B, L]: where each class sits in its row's order
    count = tf.reduce_sum(tf.cast(positive, tf.int32), axis=1)  # [B]
    length = tf.minimum(count, max_length)  # labels taught
    width = min(max_length, num_classes)
    prefix = tf.cast(order[:, :width], tf.int32)
    padded = tf.pad(prefix, [[0, 0], [0, steps - width]], constant_values=end)  # [B, T]
    t = tf.range(steps)[None, :]  # [1, T]
    targets = tf.where(t < length[:, None], padded, end)
    valid = (t < length[:, None]) | ((t == length[:, None]) & (count <= max_length)[:, None])
    inputs = tf.concat([tf.fill([tf.shape(labels)[0], 1], start), targets[:, :-1]], axis=1)
    emitted = positive[:, None, :] & (tf.cast(position, tf.int32)[:, None, :] < t[..., None])
    is_target = tf.one_hot(targets, num_classes + 1, on_value=True, off_value=False)
    allowed_labels = is_target[..., :num_classes] | negative[:, None, :] | emitted  # [B, T, L]
    allowed = tf.concat([allowed_labels, tf.ones_like(allowed_labels[..., :1])], axis=-1)
    return tf.cast(inputs, tf.int32), tf.cast(targets, tf.int32), allowed, valid


def masked_sequence_cross_entropy(scores, targets, allowed, valid) -> tf.Tensor:
    """Mean over the counted steps of -log softmax_allowed(scores)[target], float32 scalar.

    scores: [B, T, V] decoder scores (any float dtype); targets: [B, T] int; allowed: [B, T, V]
    bool, the normaliser of each step (must hold its target); valid: [B, T] bool. A step counts
    when it is valid and its normaliser holds another token than its target; 0 without any.
    """
    scores = tf.cast(scores, tf.float32)
    masked = tf.where(allowed, scores, -np.inf)
    target_scores = tf.gather(scores, targets, batch_dims=2)  # [B, T]
    step_loss = tf.reduce_logsumexp(masked, axis=-1) - target_scores
    counted = valid & (tf.reduce_sum(tf.cast(allowed, tf.int32), axis=-1) > 1)
    return tf.math.divide_no_nan(tf.reduce_sum(tf.where(counted, step_loss, 0.0)),
                                 tf.reduce_sum(tf.cast(counted, tf.float32)))


BeamResult = collections.namedtuple("BeamResult", "sequences scores best class_log_probs")
BeamResult.__doc__ = """What beam_search finds.

sequences [B, K, T] int32 (END after a beam's last label), scores [B, K] summed log-probabilities
(best first), best [B] int32 the beam of highest score, class_log_probs [B, L]: for each class the
maximum over the best beam's steps (up to its END) of its log-probability."""


def beam_search(step: Callable, initial_state, batch_size, num_classes: int, beam_width: int,
                max_length: int) -> BeamResult:
    """Beam search over label sequences of at most `max_length` distinct labels.

    Args:
      step: (tokens [B * K] int32, state) -> (log_probs [B * K, L + 1], state); tokens are the
        previous step's labels (START = L + 1 at the first step, END = L after a beam ended).
        The state is a nest of [B * K, ...] tensors, beam k of image b at row b * K + k.
      initial_state: the state of every beam before the first step ([B * K, ...]).
      batch_size: B (a scalar tensor is fine).
      num_classes: L; beam_width: K; max_length: steps (one label or END each).

    A beam that emitted END keeps its score and emits END; a label already in a beam is not
    emitted again; a beam that reaches max_length labels ends there (no END term).
    """
    vocabulary = num_classes + 1
    end, start = num_classes, num_classes + 1
    k = beam_width
    neg_inf = tf.constant(-np.inf, tf.float32)
    # Only beam 0 is alive at first, so the first step's K best are K different labels.
    scores = tf.tile(tf.concat([[0.0], tf.fill([k - 1], neg_inf)], 0)[None, :], [batch_size, 1])
    finished = tf.zeros([batch_size, k], tf.bool)
    emitted = tf.zeros([batch_size, k, num_classes], tf.bool)
    class_log_probs = tf.fill([batch_size, k, num_classes], neg_inf)
    sequences = tf.fill([batch_size, k, max_length], end)
    tokens = tf.fill([batch_size * k], start)
    state = initial_state
    # A finished beam's only continuation: END at no cost.
    end_only = tf.concat([tf.fill([num_classes], neg_inf), [0.0]], 0)  # [V]
    for t in range(max_length):
        log_probs, state = step(tokens, state)
        log_probs = tf.reshape(tf.cast(log_probs, tf.float32), [batch_size, k, vocabulary])
        alive = ~finished
        class_log_probs = tf.where(alive[..., None],
                                   tf.maximum(class_log_probs, log_probs[..., :num_classes]),
                                   class_log_probs)
        no_repeat = tf.concat([tf.where(emitted, neg_inf, 0.0),
                               tf.zeros([batch_size, k, 1])], axis=-1)
        candidates = tf.where(finished[..., None], end_only, log_probs + no_repeat)
        candidates = scores[..., None] + candidates  # [B, K, V]
        scores, flat = tf.math.top_k(tf.reshape(candidates, [batch_size, k * vocabulary]), k)
        parent = flat // vocabulary  # [B, K]
        token = flat % vocabulary
        finished = tf.gather(finished, parent, batch_dims=1) | tf.equal(token, end)
        emitted = tf.gather(emitted, parent, batch_dims=1) | tf.one_hot(
            token, vocabulary, on_value=True, off_value=False)[..., :num_classes]
        class_log_probs = tf.gather(class_log_probs, parent, batch_dims=1)
        sequences = tf.gather(sequences, parent, batch_dims=1)
        sequences = tf.concat([sequences[..., :t], token[..., None], sequences[..., t + 1:]], -1)
        rows = tf.reshape(parent + tf.range(batch_size)[:, None] * k, [-1])  # [B * K]
        state = tf.nest.map_structure(lambda s: tf.gather(s, rows), state)
        tokens = tf.reshape(token, [-1])
    best = tf.cast(tf.argmax(scores, axis=1), tf.int32)
    return BeamResult(sequences, scores, best,
                      tf.gather(class_log_probs, best, batch_dims=1))


def clipped_logits(log_probs) -> tf.Tensor:
    """log(p / (1 - p)) of probabilities given as log p, clipped to [-LOGIT_BOUND, LOGIT_BOUND]."""
    log_probs = tf.minimum(tf.cast(log_probs, tf.float32), -1e-7)  # p < 1: a finite log(1 - p)
    logits = log_probs - tf.math.log(-tf.math.expm1(log_probs))
    return tf.clip_by_value(logits, -LOGIT_BOUND, LOGIT_BOUND)


def scaled_tanh(x):
    """LeCun's 1.7159 tanh(2x / 3), the projection layer's h."""
    return 1.7159 * tf.tanh(2.0 * x / 3.0)


@keras.saving.register_keras_serializable(package="imcl_tf")
class CnnRnn(Method):
    """The CNN-RNN decoder over the model's pooled features (module docstring).

    Args:
      num_classes: L.
      cnn_rnn_embedding_dim, cnn_rnn_lstm_units, cnn_rnn_max_length, cnn_rnn_beam_width: the
        options (OPTIONS).
      label_order: the classes most frequent first (a permutation of range(L)); None: the class
        order. `from_run` computes it from the training split.
    """

    NAME = "cnn_rnn"
    TERMS = ("sequence_ce",)
    HPARAMS = ("cnn_rnn_embedding_dim", "cnn_rnn_lstm_units", "cnn_rnn_max_length",
               "cnn_rnn_beam_width")

    def __init__(self, num_classes: int, cnn_rnn_embedding_dim: int = 64,
                 cnn_rnn_lstm_units: int = 512, cnn_rnn_max_length: int = 10,
                 cnn_rnn_beam_width: int = 3, label_order: Sequence[int] | None = None,
                 **kwargs):
        super().__init__(num_classes, **kwargs)
        for name, value in (("cnn_rnn_embedding_dim", cnn_rnn_embedding_dim),
                            ("cnn_rnn_lstm_units", cnn_rnn_lstm_units),
                            ("cnn_rnn_max_length", cnn_rnn_max_length),
                            ("cnn_rnn_beam_width", cnn_rnn_beam_width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"--{name}: must be an integer >= 1, received {value!r}.")
        self.embedding_dim = int(cnn_rnn_embedding_dim)
        self.lstm_units = int(cnn_rnn_lstm_units)
        self.max_length = int(cnn_rnn_max_length)
        self.beam_width = int(cnn_rnn_beam_width)
        if label_order is None:
            label_order = range(self.num_classes)
        self.label_order = [int(c) for c in label_order]
        if sorted(self.label_order) != list(range(self.num_classes)):
            raise ValueError(f"CnnRnn: label_order must be a permutation of the {num_classes} "
                             f"class indices, received {len(self.label_order)} entries "
                             f"{self.label_order[:10]}{'...' if len(self.label_order) > 10 else ''}.")
        rank = np.empty(self.num_classes, np.int32)
        rank[self.label_order] = np.arange(self.num_classes)
        self._rank = rank  # position of each class in the frequency order
        self.cell = keras.layers.LSTMCell(self.lstm_units, name="cnn_rnn_lstm")
        self.image_projection = keras.layers.Dense(self.embedding_dim, name="cnn_rnn_image")
        # One bias for the sum U_o o(t) + U_I I: the image projection's.
        self.recurrent_projection = keras.layers.Dense(self.embedding_dim, use_bias=False,
                                                       name="cnn_rnn_recurrent")

    @classmethod
    def from_run(cls, run: RunContext) -> "CnnRnn":
        from imcl_tf.methods import registry
        return cls(run.info.num_classes, label_order=frequency_order(run.train_labels),
                   **{o.name: run.option(o.name) for o in registry.options(cls.NAME)})

    def attach(self, model) -> None:
        # The scores are the method's own: the classifier head is frozen, so the optimizer keeps
        # no slots for it and reports no missing gradients.
        model.head.trainable = False
        self.image_projection.build((None, int(model.feature_dim)))
        self.recurrent_projection.build((None, self.lstm_units))
        self.cell.build((None, self.embedding_dim))
        # Rows: the L labels, END (an output too), START (an input only). Read in float32 under
        # mixed precision too: the scores and the softmax stay float32.
        self.label_embeddings = self.add_weight(
            name="label_embeddings", shape=(self.num_classes + 2, self.embedding_dim),
            initializer="uniform", dtype="float32", autocast=False)
        self.built = True

    # ---- the decoder ---------------------------------------------------------------------------

    def _scores(self, outputs, image):
        """s = <h(U_o o + U_I I), U_k> over the labels and END: [..., L + 1], float32."""
        joint = scaled_tanh(tf.cast(self.recurrent_projection(outputs), tf.float32) + image)
        return tf.matmul(joint, self.label_embeddings[:self.num_classes + 1], transpose_b=True)

    def _image(self, features, training=False):
        return tf.cast(self.image_projection(features, training=training), tf.float32)

    def decoder_scores(self, features, input_tokens, training=False) -> tf.Tensor:
        """Teacher forcing: the scores [B, T, L + 1] of each step given the input tokens [B, T]."""
        image = self._image(features, training)  # [B, e]
        embedded = tf.gather(self.label_embeddings, input_tokens)  # [B, T, e]
        state = self.cell.get_initial_state(tf.shape(input_tokens)[0])
        outputs = []
        for t in range(input_tokens.shape[1]):
            output, state = self.cell(embedded[:, t], state, training=training)
            outputs.append(output)
        return self._scores(tf.stack(outputs, axis=1), image[:, None, :])

    def decode(self, features) -> BeamResult:
        """The beam search of the features [B, D] (inference mode)."""
        image = self._image(features)
        batch_size = tf.shape(features)[0]
        image = tf.repeat(image, self.beam_width, axis=0)  # [B * K, e], beam-major per image

        def step(tokens, state):
            embedded = tf.gather(self.label_embeddings, tokens)
            output, state = self.cell(embedded, state)
            return tf.nn.log_softmax(self._scores(output, image)), state

        return beam_search(step, self.cell.get_initial_state(batch_size * self.beam_width),
                           batch_size, self.num_classes, self.beam_width, self.max_length)

    # ---- the model's questions -----------------------------------------------------------------

    def logits(self, model, features, training=False, output=None) -> tf.Tensor:
        return clipped_logits(self.decode(features).class_log_probs)

    def loss_terms(self, model, batch: Batch, training: bool):
        inputs, targets, allowed, valid = teacher_forcing_targets(
            batch.labels[..., :self.num_classes], self._rank, self.max_length)
        scores = self.decoder_scores(batch.features, inputs, training)
        loss = masked_sequence_cross_entropy(scores, targets, allowed, valid)
        return {"loss": loss, "sequence_ce": loss}

    def get_config(self):
        return {**super().get_config(), "cnn_rnn_embedding_dim": self.embedding_dim,
                "cnn_rnn_lstm_units": self.lstm_units, "cnn_rnn_max_length": self.max_length,
                "cnn_rnn_beam_width": self.beam_width, "label_order": list(self.label_order)}


METHOD = CnnRnn

"""Fast0Tag: a learned principal direction per image, labels ranked by fixed word vectors.

Zhang, Gong & Shah, "Fast Zero-Shot Image Tagging", CVPR 2016; a comparison method of the IMCL
paper (supplement Tables 1-2). A network f maps the image feature x to a direction w(x) in the
word-vector space, and label l scores <w(x), e_l>, e_l the label's FIXED word vector. f is
trained with the paper's RankNet-style loss: for an image m with relevant tags P_m and
irrelevant tags N_m,

    loss_m = 1 / (|P_m| |N_m|) * sum_{p in P_m} sum_{n in N_m} log(1 + exp(<w, e_n> - <w, e_p>)),

so every relevant tag should rank ahead of every irrelevant one along w(x_m).

Adaptation to partial labels: P_m and N_m are the KNOWN positives (+1) and KNOWN negatives (-1)
of the label row; unknown entries (0) are in no pair. The paper treats every tag not given as
irrelevant; here an unknown tag is neither pushed up nor down.

Choices where the paper is silent or that differ from it:
  - The batch loss is the mean of loss_m over the batch's images that have at least one
    (known positive, known negative) pair; an image without such a pair contributes 0 and is
    not counted, and a batch without any pair gives 0 (not NaN). The paper sums over images;
    the mean only rescales the learning rate and keeps the loss independent of the batch size.
  - f is a two-layer MLP on the backbone's pooled feature (model.feature_dim): a ReLU hidden
    layer of `fast0tag_hidden_units` units and a linear output of the word-vector width d. The
    width is our choice, not the paper's.
  - `fast0tag_normalize` (default on) scales every word vector to unit L2 norm before training.
    Raw word2vec / GloVe norms differ several-fold between words (they follow word frequency
    more than meaning), and since e_l is fixed, f cannot undo that per label: a long vector gets
    a large |score| for every image, so its pairs dominate the loss and its rank is decided by
    its norm more than by the image. With
    unit vectors the ranking within an image is the order of cos(w(x), e_l). (Per-class AP is
    unchanged by a per-class positive scale; the training is not.)
  - The embeddings are a non-trainable weight of the method, so a saved or exported model
    carries them and needs no .npy; the file is read only when a run starts.
  - The scores have no per-class bias, as in the paper. The evaluation's sigmoid of them is a
    ranking score, not a calibrated probability: a ranking loss sets no absolute threshold, so
    thresholded metrics (CP/CR/CF1 at 0.5) mean little for this method; mAP is its measure.
Left out: the zero-shot part (scoring tags unseen in training needs only their vectors, but the
model's classes are those of dataset.json), the paper's linear-mapping variant, and its VGG-19
fc7 input (any backbone of the model serves). The model's classifier head is unused (frozen).
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from imcl_tf.methods.base import Batch, Method

OPTIONS = (
    ("fast0tag_embeddings", "",
     "A .npy of shape [L, d], the fixed word vector of each class, one row per class in "
     "dataset.json's class order (required with --method=fast0tag).", None, "required"),
    ("fast0tag_hidden_units", 1024,
     "Units of the ReLU hidden layer of f, the MLP mapping an image feature to its principal "
     "direction.", None),
    ("fast0tag_normalize", True,
     "Scale every word vector to unit L2 norm (raw word-vector norms differ from word to "
     "word, and a long vector would rank high for every image).", None),
)

REQUIRED_MESSAGE = ("--fast0tag_embeddings is required: a .npy of shape [L, d] of word vectors, "
                    "one row per class in dataset.json's class order")


def load_label_embeddings(path: str, num_classes: int, normalize: bool = True) -> np.ndarray:
    """The [L, d] float32 word vectors of `path` (a .npy), checked, unit-normalised if asked.

    Raises ValueError naming --fast0tag_embeddings for a missing flag or file, a file that is not
    a .npy array, a shape other than [num_classes, d], non-finite values, or (with normalize) a
    zero row.
    """
    if not path:
        raise ValueError(REQUIRED_MESSAGE + ".")
    flag = f"--fast0tag_embeddings={path!r}"
    expected = (f"expected a .npy of shape [{num_classes}, d]: one word vector per class, in "
                "dataset.json's class order")
    if not os.path.isfile(path):
        raise ValueError(f"{flag}: no such file; {expected}.")
    try:
        embeddings = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{flag}: not a NumPy .npy array ({e}); {expected}.") from e
    if not isinstance(embeddings, np.ndarray):  # an .npz archive
        raise ValueError(f"{flag}: a .npz archive, not one array; {expected}.")
    if embeddings.ndim != 2 or embeddings.shape[0] != num_classes or embeddings.shape[1] < 1:
        raise ValueError(f"{flag}: shape {list(embeddings.shape)}, {expected}.")
    if not (np.issubdtype(embeddings.dtype, np.floating)
            or np.issubdtype(embeddings.dtype, np.integer)):
        raise ValueError(f"{flag}: values of type {embeddings.dtype}, expected real numbers.")
    embeddings = embeddings.astype(np.float32)
    bad = ~np.isfinite(embeddings)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ValueError(f"{flag}: {int(bad.sum())} non-finite values (NaN or inf), the first in "
                         f"row {row}; every entry must be a finite number.")
    if normalize:
        norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
        if (norms == 0).any():
            row = int(np.flatnonzero(norms[:, 0] == 0)[0])
            raise ValueError(f"{flag}: row {row} is all zeros and cannot be scaled to unit "
                             "length; give that class a vector, or pass --nofast0tag_normalize.")
        embeddings = embeddings / norms
    return embeddings


def fast0tag_ranking_loss(labels, scores) -> tf.Tensor:
    """The Fast0Tag ranking loss over the known labels, float32 scalar (module docstring).

    Args:
      labels: [B, L] in {+1, -1, 0} (known present, known absent, unknown).
      scores: [B, L] label scores <w(x), e_l>, any float dtype.

    Per image the mean of log(1 + exp(s_n - s_p)) over its (known positive p, known negative n)
    pairs; the batch value is the mean over the images that have a pair (0 if none has).
    """
    labels = tf.cast(labels, tf.float32)
    scores = tf.cast(scores, tf.float32)
    positive_scores, positive_valid = _known_scores(scores, labels > 0)  # [B, P]
    negative_scores, negative_valid = _known_scores(scores, labels < 0)  # [B, N]
    pair_valid = positive_valid[:, :, None] & negative_valid[:, None, :]  # [B, P, N]
    # softplus(s_n - s_p) = log(1 + exp(s_n - s_p)), stable for any margin.
    pair_loss = tf.nn.softplus(negative_scores[:, None, :] - positive_scores[:, :, None])
    pairs = tf.reduce_sum(tf.cast(pair_valid, tf.float32), axis=[1, 2])  # [B]
    per_image = tf.math.divide_no_nan(
        tf.reduce_sum(tf.where(pair_valid, pair_loss, 0.0), axis=[1, 2]), pairs)  # [B]
    counted = tf.cast(pairs > 0, tf.float32)
    return tf.math.divide_no_nan(tf.reduce_sum(per_image), tf.reduce_sum(counted))


def _known_scores(scores, mask):
    """The scores of each row's `mask` entries, packed left: values and validity [B, K].

    K is the largest count in the batch, so the pairwise tensor is [B, P, N] over the known
    labels only, not [B, L, L] (5,000 classes with few known labels per image).
    """
    count = tf.reduce_sum(tf.cast(mask, tf.int32), axis=1)  # [B]
    width = tf.reduce_max(tf.concat([count, [0]], axis=0))
    _, indices = tf.math.top_k(tf.cast(mask, tf.float32), k=width)  # ones first: [B, K]
    values = tf.gather(scores, indices, batch_dims=1)
    valid = tf.range(width)[None, :] < count[:, None]
    return values, valid


@keras.saving.register_keras_serializable(package="imcl_tf")
class Fast0Tag(Method):
    """Scores <f(x), e_l> with fixed word vectors e_l, trained by the pairwise ranking loss.

    Args:
      num_classes: L.
      fast0tag_embeddings: path of the [L, d] .npy of word vectors (a new model).
      fast0tag_hidden_units: width of f's hidden layer.
      fast0tag_normalize: unit-normalise the word vectors when reading the file.
      embedding_dim: d, for a model rebuilt from its config: the vectors then come from the
        saved weights and no file is read.
    """

    NAME = "fast0tag"
    TERMS = ("rank",)
    HPARAMS = ("fast0tag_hidden_units", "fast0tag_normalize")

    def __init__(self, num_classes: int, fast0tag_embeddings: str = "",
                 fast0tag_hidden_units: int = 1024, fast0tag_normalize: bool = True,
                 embedding_dim: int | None = None, **kwargs):
        super().__init__(num_classes, **kwargs)
        if isinstance(fast0tag_hidden_units, bool) or int(fast0tag_hidden_units) < 1:
            raise ValueError("--fast0tag_hidden_units: must be an integer >= 1, received "
                             f"{fast0tag_hidden_units!r}.")
        self.hidden_units = int(fast0tag_hidden_units)
        self.normalize = bool(fast0tag_normalize)
        if fast0tag_embeddings:
            initial = load_label_embeddings(fast0tag_embeddings, self.num_classes,
                                            self.normalize)
            if embedding_dim is not None and int(embedding_dim) != initial.shape[1]:
                raise ValueError(f"--fast0tag_embeddings={fast0tag_embeddings!r}: width "
                                 f"{initial.shape[1]}, but embedding_dim={embedding_dim}.")
        elif embedding_dim is None:
            raise ValueError(REQUIRED_MESSAGE + ".")
        else:
            initial = None
        self._initial_embeddings = initial  # written into the weight by attach, then dropped
        self.embedding_dim = int(initial.shape[1] if initial is not None else embedding_dim)
        self.hidden = keras.layers.Dense(self.hidden_units, activation="relu",
                                         name="fast0tag_hidden")
        self.direction = keras.layers.Dense(self.embedding_dim, name="fast0tag_direction")

    def attach(self, model) -> None:
        # The scores are the method's own: the classifier head is frozen, so the optimizer keeps
        # no slots for it and reports no missing gradients.
        model.head.trainable = False
        self.hidden.build((None, int(model.feature_dim)))
        self.direction.build((None, self.hidden_units))
        # Fixed word vectors: a weight (saved, checkpointed, exported), never trained; read in
        # float32 under mixed precision too (the scores are float32).
        self.label_embeddings = self.add_weight(
            name="label_embeddings", shape=(self.num_classes, self.embedding_dim),
            initializer="zeros", trainable=False, dtype="float32", autocast=False)
        if self._initial_embeddings is not None:
            self.label_embeddings.assign(self._initial_embeddings)
            self._initial_embeddings = None
        self.built = True

    def principal_direction(self, features, training=False) -> tf.Tensor:
        """w(x) [B, d], float32."""
        return tf.cast(self.direction(self.hidden(features, training=training),
                                      training=training), tf.float32)

    def logits(self, model, features, training=False, output=None) -> tf.Tensor:
        # [B, d] x [L, d]^T -> [B, L]
        return tf.matmul(self.principal_direction(features, training), self.label_embeddings,
                         transpose_b=True)

    def loss_terms(self, model, batch: Batch, training: bool):
        scores = self.logits(model, batch.features, training)
        rank = fast0tag_ranking_loss(batch.labels[..., :self.num_classes], scores)
        return {"loss": rank, "rank": rank}

    def get_config(self):
        # No path: the vectors are in the weights, so a saved model needs no file.
        return {**super().get_config(), "fast0tag_hidden_units": self.hidden_units,
                "fast0tag_normalize": self.normalize, "embedding_dim": self.embedding_dim}


METHOD = Fast0Tag

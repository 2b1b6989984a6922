"""IMCLModel: a CNN (or feature adapter) with a multi-label head, trained by IMCL or by masked BCE.

One Keras model serves both methods of docs/architecture.md so that the comparison is fair:
`method="logistic"` trains with the masked BCE only (the baseline); `method="imcl"` adds the
smoothness loss whose neighbours come from a Joint Nonnegative OMP over the dictionary bank.
Preprocessing of 0..255 images happens inside the model, so an exported model takes raw pixels.
"""

from __future__ import annotations

import json
import os
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from imcl_tf import losses
from imcl_tf.choices import BACKBONES, BALANCE_MODES, METHODS, NEIGHBOUR_MODES, REFIT_MODES
from imcl_tf.label_graph import LabelGraph
from imcl_tf.memory import DictionaryBank
from imcl_tf.omp import joint_nonnegative_omp, refit_on_support

# The official code's mode, not implemented (docs/method.md §5): refused with an explanation.
_UNIMPLEMENTED_REFIT_MODES = ("official_pool_rerun",)

# How each keras.applications backbone expects its 0..255 RGB input to be scaled.
_PREPROCESSING = {"small_cnn": "unit", "mobilenet_v2": "symmetric", "resnet50": "caffe",
                  "resnet101": "caffe", "features": "none"}
_CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="imcl_tf")
class Preprocess(keras.layers.Layer):
    """Scales 0..255 RGB pixels the way a backbone was trained to see them."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("unit", "symmetric", "caffe", "none"):
            raise ValueError(f"Preprocess: unknown mode {mode!r}.")
        self.mode = mode

    def call(self, x):
        x = tf.cast(x, self.compute_dtype)
        if self.mode == "unit":
            return x / 255.0
        if self.mode == "symmetric":
            return x / 127.5 - 1.0
        if self.mode == "caffe":  # RGB -> BGR, subtract ImageNet means, no scaling
            return x[..., ::-1] - tf.constant(_CAFFE_BGR_MEANS, dtype=x.dtype)
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def build_backbone(name: str, input_shape: tuple[int, ...], weights: str = "none",
                   freeze_batchnorm: bool = False) -> keras.Model:
    """A feature extractor mapping preprocessed inputs to pooled features [B, D].

    Args:
      name: one of BACKBONES. `small_cnn` suits 64x64 images; `features` is an identity-initialised
        linear adapter over precomputed embeddings (the fixed-feature Open Images mode).
      input_shape: (H, W, 3) for images or (D_in,) for features.
      weights: "none", "imagenet", or the path of a Keras weights file for this backbone.
      freeze_batchnorm: keep BatchNormalization layers in inference mode with frozen statistics
        (docs/method.md §1: the official runs fine-tune with BN frozen).
    """
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; choose one of {BACKBONES}. Received: "
                         f"backbone={name!r}.")
    if weights not in ("none", "imagenet") and not os.path.exists(weights):
        raise ValueError(f"backbone weights {weights!r}: no such file; use 'none', 'imagenet' or "
                         "the path of a Keras weights file (.weights.h5).")
    keras_weights = "imagenet" if weights == "imagenet" else None
    if name == "features":
        if weights == "imagenet":
            raise ValueError("backbone 'features' has no imagenet weights; use 'none' or a file.")
        inputs = keras.Input(input_shape, name="features")
        outputs = keras.layers.Dense(input_shape[0], kernel_initializer="identity",
                                     bias_initializer="zeros", name="adapter")(inputs)
        model = keras.Model(inputs, outputs, name="features_adapter")
    elif name == "small_cnn":
        if weights == "imagenet":
            raise ValueError("backbone 'small_cnn' has no imagenet weights; use 'none' or a file.")
        inputs = keras.Input(input_shape, name="images")
        # A strided stem keeps a training step cheap on CPU (about 30 M multiply-adds per 64x64
        # image) while three resolutions still see whole Fashion-MNIST items.
        x = _conv_bn_relu(inputs, 32, strides=2, name="stem")
        for i, filters in enumerate((32, 64, 128)):
            x = _conv_bn_relu(x, filters, name=f"block{i}a")
            x = _conv_bn_relu(x, filters, name=f"block{i}b")
            if i < 2:
                x = keras.layers.MaxPooling2D(2, name=f"pool{i}")(x)
        outputs = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        model = keras.Model(inputs, outputs, name="small_cnn")
    else:
        constructor = {"mobilenet_v2": keras.applications.MobileNetV2,
                       "resnet50": keras.applications.ResNet50,
                       "resnet101": keras.applications.ResNet101}[name]
        model = constructor(include_top=False, weights=keras_weights, input_shape=input_shape,
                            pooling="avg")
    if weights not in ("none", "imagenet"):
        model.load_weights(weights)
    if freeze_batchnorm:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    return model


def _conv_bn_relu(x, filters, name, strides=1):
    x = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                            name=f"{name}_conv")(x)
    # momentum 0.9: with Keras' 0.99 the moving statistics of a network trained from scratch for a
    # few hundred steps still remember their initial values, and validation mAP lags far behind.
    x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


@keras.saving.register_keras_serializable(package="imcl_tf")
class IMCLModel(keras.Model):
    """Multi-label classifier trained from partial labels by IMCL or by masked BCE (`logistic`).

    Calling the model maps inputs (float32 images in 0..255, or embeddings) to logits [B, L].
    Training data are `(inputs, labels, ids)` batches from `imcl_tf.data.make_dataset`: labels in
    {+1, -1, 0} (present, absent, unknown), ids the int64 hashes used to keep an image from being
    its own neighbour.

    Args:
      num_classes: L.
      input_shape_: (H, W, 3) for images, (D_in,) for the `features` backbone.
      backbone: one of BACKBONES.
      backbone_weights: "none", "imagenet" or a weights file.
      method: "imcl" or "logistic".
      dictionary_size: M, atoms in the bank (static; 0 only for `logistic`).
      k: neighbours per image (OMP sparsity).
      multiplier_y, multiplier_f: user factors of the balanced lambdas (docs/method.md §1).
      balance: "loss_ratio" (lambda = multiplier * L_c / L_term on calibration batches) or "none"
        (lambda = multiplier).
      asym_c: the asymmetry c >= 1 of the label-state function sigma_c.
      learn_label_graph, clip_label_graph: the graph's non-zero entries are trained; clipped to
        [0, 1] after every step.
      neighbour_mode: "cached" (neighbour features from the bank) or "forward" (neighbour inputs
        re-run through the backbone with gradient, as the official end-to-end code does).
      refit_mode: where forward mode's coefficients come from (docs/method.md §5).
        "reuse_support_refit" (default) keeps the OMP's support (chosen atoms and valid slots) and
        re-solves both coefficient vectors by exact NNLS on it with the fresh neighbour features
        and label states, each side on its own (label side against the query's label state,
        feature side against its feature with the bias coordinate), as the OMP refits them; the
        coefficients are constants of the loss (no gradient). "reuse_all" keeps the coefficients
        the OMP fitted to the bank's cached features and states. Only used when
        neighbour_mode="forward": in cached mode the neighbours are the very atoms the OMP
        fitted, so there is nothing to refit. The official code's "official_pool_rerun" (a
        second OMP over the union of the batch's neighbours) is not implemented.
      feature_loss: add lambda_f * L_f to the loss (the feature side always drives selection).
      freeze_batchnorm: see build_backbone.
      head_weight_decay: L2 factor on the classifier kernel (bias excluded), CUB uses 1e-4.
      omp_jit_compile: run the OMP XLA-compiled inside the step (docs/architecture.md);
        False runs it as ordinary TensorFlow ops (a fallback where XLA is unavailable).
      label_graph_layout: {"num_entries", "structure"} of a saved graph (get_config() writes it),
        used when label_graph_init is None to rebuild the graph's storage before its weights load.
      atom_gradient: let the smoothness residuals also train the neighbours' label states (the
        official code does); False treats neighbours as fixed teachers of the query: no gradient
        through their label states or (forward mode) their features, so none reaches the graph.
    """

    def __init__(self, num_classes: int, input_shape_: tuple[int, ...], backbone: str = "small_cnn",
                 backbone_weights: str = "none", method: str = "imcl", dictionary_size: int = 0,
                 k: int = 3, multiplier_y: float = 1.0, multiplier_f: float = 0.5,
                 balance: str = "loss_ratio", asym_c: float = 2.0, learn_label_graph: bool = True,
                 clip_label_graph: bool = True, neighbour_mode: str = "cached",
                 feature_loss: bool = True, freeze_batchnorm: bool = False,
                 head_weight_decay: float = 0.0, label_graph_init: Any = None,
                 atom_gradient: bool = True, refit_mode: str = "reuse_support_refit",
                 label_graph_layout: dict[str, Any] | None = None, omp_jit_compile: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        _check_choice("method", method, METHODS)
        _check_choice("backbone", backbone, BACKBONES)
        _check_choice("neighbour_mode", neighbour_mode, NEIGHBOUR_MODES)
        if refit_mode in _UNIMPLEMENTED_REFIT_MODES:
            raise ValueError(f"IMCLModel: refit_mode={refit_mode!r} (a second OMP over the union "
                             "of the batch's neighbours, docs/method.md §3) is not implemented; "
                             f"choose one of {REFIT_MODES}.")
        _check_choice("refit_mode", refit_mode, REFIT_MODES)
        _check_choice("balance", balance, BALANCE_MODES)
        if num_classes < 1:
            raise ValueError(f"IMCLModel: num_classes must be >= 1, received {num_classes}.")
        if method == "imcl":
            if dictionary_size < 1:
                raise ValueError("IMCLModel: method='imcl' needs a dictionary bank; received "
                                 f"dictionary_size={dictionary_size}.")
            if not 1 <= k <= dictionary_size:
                raise ValueError(f"IMCLModel: k must be in [1, dictionary_size={dictionary_size}], "
                                 f"received k={k}.")
        if asym_c < 1.0:
            raise ValueError(f"IMCLModel: asym_c must be >= 1, received {asym_c}.")
        if multiplier_y < 0 or multiplier_f < 0:
            raise ValueError(f"IMCLModel: lambda multipliers must be >= 0, received "
                             f"multiplier_y={multiplier_y}, multiplier_f={multiplier_f}.")
        self.num_classes = int(num_classes)
        self.input_shape_ = tuple(int(d) for d in input_shape_)
        self.input_mode = "features" if backbone == "features" else "image"
        if self.input_mode == "image" and (len(self.input_shape_) != 3 or self.input_shape_[-1] != 3):
            raise ValueError(f"IMCLModel: backbone {backbone!r} takes (H, W, 3) images, received "
                             f"input_shape_={self.input_shape_}.")
        if self.input_mode == "features" and len(self.input_shape_) != 1:
            raise ValueError("IMCLModel: backbone 'features' takes (D,) embeddings, received "
                             f"input_shape_={self.input_shape_}.")
        self.backbone_name = backbone
        self.backbone_weights = backbone_weights
        self.method = method
        self.dictionary_size = int(dictionary_size)
        self.k = int(k)
        self.multiplier_y = float(multiplier_y)
        self.multiplier_f = float(multiplier_f)
        self.balance = balance
        self.asym_c = float(asym_c)
        self.learn_label_graph = bool(learn_label_graph)
        self.clip_label_graph = bool(clip_label_graph)
        self.neighbour_mode = neighbour_mode
        self.feature_loss = bool(feature_loss)
        self.freeze_batchnorm = bool(freeze_batchnorm)
        self.head_weight_decay = float(head_weight_decay)
        self.atom_gradient = bool(atom_gradient)
        self.refit_mode = refit_mode
        self.omp_jit_compile = bool(omp_jit_compile)

        self.preprocess = Preprocess(_PREPROCESSING[backbone], name="preprocess")
        self.backbone = build_backbone(backbone, self.input_shape_, backbone_weights,
                                       freeze_batchnorm)
        self.feature_dim = int(self.backbone.output.shape[-1])
        # Logits stay float32 under mixed precision: losses and OMP need the precision.
        self.head = keras.layers.Dense(self.num_classes, dtype="float32", name="classifier")
        graph_learnable = learn_label_graph and method == "imcl"
        if label_graph_init is None and label_graph_layout is not None:
            # Rebuilt from a config: a placeholder of the saved support size, values from weights.
            self.label_graph = LabelGraph(None, self.num_classes, learnable=graph_learnable,
                                          clip=clip_label_graph, name="label_graph",
                                          num_entries=label_graph_layout.get("num_entries"),
                                          structure=label_graph_layout.get("structure"))
        else:
            graph_init = (np.eye(self.num_classes, dtype=np.float32) if label_graph_init is None
                          else np.asarray(label_graph_init, np.float32))
            self.label_graph = LabelGraph(graph_init, learnable=graph_learnable,
                                          clip=clip_label_graph, name="label_graph")
        self.bank = None
        if method == "imcl":
            self.bank = DictionaryBank(
                self.dictionary_size, self.input_shape_,
                "uint8" if self.input_mode == "image" else "float32",
                self.feature_dim, self.num_classes, name="dictionary_bank")
        # Resolved lambdas live in the model so they are saved and logged with it.
        self.lambda_y = self.add_weight(shape=(), initializer=keras.initializers.Constant(multiplier_y),
                                        trainable=False, name="lambda_y")
        self.lambda_f = self.add_weight(shape=(), initializer=keras.initializers.Constant(multiplier_f),
                                        trainable=False, name="lambda_f")
        self._trackers = {name: keras.metrics.Mean(name=name) for name in (
            "loss", "bce", "loss_y", "loss_f", "omp_valid_fraction", "residual_y_before",
            "residual_y_after", "residual_f_before", "residual_f_after")}
        self.build((None,) + self.input_shape_)

    # ---- forward ------------------------------------------------------------------------------

    def build(self, input_shape):
        if self.built:
            return
        self.head.build((None, self.feature_dim))
        self.label_graph.build((None, self.num_classes))
        self.built = True

    def extract_features(self, inputs, training=False):
        """Pooled backbone features [B, D], float32."""
        x = self.preprocess(inputs)
        return tf.cast(self.backbone(x, training=training), tf.float32)

    def call(self, inputs, training=False):
        return self.head(self.extract_features(inputs, training=training))

    # ---- training -----------------------------------------------------------------------------

    @property
    def metrics(self):
        return list(self._trackers.values())

    def train_step(self, data):
        inputs, labels, ids = _unpack(data)
        with tf.GradientTape() as tape:
            terms = self._loss_terms(inputs, labels, ids, training=True)
            loss = terms["loss"]
            # The hand-written loss is a per-replica mean: Keras does not rescale it for us.
            scaled = loss / tf.cast(tf.distribute.get_strategy().num_replicas_in_sync, loss.dtype)
            scaled = self.optimizer.scale_loss(scaled)
        grads = tape.gradient(scaled, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        return self._update_trackers(terms)

    def test_step(self, data):
        inputs, labels, ids = _unpack(data)
        logits = self(inputs, training=False)
        bce = losses.masked_bce(labels, logits)
        self._trackers["bce"].update_state(bce)
        self._trackers["loss"].update_state(bce)
        return {"loss": self._trackers["loss"].result(), "bce": self._trackers["bce"].result()}

    def predict_step(self, data):
        # Accepts bare inputs, (inputs,) or full (inputs, labels, ids) batches.
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self(inputs, training=False)

    def _loss_terms(self, inputs, labels, ids, training):
        """The loss of docs/architecture.md and its parts, all float32 scalars."""
        labels = tf.cast(labels, tf.float32)
        features = self.extract_features(inputs, training=training)  # [B, D]
        logits = self.head(features)  # [B, L]
        bce = losses.masked_bce(labels, logits)
        terms = {"bce": bce}
        loss = bce
        if self.head_weight_decay > 0:
            loss += self.head_weight_decay * tf.reduce_sum(tf.square(self.head.kernel))
        if self.method == "imcl":
            terms.update(self._smoothness_terms(inputs, features, logits, labels, ids, training,
                                                self.lambda_y, self.lambda_f))
            loss += self.lambda_y * terms["loss_y"]
            if self.feature_loss:
                loss += self.lambda_f * terms["loss_f"]
        terms["loss"] = loss
        return terms

    def _smoothness_terms(self, inputs, features, logits, labels, ids, training, lambda_y, lambda_f):
        """Steps 2-4 of docs/architecture.md: label states, OMP, smoothness residuals."""
        fit = self._neighbour_fit(inputs, features, logits, labels, ids, training, lambda_y,
                                  lambda_f)
        query_y, query_f = fit["query_y"], fit["query_f"]
        loss_y, loss_f = losses.smoothness_losses(query_y, query_f, fit["neighbour_y"],
                                                  fit["neighbour_f"], fit["coef_y"],
                                                  fit["coef_f"], fit["valid"])
        batch_size = tf.cast(tf.shape(query_y)[0], tf.float32)
        return {
            "loss_y": loss_y,
            "loss_f": loss_f,
            "omp_valid_fraction": tf.reduce_mean(tf.cast(fit["valid"], tf.float32)),
            "residual_y_before": tf.stop_gradient(tf.reduce_sum(tf.square(query_y)) / batch_size),
            "residual_y_after": tf.stop_gradient(loss_y),
            "residual_f_before": tf.stop_gradient(tf.reduce_sum(tf.square(query_f)) / batch_size),
            "residual_f_after": tf.stop_gradient(loss_f),
        }

    def _neighbour_fit(self, inputs, features, logits, labels, ids, training, lambda_y, lambda_f):
        """The queries, their neighbours and the coefficients the smoothness residuals use.

        Returns a dict: query_y [B, L], query_f [B, D+1], neighbour_y [B, k, L], neighbour_f
        [B, k, D+1] (with gradient), coef_y, coef_f [B, k] (constants), valid [B, k], and `omp`,
        the OMPResult against the bank (whose coefficients forward mode may replace, see
        `refit_mode`).
        """
        query_y = losses.query_label_states(logits, labels, self.asym_c)  # [B, L]
        query_f = _with_bias(features)  # [B, D+1]: the constant coordinate is reconstructed too
        bank_f = _with_bias(self.bank.features)  # [M, D+1], constants until the next refresh
        # Atom label states for SELECTION only, with the current classifier and graph but no
        # gradient (docs/architecture.md, scale rules): only the B x k selected neighbours
        # enter the loss, and their states are recomputed with gradient below.
        atoms_y = self.selection_atom_states()  # [M, L]
        omp = joint_nonnegative_omp(
            tf.stop_gradient(query_y), tf.stop_gradient(query_f), atoms_y,
            bank_f, self.k, lambda_y=lambda_y, lambda_f=lambda_f,
            exclude=self.bank.exclusion_mask(ids), jit_compile=self.omp_jit_compile)
        indices = tf.maximum(omp.indices, 0)  # invalid slots are masked by `valid` below
        coef_y, coef_f = omp.coef_y, omp.coef_f
        batch = tf.shape(indices)[0]
        flat = tf.reshape(indices, [-1])  # [B*k]
        neighbour_labels = tf.cast(tf.gather(self.bank.labels, flat), tf.float32)  # [B*k, L]
        if self.neighbour_mode == "forward":
            # Neighbour inputs go through the backbone again, with gradient (docs/method.md §1).
            neighbour_features = self.extract_features(self.bank(flat), training=training)
        else:
            # The cached features of the chosen atoms (constants until the next refresh).
            neighbour_features = tf.gather(self.bank.features, flat)  # [B*k, D]
        # The chosen neighbours' label states, with gradient to the classifier and the graph.
        neighbour_y = losses.atom_label_states(
            self.head(neighbour_features), neighbour_labels, self.label_graph, self.asym_c)
        neighbour_y = tf.reshape(neighbour_y, [batch, self.k, self.num_classes])
        neighbour_f = tf.reshape(_with_bias(neighbour_features), [batch, self.k, -1])
        if not self.atom_gradient:
            # Neighbours act as fixed teachers: only the query side learns from the residual.
            neighbour_y = tf.stop_gradient(neighbour_y)
            neighbour_f = tf.stop_gradient(neighbour_f)
        if self.neighbour_mode == "forward" and self.refit_mode == "reuse_support_refit":
            # Same support, coefficients re-solved for the fresh vectors (docs/method.md §3).
            coef_y, coef_f = refit_on_support(query_y, query_f, neighbour_y, neighbour_f,
                                              omp.valid)
        return {"query_y": query_y, "query_f": query_f, "neighbour_y": neighbour_y,
                "neighbour_f": neighbour_f, "coef_y": coef_y, "coef_f": coef_f,
                "valid": omp.valid, "omp": omp}

    def selection_atom_states(self) -> tf.Tensor:
        """[M, L] label states of every bank atom (current classifier and graph), no gradient.

        They only choose the neighbours (the OMP); the loss uses the chosen neighbours' states
        recomputed with gradient.
        """
        logits = self.head(self.bank.features)  # [M, L]
        return tf.stop_gradient(losses.atom_label_states(
            logits, self.bank.label_rows(), self.label_graph, self.asym_c))

    def _update_trackers(self, terms):
        for name, value in terms.items():
            self._trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self._trackers.items()
                if name in terms}

    # ---- the dictionary bank and lambdas ------------------------------------------------------

    def fill_bank(self, inputs: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
        """Puts the chosen training images into the bank and computes their features."""
        if self.bank is None:
            raise ValueError("fill_bank: the logistic model has no dictionary bank.")
        self.bank.set_contents(inputs, labels, ids)
        self.refresh_bank()

    def refresh_bank(self, batch_size: int = 256) -> None:
        """Re-encodes the bank's inputs with the current network (inference mode)."""
        if self.bank is None:
            return
        self.bank.refresh(self._bank_features, batch_size)

    @tf.function(reduce_retracing=True)
    def _bank_features(self, inputs):
        return self.extract_features(inputs, training=False)

    def calibrate_lambdas(self, dataset, num_batches: int = 10) -> dict[str, float]:
        """Sets lambda_y, lambda_f by balancing against the BCE on batches (docs/method.md §1).

        During calibration the OMP selects neighbours on labels only (lambda_y : lambda_f =
        1 : 0), as the official code's provisional weights do. The losses are computed in training
        mode, as in train_step; the backbone's BatchNorm statistics are left as they were.
        Returns the resolved values.
        """
        if self.method != "imcl":
            return {}
        if self.balance == "none":
            self.lambda_y.assign(self.multiplier_y)
            self.lambda_f.assign(self.multiplier_f)
            return {"lambda_y": self.multiplier_y, "lambda_f": self.multiplier_f}
        sums = {"bce": 0.0, "loss_y": 0.0, "loss_f": 0.0}
        seen = 0
        # The losses are measured as training computes them (BatchNorm on batch statistics,
        # dropout on): in inference mode a short baseline's BCE and L_f differ from the training
        # values by orders of magnitude. Training mode updates BatchNorm's moving statistics, so
        # every non-trainable backbone variable is restored afterwards: calibration changes only
        # the lambdas.
        saved = [(v, v.numpy()) for v in self.backbone.non_trainable_variables]
        try:
            for data in dataset.take(num_batches):
                terms = self._calibration_terms(*_unpack(data))
                for name in sums:
                    sums[name] += float(terms[name])
                seen += 1
        finally:
            for variable, value in saved:
                variable.assign(value)
        if seen == 0:
            raise ValueError("calibrate_lambdas: the calibration dataset yielded no batch.")
        lambda_y, lambda_f = losses.resolve_lambdas(
            self.balance, sums["bce"] / seen, sums["loss_y"] / seen, sums["loss_f"] / seen,
            self.multiplier_y, self.multiplier_f)
        self.lambda_y.assign(lambda_y)
        self.lambda_f.assign(lambda_f)
        return {"lambda_y": float(lambda_y), "lambda_f": float(lambda_f),
                "calibration_bce": sums["bce"] / seen, "calibration_loss_y": sums["loss_y"] / seen,
                "calibration_loss_f": sums["loss_f"] / seen}

    @tf.function(reduce_retracing=True)
    def _calibration_terms(self, inputs, labels, ids):
        labels = tf.cast(labels, tf.float32)
        features = self.extract_features(inputs, training=True)
        logits = self.head(features)
        terms = self._smoothness_terms(inputs, features, logits, labels, ids, True,
                                       tf.constant(1.0), tf.constant(0.0))
        terms["bce"] = losses.masked_bce(labels, logits)
        return terms

    # ---- serialisation -------------------------------------------------------------------------

    def get_config(self):
        return {
            "num_classes": self.num_classes, "input_shape_": list(self.input_shape_),
            "backbone": self.backbone_name, "backbone_weights": "none", "method": self.method,
            "dictionary_size": self.dictionary_size, "k": self.k,
            "multiplier_y": self.multiplier_y, "multiplier_f": self.multiplier_f,
            "balance": self.balance, "asym_c": self.asym_c,
            "learn_label_graph": self.learn_label_graph, "clip_label_graph": self.clip_label_graph,
            "neighbour_mode": self.neighbour_mode, "feature_loss": self.feature_loss,
            "freeze_batchnorm": self.freeze_batchnorm, "head_weight_decay": self.head_weight_decay,
            "atom_gradient": self.atom_gradient, "refit_mode": self.refit_mode,
            "omp_jit_compile": self.omp_jit_compile,
            "label_graph_layout": {"num_entries": self.label_graph.get_config()["num_entries"],
                                   "structure": self.label_graph.structure},
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"IMCLModel: {name} must be one of {choices}, received {name}={value!r}.")


def _unpack(data):
    if not (isinstance(data, (tuple, list)) and len(data) == 3):
        raise ValueError("IMCLModel expects batches (inputs, labels, ids) as made by "
                         "imcl_tf.data.make_dataset; received a batch of structure "
                         f"{tf.nest.map_structure(lambda t: getattr(t, 'shape', t), data)}.")
    return data


def _with_bias(features):
    """Appends the constant 1 coordinate (the official features are pool5 + 1)."""
    ones = tf.ones_like(features[..., :1])
    return tf.concat([features, ones], axis=-1)


# ---- model directories ---------------------------------------------------------------------------

MODEL_CONFIG_JSON = "model_config.json"
BEST_MODEL = "best.keras"
LATEST_MODEL = "latest.keras"


def save_model_file(model: keras.Model, path: str) -> None:
    """Saves a .keras file atomically: a reader never sees a half-written model."""
    tmp = path[: -len(".keras")] + f".tmp-{os.getpid()}.keras"
    model.save(tmp)
    os.replace(tmp, path)


def write_model_info(model_dir: str, info: dict[str, Any]) -> None:
    os.makedirs(model_dir, exist_ok=True)
    path = os.path.join(model_dir, MODEL_CONFIG_JSON)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def read_model_info(model_dir: str) -> dict[str, Any]:
    path = os.path.join(model_dir, MODEL_CONFIG_JSON)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: {model_dir!r} is not a model_dir written by "
                                "imcl-train.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_model_dir(model_dir: str, checkpoint: str = "best") -> tuple[keras.Model, dict[str, Any]]:
    """Loads the best (or latest) model of a training run and its description.

    Returns (model, info) with info keys class_names, input_mode, image_size, feature_dim (and
    the rest of the run's resolved configuration).
    """
    if checkpoint not in ("best", "latest"):
        raise ValueError(f"checkpoint must be 'best' or 'latest', received {checkpoint!r}.")
    info = read_model_info(model_dir)
    path = os.path.join(model_dir, BEST_MODEL if checkpoint == "best" else LATEST_MODEL)
    if checkpoint == "best" and not os.path.exists(path):
        path = os.path.join(model_dir, LATEST_MODEL)  # a run without validation keeps only latest
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: the run in {model_dir!r} has not saved a model "
                                "yet (training writes it at each evaluation and at the end).")
    model = keras.saving.load_model(path, compile=False)
    return model, info

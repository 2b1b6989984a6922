"""IMCLModel: a CNN (or feature adapter) with a multi-label head, trained by one method.

One Keras model serves every method of `imcl_tf.methods` so that a comparison is fair: the
backbone, the head, the input scaling, the optimizers and the saving are the model's; the loss
and whatever else a method needs are its `Method` layer (`model.method`). Preprocessing of
0..255 images happens inside the model, so an exported model takes raw pixels.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from imcl_tf import losses
from imcl_tf.choices import BACKBONES, METHODS
from imcl_tf.methods import registry as method_registry
from imcl_tf.methods.base import Batch, Untracked, unpack

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
    """Multi-label classifier trained from partial labels by one method of `imcl_tf.methods`.

    The model owns the input scaling, the backbone and the classifier head; everything
    method-specific (the loss, any head or state of its own) is `self.method`, a
    `imcl_tf.methods.base.Method` layer built from the registry. Calling the model maps inputs
    (float32 images in 0..255, or embeddings) to per-class logits [B, L]: the method's output
    `output` (most methods have one). Training data are `(inputs, labels, ids)` batches from
    `imcl_tf.data.make_dataset`: labels in {+1, -1, 0} (present, absent, unknown), ids the
    int64 id hashes.

    Args:
      num_classes: L.
      input_shape_: (H, W, 3) for images, (D_in,) for the `features` backbone.
      backbone: one of BACKBONES.
      backbone_weights: "none", "imagenet" or a weights file.
      method: a name of `imcl_tf.methods.registry.METHODS`.
      method_options: the method's constructor options (see its module); options may also be
        given as further keyword arguments, e.g. `IMCLModel(..., method="imcl", k=3,
        dictionary_size=64)`.
      method_instance: an already built Method (the training application builds it with
        `Method.from_run`); then `method` and `method_options` are ignored.
      freeze_batchnorm: see build_backbone.
      head_weight_decay: L2 factor on the classifier kernel (bias excluded), CUB uses 1e-4.
      output: which of the method's OUTPUTS calling the model returns (None: the first).
    """

    def __init__(self, num_classes: int, input_shape_: tuple[int, ...], backbone: str = "small_cnn",
                 backbone_weights: str = "none", method: str = "imcl",
                 method_options: dict[str, Any] | None = None, freeze_batchnorm: bool = False,
                 head_weight_decay: float = 0.0, output: str | None = None,
                 method_instance: Any = None, **kwargs):
        layer_kwargs = {key: kwargs.pop(key) for key in _KERAS_MODEL_KWARGS if key in kwargs}
        super().__init__(**layer_kwargs)
        _check_choice("backbone", backbone, BACKBONES)
        if num_classes < 1:
            raise ValueError(f"IMCLModel: num_classes must be >= 1, received {num_classes}.")
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
        self.freeze_batchnorm = bool(freeze_batchnorm)
        self.head_weight_decay = float(head_weight_decay)

        self.preprocess = Preprocess(_PREPROCESSING[backbone], name="preprocess")
        self.backbone = build_backbone(backbone, self.input_shape_, backbone_weights,
                                       freeze_batchnorm)
        self.feature_dim = int(self.backbone.output.shape[-1])
        # Logits stay float32 under mixed precision: losses and OMP need the precision.
        self.head = keras.layers.Dense(self.num_classes, dtype="float32", name="classifier")
        if method_instance is None:
            _check_choice("method", method, METHODS)
            options = {**(method_options or {}), **kwargs}
            method_class = method_registry.get(method)
            takes = [name for name, parameter in
                     inspect.signature(method_class.__init__).parameters.items()
                     if parameter.kind == parameter.POSITIONAL_OR_KEYWORD
                     and name not in ("self", "num_classes")]
            unknown = sorted(set(options) - set(takes) - set(_KERAS_MODEL_KWARGS))
            if unknown:
                raise ValueError(f"IMCLModel: method {method!r} takes no option "
                                 f"{', '.join(map(repr, unknown))}; its options: "
                                 f"{', '.join(takes) or 'none'}.")
            method_instance = method_class(num_classes=self.num_classes, **options)
        elif kwargs:
            raise ValueError(f"IMCLModel: unexpected arguments {sorted(kwargs)}.")
        if method_instance.num_classes != self.num_classes:
            raise ValueError(f"IMCLModel: the method was built for {method_instance.num_classes} "
                             f"classes, the model has {self.num_classes}.")
        self.method = method_instance
        self.method_name = method_instance.NAME
        outputs = method_instance.OUTPUTS
        if output is not None and output not in outputs:
            raise ValueError(f"IMCLModel: method {self.method_name!r} has outputs {outputs}, "
                             f"received output={output!r}.")
        self.output_name = output or outputs[0]
        self.head.build((None, self.feature_dim))
        self.method.attach(self)
        self._trackers = {name: keras.metrics.Mean(name=name)
                          for name in ("loss",) + tuple(self.method.TERMS)}
        self.build((None,) + self.input_shape_)

    # ---- forward ------------------------------------------------------------------------------

    def build(self, input_shape):
        self.built = True

    def extract_features(self, inputs, training=False):
        """Pooled backbone features [B, D], float32."""
        x = self.preprocess(inputs)
        return tf.cast(self.backbone(x, training=training), tf.float32)

    def call(self, inputs, training=False):
        features = self.extract_features(inputs, training=training)
        return self.method.logits(self, features, training=training, output=self.output_name)

    def with_output(self, output: str) -> "IMCLModel":
        """Selects which of the method's OUTPUTS calling the model returns; returns self."""
        if output not in self.method.OUTPUTS:
            raise ValueError(f"method {self.method_name!r} has outputs {self.method.OUTPUTS}, "
                             f"received output={output!r}.")
        self.output_name = output
        # predict/evaluate trace `call` once and keep the traced function, which read the old
        # output name as a constant: drop them so the next call traces the new output.
        self.predict_function = None
        self.test_function = None
        return self

    # ---- training -----------------------------------------------------------------------------

    @property
    def metrics(self):
        return list(self._trackers.values())

    def train_step(self, data):
        inputs, labels, ids = unpack(data)
        with tf.GradientTape() as tape:
            terms = self._loss_terms(inputs, labels, ids, training=True)
            loss = terms["loss"]
            # The hand-written loss is a per-replica mean: Keras does not rescale it for us.
            scaled = loss / tf.cast(tf.distribute.get_strategy().num_replicas_in_sync, loss.dtype)
            scaled = self.optimizer.scale_loss(scaled)
        grads = tape.gradient(scaled, self.trainable_weights)
        self._apply_gradients(grads, self.trainable_weights)
        return self._update_trackers(terms)

    def _loss_terms(self, inputs, labels, ids, training):
        """The method's loss and its parts (float32 scalars), plus the head's weight decay."""
        batch = Batch(inputs=inputs, labels=tf.cast(labels, tf.float32), ids=ids,
                      features=self.extract_features(inputs, training=training))
        terms = dict(self.method.loss_terms(self, batch, training))
        if self.head_weight_decay > 0:
            terms["loss"] = terms["loss"] + self.head_weight_decay * tf.reduce_sum(
                tf.square(self.head.kernel))
        return terms

    def _update_trackers(self, terms):
        for name, value in terms.items():
            if name in self._trackers:
                self._trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self._trackers.items()
                if name in terms}

    # ---- optimizers per part ------------------------------------------------------------------

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts that may have an optimizer of their own: the backbone and the method's."""
        return ("backbone",) + tuple(self.method.PARTS)

    def set_part_optimizers(self, optimizers: dict[str, keras.optimizers.Optimizer]) -> None:
        """Gives the backbone and/or the label graph optimizers of their own.

        `optimizers` maps "backbone" or "graph" to an optimizer (built here on that part's
        trainable variables if it is not yet); every other trainable weight (the head) stays with
        `self.optimizer`, whose step counter is the run's. A part without an entry is trained by
        `self.optimizer` too. Under mixed precision the part optimizers receive gradients unscaled
        by the loss-scale optimizer's current scale and skip a step whose gradients are not finite,
        as it does. The optimizers are not saved with the model (a .keras file is for inference and
        warm starts); checkpoint them with `part_optimizers` to resume.
        """
        unknown = sorted(set(optimizers) - set(self.parts))
        if unknown:
            raise ValueError(f"set_part_optimizers: unknown parts {unknown}; the parts with their "
                             f"own optimizer are {self.parts}.")
        for part, optimizer in optimizers.items():
            variables = self.part_variables(part)
            if not variables:
                raise ValueError(f"set_part_optimizers: the {part} has no trainable variables "
                                 "(frozen, or a fixed graph); give it no optimizer.")
            if not optimizer.built:
                optimizer.build(variables)
        # A plain holder, so Keras saving and tf.train tracking leave the optimizers alone.
        self._part_optimizer_holder = Untracked(dict(optimizers))

    @property
    def part_optimizers(self) -> dict[str, keras.optimizers.Optimizer]:
        """{part: optimizer} given by set_part_optimizers (empty: one optimizer for everything)."""
        holder = getattr(self, "_part_optimizer_holder", None)
        return dict(holder.value) if holder is not None else {}

    def main_optimizer_variables(self) -> list:
        """The trainable variables `self.optimizer` updates: those of no part optimizer."""
        owned = {id(v) for part in self.part_optimizers for v in self.part_variables(part)}
        return [v for v in self.trainable_weights if id(v) not in owned]

    def part_variables(self, part: str) -> list:
        """Trainable variables of "backbone", "graph" or "head" (every other trainable weight)."""
        if part == "backbone":
            return list(self.backbone.trainable_variables)
        if part in self.method.PARTS:
            return list(self.method.part_variables(part))
        if part != "head":
            raise ValueError(f"part_variables: part must be one of {('head',) + self.parts}, "
                             f"received {part!r}.")
        others = {id(v) for name in self.parts for v in self.part_variables(name)}
        return [v for v in self.trainable_weights if id(v) not in others]

    def _apply_gradients(self, grads, variables):
        """Each part's gradients to its optimizer; the rest to self.optimizer."""
        parts = self.part_optimizers
        if not parts:
            self.optimizer.apply_gradients(zip(grads, variables))
            return
        owner = {id(v): part for part in parts for v in self.part_variables(part)}
        groups = {part: ([], []) for part in parts}
        main = ([], [])
        for grad, variable in zip(grads, variables):
            group = groups[owner[id(variable)]] if id(variable) in owner else main
            group[0].append(grad)
            group[1].append(variable)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # Read the scale before the main optimizer's apply may change it.
            scale = tf.cast(self.optimizer.dynamic_scale, tf.float32)
            groups = {part: ([None if g is None else g / tf.cast(scale, g.dtype) for g in gs], vs)
                      for part, (gs, vs) in groups.items()}
            finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g))
                                    for gs, _ in groups.values() for g in gs if g is not None])
        else:
            finite = None
        self.optimizer.apply_gradients(zip(*main))
        for part, (part_grads, part_variables) in groups.items():
            pairs = [(g, v) for g, v in zip(part_grads, part_variables) if g is not None]
            if not pairs:
                continue
            optimizer = parts[part]
            if finite is None:
                optimizer.apply_gradients(pairs)
            else:
                tf.cond(finite, lambda o=optimizer, p=pairs: _applied(o, p),
                        lambda: tf.constant(False))


    def test_step(self, data):
        inputs, labels, ids = unpack(data)
        logits = self(inputs, training=False)
        bce = losses.masked_bce(labels[..., :self.num_classes], logits)
        self._trackers["loss"].update_state(bce)
        return {"loss": self._trackers["loss"].result()}

    def predict_step(self, data):
        # Accepts bare inputs, (inputs,) or full (inputs, labels, ids) batches.
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        return self(inputs, training=False)

    # ---- serialisation -------------------------------------------------------------------------

    def get_config(self):
        method_config = self.method.get_config()
        method_config.pop("num_classes", None)
        return {
            "num_classes": self.num_classes, "input_shape_": list(self.input_shape_),
            "backbone": self.backbone_name, "backbone_weights": "none",
            "method": self.method_name, "method_options": method_config,
            "freeze_batchnorm": self.freeze_batchnorm, "head_weight_decay": self.head_weight_decay,
            "output": self.output_name, "name": self.name,
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


# Keyword arguments that go to keras.Model rather than to the method.
_KERAS_MODEL_KWARGS = ("name", "trainable", "dtype")


def _applied(optimizer, pairs):
    optimizer.apply_gradients(pairs)
    return tf.constant(True)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"IMCLModel: {name} must be one of {choices}, received {name}={value!r}.")


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

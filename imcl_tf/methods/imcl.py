"""IMCL (Huynh & Elhamifar, CVPR 2020): the masked BCE plus the smoothness loss.

Each query image's label state and feature are reconstructed from k similar images of a
dictionary bank, chosen by a batched Joint Nonnegative OMP (`imcl_tf.omp`), through a learnable
label graph (`imcl_tf.label_graph`): loss = BCE + lambda_y * L_y + lambda_f * L_f
(docs/method.md). The method's state is the bank (`imcl_tf.memory.DictionaryBank`), the label
graph and the resolved lambdas, all weights of this layer; the atoms' selection label states
are derived and kept out of checkpoints.

Its options are first-class TrainConfig fields (--k, --lambda_y, ...: the interface of
docs/architecture.md), so OPTIONS below is empty.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from imcl_tf import label_graph as graph_lib
from imcl_tf import losses, memory
from imcl_tf.choices import BALANCE_MODES, NEIGHBOUR_MODES, REFIT_MODES
from imcl_tf.label_graph import LabelGraph
from imcl_tf.memory import DictionaryBank
from imcl_tf.methods.base import Batch, Method, RunContext, Untracked, unpack
from imcl_tf.omp import joint_nonnegative_omp, refit_on_support

OPTIONS = ()

# The official code's mode, not implemented (docs/method.md §5): refused with an explanation.
_UNIMPLEMENTED_REFIT_MODES = ("official_pool_rerun",)
# The atoms' selection label states are computed in chunks of about this many [atom, label]
# entries (64 MB of float32), but at least MIN_ATOM_STATE_CHUNK atoms: the temporaries of the
# classifier and graph over the bank stay small whatever M and L are.
ATOM_STATE_CHUNK_ENTRIES = 1 << 24
MIN_ATOM_STATE_CHUNK = 1024


class IMCL(Method):
    """The IMCL smoothness loss over a dictionary bank, beside the masked BCE.

    Args:
      num_classes: L.
      dictionary_size: M, atoms in the bank (static, >= k).
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
      omp_jit_compile: run the OMP XLA-compiled inside the step (docs/architecture.md), and
        fuse the elementwise work of the atoms' selection label states with XLA; False runs
        both as ordinary TensorFlow ops (a fallback where XLA is unavailable).
      label_state_refresh_every: recompute the atoms' selection label states (the classifier
        and graph over all M bank atoms, 2 M D L multiply-adds) every this many steps and reuse
        them in between; 1 (the default) recomputes them every step, which is exact. Larger
        values let the OMP select with states up to n - 1 steps old; the chosen neighbours'
        states in the loss are always current. A bank refresh makes them due again.
      label_graph_init: the initial [L, L] graph (None: identity).
      label_graph_layout: {"num_entries", "structure"} of a saved graph (get_config() writes it),
        used when label_graph_init is None to rebuild the graph's storage before its weights load.
      bce_unknown_as_negative: the cross-entropy counts unknown entries as negatives (mean over
        all B x L entries) while the smoothness loss keeps them unknown (official MS-COCO).
      omp_score_threshold: the official tau (see omp.joint_nonnegative_omp score_threshold).
      omp_balance_scores: the official is_balance (see omp.joint_nonnegative_omp).
      reconstruction: "linear" (official code) or "tanh" (the paper's Eq. 3), see
        losses.smoothness_losses.
      class_label_weight, num_image_classes: the CUB class-label augmentation (docs/method.md §5,
        official weight_class = 10): with num_image_classes = C > 0 every label row (batches and
        bank) carries C more always-known entries, the image-class one-hot of
        `make_dataset(image_classes=C)`, which only the label states see: they get value
        class_label_weight at the image's class and -1/c at the others, appended after the graph
        propagation, so they steer the OMP and the label residual; the cross-entropy and the
        outputs keep the L classes.
      atom_gradient: let the smoothness residuals also train the neighbours' label states (the
        official code does); False treats neighbours as fixed teachers of the query: no gradient
        through their label states or (forward mode) their features, so none reaches the graph.
      refresh_every: re-encode the bank every this many steps (the BankRefresh callback of a
        training run).
    """

    NAME = "imcl"
    TERMS = ("bce", "loss_y", "loss_f", "omp_valid_fraction", "residual_y_before",
             "residual_y_after", "residual_f_before", "residual_f_after")
    PARTS = ("graph",)
    HPARAMS = ("k", "lambda_y", "lambda_f", "balance", "label_graph", "label_graph_top_k",
               "learn_label_graph", "neighbour_mode", "dictionary_per_class", "asym_c",
               "feature_loss")

    def __init__(self, num_classes: int, dictionary_size: int = 0, k: int = 3,
                 multiplier_y: float = 1.0, multiplier_f: float = 0.5,
                 balance: str = "loss_ratio", asym_c: float = 2.0, learn_label_graph: bool = True,
                 clip_label_graph: bool = True, neighbour_mode: str = "cached",
                 feature_loss: bool = True, label_graph_init: Any = None,
                 atom_gradient: bool = True, refit_mode: str = "reuse_support_refit",
                 label_graph_layout: dict[str, Any] | None = None, omp_jit_compile: bool = True,
                 bce_unknown_as_negative: bool = False, omp_score_threshold: float = 0.0,
                 omp_balance_scores: bool = False, reconstruction: str = "linear",
                 class_label_weight: float = 0.0, num_image_classes: int = 0,
                 label_state_refresh_every: int = 1, refresh_every: int = 100, **kwargs):
        super().__init__(num_classes, **kwargs)
        _check_choice("neighbour_mode", neighbour_mode, NEIGHBOUR_MODES)
        if refit_mode in _UNIMPLEMENTED_REFIT_MODES:
            raise ValueError(f"IMCLModel: refit_mode={refit_mode!r} (a second OMP over the union "
                             "of the batch's neighbours, docs/method.md §3) is not implemented; "
                             f"choose one of {REFIT_MODES}.")
        _check_choice("refit_mode", refit_mode, REFIT_MODES)
        _check_choice("balance", balance, BALANCE_MODES)
        if dictionary_size < 1:
            raise ValueError("IMCLModel: method='imcl' needs a dictionary bank; received "
                             f"dictionary_size={dictionary_size}.")
        if not 1 <= k <= dictionary_size:
            raise ValueError(f"IMCLModel: k must be in [1, dictionary_size={dictionary_size}], "
                             f"received k={k}.")
        if (isinstance(label_state_refresh_every, bool) or
                not isinstance(label_state_refresh_every, (int, np.integer)) or
                label_state_refresh_every < 1):
            raise ValueError("IMCLModel: label_state_refresh_every must be an integer >= 1, "
                             f"received {label_state_refresh_every!r}.")
        if asym_c < 1.0:
            raise ValueError(f"IMCLModel: asym_c must be >= 1, received {asym_c}.")
        if multiplier_y < 0 or multiplier_f < 0:
            raise ValueError(f"IMCLModel: lambda multipliers must be >= 0, received "
                             f"multiplier_y={multiplier_y}, multiplier_f={multiplier_f}.")
        _check_choice("reconstruction", reconstruction, losses.RECONSTRUCTIONS)
        if not (np.isfinite(omp_score_threshold) and omp_score_threshold >= 0):
            raise ValueError("IMCLModel: omp_score_threshold must be a finite number >= 0, "
                             f"received {omp_score_threshold}.")
        if class_label_weight < 0 or num_image_classes < 0:
            raise ValueError("IMCLModel: class_label_weight and num_image_classes must be >= 0, "
                             f"received {class_label_weight} and {num_image_classes}.")
        if num_image_classes > 0 and not class_label_weight > 0:
            raise ValueError("IMCLModel: num_image_classes > 0 appends the image-class one-hot "
                             "to the label states, which needs class_label_weight > 0.")
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
        self.atom_gradient = bool(atom_gradient)
        self.refit_mode = refit_mode
        self.omp_jit_compile = bool(omp_jit_compile)
        self.bce_unknown_as_negative = bool(bce_unknown_as_negative)
        self.omp_score_threshold = float(omp_score_threshold)
        self.omp_balance_scores = bool(omp_balance_scores)
        self.reconstruction = reconstruction
        self.class_label_weight = float(class_label_weight)
        self.num_image_classes = int(num_image_classes)
        self.label_state_refresh_every = int(label_state_refresh_every)
        self.refresh_every = int(refresh_every)
        if label_graph_init is None and label_graph_layout is not None:
            # Rebuilt from a config: a placeholder of the saved support size, values from weights.
            self.label_graph = LabelGraph(None, self.num_classes, learnable=learn_label_graph,
                                          clip=clip_label_graph, name="label_graph",
                                          num_entries=label_graph_layout.get("num_entries"),
                                          structure=label_graph_layout.get("structure"))
        else:
            graph_init = (np.eye(self.num_classes, dtype=np.float32) if label_graph_init is None
                          else np.asarray(label_graph_init, np.float32))
            self.label_graph = LabelGraph(graph_init, learnable=learn_label_graph,
                                          clip=clip_label_graph, name="label_graph")
        # Resolved lambdas live in the model so they are saved and logged with it.
        self.lambda_y = self.add_weight(shape=(), initializer=keras.initializers.Constant(multiplier_y),
                                        trainable=False, name="lambda_y")
        self.lambda_f = self.add_weight(shape=(), initializer=keras.initializers.Constant(multiplier_f),
                                        trainable=False, name="lambda_f")

    @classmethod
    def from_run(cls, run: RunContext) -> "IMCL":
        config = run.config
        train_labels = run.train_labels
        bank_indices = memory.select_dictionary(
            train_labels, config.dictionary_per_class, config.dictionary_size, config.seed)
        if config.k > len(bank_indices):
            from imcl_tf.training.errors import bad_flag
            bad_flag("k", f"{config.k} is more than the {len(bank_indices)} images of the "
                          "dictionary bank; lower --k or raise --dictionary_per_class / "
                          "--dictionary_size.")
        graph_rows = train_labels
        if config.bce_unknown_as_negative:
            # Unknown entries are absences for this run (COCO's unmentioned words): the
            # co-occurrence graph counts them so, as the cross-entropy does.
            graph_rows = np.where(train_labels == 0, -1, train_labels).astype(train_labels.dtype)
        graph = graph_lib.build_label_graph(config.label_graph, run.info.num_classes,
                                            graph_rows, config.label_graph_top_k or None)
        from imcl_tf.training.config import image_class_count
        from imcl_tf.training.optimizer import part_learning_rates
        method = cls(
            run.info.num_classes, dictionary_size=len(bank_indices), k=config.k,
            multiplier_y=config.lambda_y, multiplier_f=config.lambda_f, balance=config.balance,
            asym_c=config.asym_c,
            learn_label_graph=config.learn_label_graph and part_learning_rates(config).graph > 0,
            clip_label_graph=config.clip_label_graph, neighbour_mode=config.neighbour_mode,
            feature_loss=config.feature_loss, label_graph_init=graph,
            atom_gradient=config.atom_gradient, refit_mode=config.refit_mode,
            omp_jit_compile=config.omp_jit_compile,
            bce_unknown_as_negative=config.bce_unknown_as_negative,
            omp_score_threshold=config.omp_score_threshold,
            omp_balance_scores=config.omp_balance_scores, reconstruction=config.reconstruction,
            class_label_weight=config.class_label_weight,
            num_image_classes=image_class_count(run.info) if config.class_label_weight > 0 else 0,
            label_state_refresh_every=config.label_state_refresh_every,
            refresh_every=config.refresh_every)
        method.bank_indices = bank_indices  # the training images of the bank (prepare, restore)
        return method

    def attach(self, model) -> None:
        self.owner_ref = Untracked(model)
        self.label_graph.build((None, self.num_classes))
        input_mode = "features" if model.backbone_name == "features" else "image"
        self.bank = DictionaryBank(
            self.dictionary_size, model.input_shape_,
            "uint8" if input_mode == "image" else "float32",
            model.feature_dim, self.num_classes + self.num_image_classes,
            name="dictionary_bank")
        # The atoms' selection label states [M, L (+ C)], one variable per chunk of atoms
        # (`_atom_state_chunks`), each written whole and read by the OMP as a row block: a single
        # [M, L] variable written in parts (scatter or slice assignment) is copied whole by every
        # later dense read (TensorFlow's copy-on-read mode), one [M, L] array more at the peak.
        # With label_state_refresh_every > 1 they are reused between refreshes. Derived state:
        # kept out of weights and checkpoints, recomputed after a restart.
        per_replica = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_READ,
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        width = self.num_classes + self.num_image_classes
        self._atom_states = Untracked((
            tuple(tf.Variable(tf.zeros([end - start, width]),
                              name=f"atom_label_states_{index}", **per_replica)
                  for index, (start, end) in enumerate(self._atom_state_chunks())),
            # Calls since the last recomputation; 0 = due now.
            tf.Variable(tf.constant(0, tf.int64), name="atom_label_state_age", **per_replica),
            # Squared norms of the states and of the bias-extended features, for the OMP.
            tf.Variable(tf.zeros([self.dictionary_size]), name="atom_state_sq_norms",
                        **per_replica),
            tf.Variable(tf.zeros([self.dictionary_size]), name="atom_feature_sq_norms",
                        **per_replica)))
        self.built = True

    def owner(self):
        """The model this method belongs to (a method, not a property: Keras saving walks
        properties, and would walk back into the model)."""
        return self.owner_ref.value

    @property
    def image_classes(self) -> int:
        return self.num_image_classes

    def part_variables(self, part: str) -> list:
        return list(self.label_graph.trainable_variables) if part == "graph" else []

    # ---- the loss ------------------------------------------------------------------------------

    def loss_terms(self, model, batch: Batch, training: bool):
        """The loss of docs/architecture.md and its parts, all float32 scalars."""
        logits = model.head(batch.features)  # [B, L]
        bce = losses.masked_bce(batch.labels[..., :self.num_classes], logits,
                                self.bce_unknown_as_negative)
        terms = {"bce": bce}
        terms.update(self._smoothness_terms(batch.inputs, batch.features, logits, batch.labels,
                                            batch.ids, training, self.lambda_y, self.lambda_f))
        loss = bce + self.lambda_y * terms["loss_y"]
        if self.feature_loss:
            loss += self.lambda_f * terms["loss_f"]
        terms["loss"] = loss
        return terms

    def validation_terms(self, model, batch: Batch):
        # A run with the class-label augmentation has no image-class rows in validation
        # batches (they are for training only), so its smoothness losses are not measured there.
        if self.num_image_classes:
            return {}
        logits = model.head(batch.features)
        terms = self._smoothness_terms(batch.inputs, batch.features, logits, batch.labels,
                                       batch.ids, False, self.lambda_y, self.lambda_f)
        size = tf.cast(tf.shape(logits)[0], tf.float32)
        return {"loss_y": terms["loss_y"] * size, "loss_f": terms["loss_f"] * size}

    def _smoothness_terms(self, inputs, features, logits, labels, ids, training, lambda_y, lambda_f):
        """Steps 2-4 of docs/architecture.md: label states, OMP, smoothness residuals."""
        fit = self._neighbour_fit(inputs, features, logits, labels, ids, training, lambda_y,
                                  lambda_f)
        query_y, query_f = fit["query_y"], fit["query_f"]
        loss_y, loss_f = losses.smoothness_losses(query_y, query_f, fit["neighbour_y"],
                                                  fit["neighbour_f"], fit["coef_y"],
                                                  fit["coef_f"], fit["valid"],
                                                  reconstruction=self.reconstruction)
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
        query_y = self._with_class_states(losses.query_label_states(
            logits, labels[..., :self.num_classes], self.asym_c), labels)  # [B, L (+ C)]
        query_f = _with_bias(features)  # [B, D+1]: the constant coordinate is reconstructed too
        # Atom label states for SELECTION only, with the current classifier and graph but no
        # gradient (docs/architecture.md, scale rules): only the B x k selected neighbours
        # enter the loss, and their states are recomputed with gradient below.
        atoms_y = self.selection_atom_state_blocks()  # row blocks of [M, L]
        # The bank's features [M, D] with their bias coordinate 1 left implicit (joining it would
        # copy the whole bank); constants until the next refresh. Read without a copy: the
        # refresh writes them in parts, and a plain read then copied all of them (here and at
        # every chunk of the atom states: 16 copies of 0.4 GB per step at 50,000 x 2,048, see
        # memory.read_no_copy); the neighbours are gathered from this tensor.
        bank_features = self.bank.features_value()
        omp = joint_nonnegative_omp(
            tf.stop_gradient(query_y), tf.stop_gradient(query_f), atoms_y,
            bank_features, self.k, lambda_y=lambda_y, lambda_f=lambda_f,
            exclude=self.bank.exclusion_mask(ids), jit_compile=self.omp_jit_compile,
            score_threshold=self.omp_score_threshold, balance_scores=self.omp_balance_scores,
            atoms_y_sq_norms=self._atom_states.value[2].read_value(),
            atoms_f_sq_norms=self._atom_states.value[3].read_value(), atoms_f_constant=1.0,
            # The atoms are finite whenever the queries are (checked): the bank's inputs were
            # checked when it was filled, its features and states come from the same network
            # as the queries', and a label state is bounded for any finite or infinite logit.
            # Checking them would be a pass over the whole bank at every step.
            check_atoms=False)
        indices = tf.maximum(omp.indices, 0)  # invalid slots are masked by `valid` below
        coef_y, coef_f = omp.coef_y, omp.coef_f
        batch = tf.shape(indices)[0]
        flat = tf.reshape(indices, [-1])  # [B*k]
        neighbour_labels = tf.cast(tf.gather(self.bank.labels_value(), flat),
                                   tf.float32)  # [B*k, L+C]
        if self.neighbour_mode == "forward":
            # Neighbour inputs go through the backbone again, with gradient (docs/method.md §1).
            neighbour_features = self.owner().extract_features(self.bank(flat), training=training)
        else:
            # The cached features of the chosen atoms (constants until the next refresh).
            neighbour_features = tf.gather(bank_features, flat)  # [B*k, D]
        # The chosen neighbours' label states, with gradient to the classifier and the graph.
        neighbour_y = self._with_class_states(losses.atom_label_states(
            self.owner().head(neighbour_features), neighbour_labels[:, :self.num_classes],
            self.label_graph, self.asym_c), neighbour_labels)
        neighbour_y = tf.reshape(neighbour_y,
                                 [batch, self.k, self.num_classes + self.num_image_classes])
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
        """[M, L] label states of every bank atom (classifier and graph), no gradient.

        The blocks of `selection_atom_state_blocks` joined: a copy, for inspection and tests.
        """
        return tf.concat(self.selection_atom_state_blocks(), axis=0)

    def selection_atom_state_blocks(self) -> list:
        """The [M, L] label states of every bank atom as row blocks (one per chunk of atoms).

        Classifier and graph, no gradient. They only choose the neighbours (the OMP); the loss
        uses the chosen neighbours' states recomputed with gradient. Recomputed with the current
        weights at every call, or every `label_state_refresh_every` calls (see the constructor).
        """
        states, age = self._atom_states.value[:2]
        if self.label_state_refresh_every == 1:
            self._write_atom_states()
        else:
            def recompute():
                self._write_atom_states()
                return age.assign(1)

            tf.cond(tf.equal(age.read_value() % self.label_state_refresh_every, 0), recompute,
                    lambda: age.assign_add(1))
        return [tf.stop_gradient(block.read_value()) for block in states]

    def _atom_state_chunks(self) -> list[tuple[int, int]]:
        """(start, end) of each chunk of about ATOM_STATE_CHUNK_ENTRIES [atom, label] entries."""
        width = self.num_classes + self.num_image_classes
        chunk = max(MIN_ATOM_STATE_CHUNK, ATOM_STATE_CHUNK_ENTRIES // width)
        return [(start, min(start + chunk, self.dictionary_size))
                for start in range(0, self.dictionary_size, chunk)]

    def _write_atom_states(self):
        """Atom label states chunk by chunk, each assigned whole to its own variable.

        The squared norms are written in place, or under a distribution strategy (per-replica
        variables, which have no scatter_update) joined and assigned at once ([M] each).
        """
        states, _, norms_y, norms_f = self._atom_states.value
        in_place = not isinstance(norms_y, tf.distribute.DistributedValues)
        pieces = []
        done = []  # the previous chunk's writes: a graph would otherwise run all chunks at once
        for block, (start, end) in zip(states, self._atom_state_chunks()):
            # Both reads wait for the previous chunk: everything of a chunk derives from them,
            # so no chunk's [c, L] temporaries exist before the previous chunk is written (an
            # ungated label read let every chunk's label-side tensors be computed at once:
            # about 3 [M, L] float32 arrays at the peak).
            with tf.control_dependencies(done):
                features = tf.identity(self.bank.features_value()[start:end])  # [c, D]
                rows = self.bank.labels_value()[start:end]  # [c, L (+ C)] int8, checked
            logits = self.owner().head(features)  # [c, L]
            values = tf.stop_gradient(self._with_class_states(losses.bank_atom_label_states(
                logits, rows[:, :self.num_classes], self.label_graph.constant_product,
                self.asym_c, jit_compile=self.omp_jit_compile), rows))
            # Squared norms of the states and of the features with their bias coordinate.
            parts = (values, tf.reduce_sum(tf.square(values), 1),
                     tf.reduce_sum(tf.square(features), 1) + 1.0)
            done = [block.assign(values, read_value=False)]
            if in_place:
                positions = tf.range(start, end)
                done += [variable.scatter_update(tf.IndexedSlices(part, positions))
                         for variable, part in zip((norms_y, norms_f), parts[1:])]
            else:
                pieces.append(parts[1:])
            done = [] if tf.executing_eagerly() else done
        if not in_place:
            for variable, part in zip((norms_y, norms_f), zip(*pieces)):
                variable.assign(tf.concat(part, axis=0))

    def mark_atom_states_due(self) -> None:
        """Makes the next selection recompute the atoms' label states (e.g. after a refresh)."""
        self._atom_states.value[1].assign(0)

    def _with_class_states(self, states, labels):
        """Appends the class-label block to label states (see class_label_weight), if any.

        states: [N, L]; labels: [N, L + C] label rows whose last C entries are the image-class
        one-hot (+1 / -1). Returns [N, L + C]: weight a at the image's class, -1/c elsewhere.
        """
        if not self.num_image_classes:
            return states
        side = tf.cast(labels[..., self.num_classes:], tf.float32)
        block = tf.where(side > 0, self.class_label_weight,
                         tf.where(side < 0, -1.0 / self.asym_c, 0.0))
        return tf.concat([states, block], axis=-1)

    # ---- the dictionary bank and lambdas ------------------------------------------------------

    def fill_bank(self, inputs, labels: np.ndarray | None = None,
                  ids: np.ndarray | None = None) -> None:
        """Puts the chosen training images into the bank and computes their features.

        Either arrays (inputs [M, ...], labels [M, L], ids [M]) or, with labels and ids left out,
        an iterable of (inputs, labels, ids) chunks, converted one by one (see
        DictionaryBank.fill): a large image bank is then never held as float32.
        """
        if labels is None and ids is None:
            self.bank.fill(inputs)
        elif labels is None or ids is None:
            raise ValueError("fill_bank: give inputs, labels and ids, or one iterable of "
                             "(inputs, labels, ids) chunks.")
        else:
            self.bank.set_contents(inputs, labels, ids)
        self.refresh_bank()

    def restore_bank_inputs(self, chunks) -> None:
        """After a checkpoint restore: gives the bank its inputs back (they are not saved).

        `chunks` yields the same (inputs, labels, ids) the bank was filled with; the restored
        features are kept (no refresh), so the run continues exactly where it stopped.
        """
        self.bank.set_inputs(chunks)

    def refresh_bank(self, batch_size: int | None = None) -> None:
        """Re-encodes the bank's inputs with the current network (inference mode).

        batch_size: atoms per forward pass; None takes up to 256, fewer for large inputs (about
        16 M input values, e.g. 111 images of 224 x 224), so a refresh's activations stay small.
        """
        if batch_size is None:
            batch_size = int(min(256, max(1, (1 << 24) // int(np.prod(self.owner().input_shape_)))))
        self.bank.refresh(self._bank_features, batch_size)
        self.mark_atom_states_due()

    @tf.function(reduce_retracing=True)
    def _bank_features(self, inputs):
        return self.owner().extract_features(inputs, training=False)

    def calibrate_lambdas(self, dataset, num_batches: int = 10) -> dict[str, float]:
        """Sets lambda_y, lambda_f by balancing against the BCE on batches (docs/method.md §1).

        During calibration the OMP selects neighbours on labels only (lambda_y : lambda_f =
        1 : 0), as the official code's provisional weights do. The losses are computed in training
        mode, as in train_step; the backbone's BatchNorm statistics are left as they were.
        Returns the resolved values.
        """
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
        saved = [(v, v.numpy()) for v in self.owner().backbone.non_trainable_variables]
        try:
            for data in dataset.take(num_batches):
                terms = self._calibration_terms(*unpack(data))
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
        features = self.owner().extract_features(inputs, training=True)
        logits = self.owner().head(features)
        terms = self._smoothness_terms(inputs, features, logits, labels, ids, True,
                                       tf.constant(1.0), tf.constant(0.0))
        terms["bce"] = losses.masked_bce(labels[..., :self.num_classes], logits,
                                         self.bce_unknown_as_negative)
        return terms


    # ---- the training application's moments ----------------------------------------------------

    def prepare(self, model, run: RunContext) -> dict[str, Any]:
        """Fills the bank with its training images and resolves the lambdas."""
        if not getattr(model, "freeze_batchnorm", False) and model.backbone_name != "features":
            logging.warning("BatchNorm trains in this IMCL run (no warm start or backbone "
                            "weights, or --nofreeze_batchnorm): the queries' features use batch "
                            "statistics, the bank's the moving ones, so the smoothness terms "
                            "compare different functions of the images.")
        self.fill_bank(run.read_train_subset(self.bank_indices))
        resolved = {"dictionary_size": int(len(self.bank_indices))}
        resolved.update(self.calibrate_lambdas(
            run.dataset("train", training=True, seed=run.seed + 7919),
            run.config.calibration_batches))
        logging.info("Resolved smoothness weights: %s", resolved)
        return resolved

    def restore(self, model, run: RunContext) -> None:
        """The bank's inputs are not in checkpoints: they are read again."""
        self.restore_bank_inputs(run.read_train_subset(self.bank_indices))

    def callbacks(self, model, run: RunContext) -> list:
        return [BankRefresh(self, self.refresh_every)]

    def scalars(self) -> dict[str, float]:
        values = {"lambda/lambda_y": float(self.lambda_y.numpy()),
                  "lambda/lambda_f": float(self.lambda_f.numpy())}
        return values

    # ---- serialisation -------------------------------------------------------------------------

    def get_config(self):
        return {
            **super().get_config(),
            "dictionary_size": self.dictionary_size, "k": self.k,
            "multiplier_y": self.multiplier_y, "multiplier_f": self.multiplier_f,
            "balance": self.balance, "asym_c": self.asym_c,
            "learn_label_graph": self.learn_label_graph, "clip_label_graph": self.clip_label_graph,
            "neighbour_mode": self.neighbour_mode, "feature_loss": self.feature_loss,
            "atom_gradient": self.atom_gradient, "refit_mode": self.refit_mode,
            "omp_jit_compile": self.omp_jit_compile,
            "bce_unknown_as_negative": self.bce_unknown_as_negative,
            "omp_score_threshold": self.omp_score_threshold,
            "omp_balance_scores": self.omp_balance_scores, "reconstruction": self.reconstruction,
            "class_label_weight": self.class_label_weight,
            "num_image_classes": self.num_image_classes,
            "label_state_refresh_every": self.label_state_refresh_every,
            "refresh_every": self.refresh_every,
            "label_graph_layout": {"num_entries": self.label_graph.get_config()["num_entries"],
                                   "structure": self.label_graph.structure},
        }


class BankRefresh(keras.callbacks.Callback):
    """Re-encodes the dictionary bank with the current network every `refresh_every` steps.

    Runs between steps, in the strategy's cross-replica context: the new features are assigned
    to every replica's copy of the bank, so all replicas select neighbours from the same bank.
    """

    def __init__(self, method: IMCL, refresh_every: int):
        super().__init__()
        self.method = method
        self.refresh_every = refresh_every
        self.refreshes = 0

    def on_train_batch_begin(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        if step > 0 and step % self.refresh_every == 0:
            self.method.refresh_bank()
            self.refreshes += 1


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"IMCLModel: {name} must be one of {choices}, received {name}={value!r}.")


def _with_bias(features):
    """Appends the constant 1 coordinate (the official features are pool5 + 1)."""
    ones = tf.ones_like(features[..., :1])
    return tf.concat([features, ones], axis=-1)


METHOD = IMCL

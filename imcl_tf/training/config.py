"""TrainConfig: every training option (each also a flag of `imcl-train`), validated.

Defining the options imports no TensorFlow (the choices come from `imcl_tf.choices`), so
`imcl-train --help` is fast; `validate` imports what reads datasets and runs.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import TYPE_CHECKING

from imcl_tf import choices as option_choices
from imcl_tf import image_header  # no TensorFlow at import time
from imcl_tf.methods import registry as method_registry
from imcl_tf.training.errors import bad_flag
from imcl_tf.training.run_files import CHECKPOINT_DIR, LOGISTIC_STAGE_DIR, RUN_CONFIG, read_json

if TYPE_CHECKING:
    from imcl_tf import data as data_lib

# The export's folder-name rule (imcl_tf.export._MODEL_NAME, not imported: it loads TensorFlow),
# checked before training rather than when the export starts.
_EXPORT_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def _field(default, help_text, choices=None):
    metadata = {"help": help_text}
    if choices:
        metadata["choices"] = list(choices)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class TrainConfig:
    """Every training option; each is also a flag of `imcl-train`."""
    data_dir: str = _field("", "Dataset folder written by tfrecords_tools (has dataset.json).")
    model_dir: str = _field("", "Run folder: checkpoints, TensorBoard logs, best/latest models.")
    method: str = _field("imcl", "The training method (imcl_tf.methods; its own options are the "
                                 "flags that start with its name): "
                         + "; ".join(f"{name}: {method_registry.entry(name).summary}"
                                     for name in option_choices.METHODS),
                         option_choices.METHODS)
    backbone: str = _field("small_cnn", "Feature extractor (features: a linear adapter over the "
                                        "dataset's precomputed embeddings).",
                          option_choices.BACKBONES)
    backbone_weights: str = _field("none", "none, imagenet, or a Keras weights file.")
    image_size: int = _field(0, "Square input size; 0 takes dataset.json's image_size hint.")
    batch_size: int = _field(32, "Global batch size (split across replicas).")
    train_steps: int = _field(0, "Optimizer steps; 0 means use --epochs.")
    epochs: float = _field(1.0, "Passes over the training split when --train_steps=0.")
    eval_every: int = _field(0, "Validate, log and keep the best model every this many steps "
                                "(0: ten evaluations per run).")
    checkpoint_every: int = _field(100, "Write a resumable checkpoint every this many steps (and "
                                        "at every evaluation).")
    log_every: int = _field(10, "Write training scalars to TensorBoard every this many steps.")
    learning_rate: float = _field(1e-3, "Base learning rate.")
    optimizer: str = _field("adam", "Optimizer; rmsprop is the paper's RMSProp(rho 0.9, momentum "
                                    "0.9, epsilon 1.0).", option_choices.OPTIMIZERS)
    lr_schedule: str = _field("constant", "constant, or plateau: the paper's EMA plateau rule "
                                          "(x0.8 when the EMA of validation mAP drops).",
                              option_choices.LR_SCHEDULES)
    plateau_alpha: float = _field(0.3, "EMA weight of the plateau rule.")
    plateau_patience: int = _field(2, "Evaluations to wait after a decay.")
    plateau_min_lr: float = _field(0.0, "The plateau rule decays only while the learning rate is "
                                        ">= this floor (0: 1e-3 x --learning_rate, the official "
                                        "floor).")
    plateau_start_step: int = _field(0, "No plateau decay before this step (validation mAP "
                                        "fluctuates early, docs/method.md §4).")
    k: int = _field(3, "Neighbours per image (OMP sparsity).")
    lambda_y: float = _field(1.0, "Label-side smoothness multiplier (scaled by --balance).")
    lambda_f: float = _field(0.5, "Feature-side smoothness multiplier (scaled by --balance).")
    balance: str = _field("loss_ratio", "loss_ratio: lambda = multiplier * L_c / L_term on "
                                        "calibration batches; none: lambda = multiplier.",
                          option_choices.BALANCE_MODES)
    calibration_batches: int = _field(10, "Batches averaged by --balance=loss_ratio.")
    feature_loss: bool = _field(True, "Add lambda_f * L_f to the loss (it always guides the OMP).")
    atom_gradient: bool = _field(True, "The smoothness residuals also train the neighbours' label "
                                       "states, as the official code does (false: neighbours are "
                                       "fixed teachers of the query).")
    dictionary_size: int = _field(0, "Cap on the bank size (0: no cap).")
    dictionary_per_class: int = _field(10, "Bank images per class with a known positive "
                                           "(0: the whole training split).")
    refresh_every: int = _field(100, "Re-encode the bank's features every this many steps.")
    label_state_refresh_every: int = _field(1, "Recompute the bank atoms' label states that the "
                                               "OMP selects with (classifier + graph over all "
                                               "atoms) every this many steps; 1 is exact.")
    omp_jit_compile: bool = _field(True, "Run the OMP, and the elementwise work of the "
                                         "bank atoms' label states, XLA-compiled inside the "
                                         "step (false: plain TensorFlow ops, where XLA is "
                                         "unavailable).")
    neighbour_mode: str = _field("cached", "cached: neighbour features from the bank; forward: "
                                           "neighbours re-run through the backbone.",
                                 option_choices.NEIGHBOUR_MODES)
    refit_mode: str = _field("reuse_support_refit", "Forward mode's coefficients: "
                                                    "reuse_support_refit re-solves them by NNLS "
                                                    "on the OMP's support with the fresh "
                                                    "neighbour features; reuse_all keeps the "
                                                    "OMP's (from the cached bank).",
                             option_choices.REFIT_MODES)
    label_graph: str = _field("identity", "identity, cooccurrence (known training positives), or "
                                          "a .npy file of shape [L, L].")
    label_graph_top_k: int = _field(0, "Co-occurrence graph: keep the top k related labels per "
                                       "class (0: all).")
    learn_label_graph: bool = _field(True, "Train the graph's non-zero entries.")
    clip_label_graph: bool = _field(True, "Clip the graph to [0, 1] after every step.")
    asym_c: float = _field(2.0, "Asymmetry c >= 1 of the label-state function sigma_c.")
    head_weight_decay: float = _field(0.0, "L2 factor on the classifier kernel (CUB: 1e-4).")
    freeze_batchnorm: bool = _field(True, "BatchNorm layers in inference mode (moving statistics "
                                          "and affine frozen) whenever the run starts from "
                                          "trained weights (--warm_start or --backbone_weights), "
                                          "as the official runs fine-tune; a network trained "
                                          "from scratch always trains its BatchNorm.")
    # ---- the paper's recipes: learning rate per part ----
    backbone_learning_rate: float = _field(-1.0, "Base learning rate of the backbone (negative: "
                                                 "--learning_rate; 0: frozen, no gradient).")
    head_learning_rate: float = _field(-1.0, "Base learning rate of the classifier head "
                                             "(negative: --learning_rate).")
    graph_learning_rate: float = _field(-1.0, "Base learning rate of the label graph, on its own "
                                              "--graph_optimizer (negative: --learning_rate; 0: "
                                              "the graph stays fixed).")
    graph_optimizer: str = _field("rmsprop", "The label graph's own optimizer; rmsprop (the "
                                             "official) moves the graph in proportion to its "
                                             "gradient, so lambda_y scales its step.", option_choices.OPTIMIZERS)
    # ---- the paper's recipes: the official loss and OMP options ----
    bce_unknown_as_negative: bool = _field(False, "The cross-entropy counts unknown entries as "
                                                  "negatives (mean over all entries) while the "
                                                  "smoothness loss keeps them unknown (official "
                                                  "MS-COCO caption words); the co-occurrence "
                                                  "graph then counts them as absent too.")
    omp_score_threshold: float = _field(0.0, "OMP score threshold tau: a neighbour is taken only "
                                             "if its score (weights renormalised to max 1) is >= "
                                             "tau (official: CUB 1e-6, COCO 1e-20, Open Images "
                                             "1e-3; 0: off).")
    omp_balance_scores: bool = _field(False, "Official is_balance: each side's OMP scores are "
                                             "divided by their maximum before mixing (Open "
                                             "Images end-to-end).")
    reconstruction: str = _field("linear", "Label-side residual y - sum c y~ (linear, the "
                                           "official code) or y - tanh(sum c y~) (the paper's "
                                           "Eq. 3).", option_choices.RECONSTRUCTIONS)
    # ---- the paper's recipes: the CUB class-label augmentation ----
    class_label_weight: float = _field(0.0, "CUB's class-label weight a (official weight_class "
                                            "= 10): the image-class one-hot (image/class, e.g. "
                                            "the CUB species) is appended to the IMCL label "
                                            "states only, a at the class and -1/c elsewhere, "
                                            "always known; 0: off.")
    augment: bool = _field(False, "Random resized crop and flip of training images.")
    warm_start: str = _field("", "A logistic run's model_dir to start from, 'auto' to train that "
                                 "baseline first (into <model_dir>/logistic_stage), or empty.")
    warm_start_steps: int = _field(0, "Steps of the automatic logistic stage (0: --train_steps).")
    val_split: str = _field("val", "Split used for validation mAP and the best model (empty: no "
                                   "validation, the last model is kept as best).")
    strategy: str = _field("default", "tf.distribute strategy: default (one device), mirrored "
                                      "(all local GPUs, else all logical CPUs), multi_worker "
                                      "(TF_CONFIG).", option_choices.STRATEGIES)
    mixed_precision: bool = _field(False, "mixed_float16 compute; OMP and losses stay float32.")
    seed: int = _field(0, "Seed of initialisation, data order and bank choice.")
    deterministic: bool = _field(False, "The same --seed gives the same run, bit for bit: "
                                        "deterministic TensorFlow ops and tf.data element order "
                                        "(slower input pipeline; stays on for the process).")
    export_dir: str = _field("", "Export base for TensorFlow Serving (<export_dir>/<model_name>/"
                                 "<version>); empty: no export.")
    export_model_name: str = _field("imcl", "Model name inside --export_dir.")
    export_diverged: bool = _field(False, "Export even when the training diverged (a loss not "
                                          "finite or over 1000 x its first value stops the run; "
                                          "it is then not exported and ends with status 1).")
    pr_classes: str = _field("", "Classes with a PR curve in TensorBoard: comma-separated class "
                                 "names or indices (empty: the 5 most and the 5 least frequent "
                                 "in training).")
    control_model_dir: str = _field("", "A finished run to compare with in TensorBoard (a fair "
                                        "control: e.g. --method=logistic trained with the same "
                                        "steps): per-class AP differences and the "
                                        "frequency-group chart.")
    verify_data: bool = _field(True, "Check dataset.json against its shards (and every image's "
                                     "header) before training.")
    max_image_pixels: int = _field(image_header.DEFAULT_MAX_IMAGE_PIXELS,
                                   "Refuse images with more pixels (read from the header before "
                                   "decoding) in verification and the input pipeline.")
    # Not a flag itself: the values of the flags the methods declare (imcl_tf.methods.registry),
    # by flag name, e.g. {"lsep_max_pairs": 100}; an option not given takes its default.
    method_options: dict = dataclasses.field(default_factory=dict,
                                             metadata={"help": "", "not_a_flag": True})
    verbose: int = _field(1, "Progress: 0 only log lines, 1 one line per evaluation interval "
                             "and a live bar on a terminal, 2 one line per interval.")

    def _validate_method_options(self) -> None:
        """Every method option given belongs to --method and has its declared type/choices."""
        if self.method not in method_registry.names():
            return  # reported by the choices check
        own = {option.name: option for option in method_registry.options(self.method)}
        everyone = {option.name: option for option in method_registry.all_options()}
        for name, value in (self.method_options or {}).items():
            if name not in everyone:
                bad_flag(name, f"is not an option of any method (method options: "
                               f"{', '.join(everyone) or 'none'}).")
            if name not in own:
                bad_flag(name, f"is an option of --method={everyone[name].method}, not of "
                               f"--method={self.method}.")
            option = own[name]
            if option.choices and value not in option.choices:
                bad_flag(name, f"must be one of {', '.join(option.choices)}; received {value!r}.")
            default = option.default
            kind = (bool if isinstance(default, bool) else
                    (int, float) if isinstance(default, float) else type(default))
            if isinstance(default, (int, float)) and not isinstance(default, bool) \
                    and isinstance(value, bool):
                kind = ()
            if not isinstance(value, kind):
                bad_flag(name, f"must be a {type(default).__name__}, received {value!r}.")
        for option in own.values():
            if option.required and not (self.method_options or {}).get(option.name):
                bad_flag(option.name, f"is required with --method={self.method}: "
                                      f"{option.help}")

    def validate_options(self) -> None:
        """Checks the options on their own (no file is read); raises ValueError naming the flag."""
        for field in dataclasses.fields(self):
            choices = field.metadata.get("choices")
            value = getattr(self, field.name)
            if choices and value not in choices:
                bad_flag(field.name, f"must be one of {', '.join(choices)}; received {value!r}.")
        if not self.data_dir:
            bad_flag("data_dir", "is required (a dataset folder written by tfrecords_tools).")
        if not self.model_dir:
            bad_flag("model_dir", "is required (where checkpoints, logs and models go).")
        if not 1 <= self.k <= option_choices.OMP_MAX_K:
            bad_flag("k", f"must be in [1, {option_choices.OMP_MAX_K}] (the OMP solves its "
                          f"coefficients exactly over all 2^k sub-supports), received {self.k}.")
        if self.dictionary_size and self.k > self.dictionary_size:
            bad_flag("k", f"must be at most --dictionary_size={self.dictionary_size}, received "
                          f"{self.k}.")
        if self.batch_size < 1:
            bad_flag("batch_size", f"must be >= 1, received {self.batch_size}.")
        if self.train_steps < 0:
            bad_flag("train_steps", f"must be >= 0, received {self.train_steps}.")
        if self.train_steps == 0 and not self.epochs > 0:
            bad_flag("epochs", f"must be > 0 when --train_steps=0, received {self.epochs}.")
        for name in ("eval_every", "image_size", "dictionary_size", "dictionary_per_class",
                     "warm_start_steps", "label_graph_top_k", "plateau_patience",
                     "plateau_start_step"):
            if getattr(self, name) < 0:
                bad_flag(name, f"must be >= 0, received {getattr(self, name)}.")
        for name in ("checkpoint_every", "log_every", "refresh_every", "calibration_batches",
                     "label_state_refresh_every"):
            if getattr(self, name) < 1:
                bad_flag(name, f"must be >= 1, received {getattr(self, name)}.")
        if not self.learning_rate > 0:
            bad_flag("learning_rate", f"must be > 0, received {self.learning_rate}.")
        if self.head_learning_rate == 0 or self.head_learning_rate != self.head_learning_rate:
            bad_flag("head_learning_rate", f"must be > 0 (or negative for --learning_rate), "
                                           f"received {self.head_learning_rate}.")
        for name in ("backbone_learning_rate", "graph_learning_rate"):
            if getattr(self, name) != getattr(self, name):  # NaN
                bad_flag(name, "must be a number (negative: --learning_rate, 0: frozen).")
        if self.plateau_min_lr < 0:
            bad_flag("plateau_min_lr", f"must be >= 0, received {self.plateau_min_lr}.")
        for name in ("lambda_y", "lambda_f"):
            if not getattr(self, name) >= 0:
                bad_flag(name, f"multipliers must be >= 0, received {getattr(self, name)}.")
        if not self.omp_score_threshold >= 0 or self.omp_score_threshold == float("inf"):
            bad_flag("omp_score_threshold", f"must be a finite number >= 0, received "
                                            f"{self.omp_score_threshold}.")
        if not 0 <= self.class_label_weight < float("inf"):
            bad_flag("class_label_weight", f"must be a finite number >= 0, received "
                                           f"{self.class_label_weight}.")
        if not self.asym_c >= 1:
            bad_flag("asym_c", f"must be >= 1, received {self.asym_c}.")
        if self.head_weight_decay < 0:
            bad_flag("head_weight_decay", f"must be >= 0, received {self.head_weight_decay}.")
        if not 0 < self.plateau_alpha <= 1:
            bad_flag("plateau_alpha", f"must be in (0, 1], received {self.plateau_alpha}.")
        if isinstance(self.max_image_pixels, bool) or not isinstance(
                self.max_image_pixels, int) or self.max_image_pixels < 1:
            bad_flag("max_image_pixels", f"must be a positive integer, received "
                                         f"{self.max_image_pixels!r}.")
        if self.verbose not in (0, 1, 2):
            bad_flag("verbose", f"must be 0, 1 or 2, received {self.verbose}.")
        if (self.label_graph not in option_choices.GRAPH_KINDS
                and not self.label_graph.endswith(".npy")):
            bad_flag("label_graph", f"must be identity, cooccurrence or a .npy file, received "
                                    f"{self.label_graph!r}.")
        if self.backbone_weights == "imagenet" and self.backbone in ("small_cnn", "features"):
            bad_flag("backbone_weights", f"--backbone={self.backbone} has no imagenet weights; use "
                                         "none or a weights file.")
        if self.warm_start == "auto" and self.method == "logistic":
            bad_flag("warm_start", "'auto' trains a logistic baseline first, to start another "
                                   "method from; it needs a --method other than logistic.")
        self._validate_method_options()
        if self.export_dir and not self.export_model_name:
            bad_flag("export_model_name", "is required with --export_dir.")
        if self.export_dir and not _EXPORT_MODEL_NAME.match(self.export_model_name):
            # Checked here, not after hours of training when the export starts.
            bad_flag("export_model_name", f"must be a folder name of letters, digits, '_', '.', "
                                          f"'-' (starting with a letter or digit); received "
                                          f"{self.export_model_name!r}.")

    def validate(self) -> None:
        """Checks the options against the dataset, the warm start and an existing run folder.

        Raises ValueError naming the first bad flag, the value received and what to do.
        """
        import numpy as np

        from imcl_tf import data as data_lib
        from imcl_tf.training.distribution import cluster_size

        self.validate_options()
        if not os.path.exists(os.path.join(self.data_dir, data_lib.DATASET_JSON)):
            bad_flag("data_dir", f"{self.data_dir!r} has no {data_lib.DATASET_JSON}; build the "
                                 "dataset with imcl-data <tool> first.")
        info = data_lib.load_dataset_info(self.data_dir)
        if "train" not in info.splits:
            bad_flag("data_dir", "the dataset has no 'train' split (it has "
                                 f"{sorted(info.splits)}).")
        if info.split("train").num_examples < 1:
            bad_flag("data_dir", f"the train split of {self.data_dir!r} is empty.")
        if self.val_split and self.val_split not in info.splits:
            bad_flag("val_split", f"{self.val_split!r} is not a split of {self.data_dir!r} (it has "
                                  f"{sorted(info.splits)}); pick one of those, or --val_split= to "
                                  "train without validation.")
        if self.val_split and info.split(self.val_split).num_examples < 1:
            bad_flag("val_split", f"the {self.val_split!r} split of {self.data_dir!r} is empty: "
                                  "validation needs images. Rebuild the split, or pass "
                                  "--val_split= to train without validation.")
        if (self.backbone == "features") != (info.mode == "features"):
            bad_flag("backbone", f"{self.backbone!r} does not fit a dataset of mode "
                                 f"{info.mode!r}: use --backbone=features exactly for "
                                 "features-mode datasets.")
        if info.mode == "image" and not (self.image_size or info.image_size):
            bad_flag("image_size", "is 0 and dataset.json has no image_size hint; set "
                                   "--image_size.")
        if self.class_label_weight > 0 and self.method == "imcl" and not image_class_count(info):
            bad_flag("class_label_weight", f"needs image classes, but {self.data_dir!r} has no "
                                           "labels.image_class_names in dataset.json (build it "
                                           "with tfrecords_tools.cub, whose records carry "
                                           "image/class), or set --class_label_weight=0.")
        if self.augment and info.mode != "image":
            bad_flag("augment", "applies to images; this is a features-mode dataset.")
        if self.backbone_weights not in ("none", "imagenet") and not os.path.exists(
                self.backbone_weights):
            bad_flag("backbone_weights", f"{self.backbone_weights!r} is neither none, imagenet "
                                         "nor an existing weights file.")
        if self.label_graph.endswith(".npy"):
            if not os.path.exists(self.label_graph):
                bad_flag("label_graph", f"{self.label_graph!r}: no such file.")
            shape = np.load(self.label_graph, mmap_mode="r").shape
            if shape != (info.num_classes, info.num_classes):
                bad_flag("label_graph", f"{self.label_graph!r} has shape {shape}, the dataset has "
                                        f"{info.num_classes} classes: it must be "
                                        f"[{info.num_classes}, {info.num_classes}].")
        if self.warm_start not in ("", "auto"):
            self._validate_warm_start(info)
        if self.pr_classes:
            from imcl_tf.training.class_choice import parse_class_list

            try:
                parse_class_list(self.pr_classes, info.class_names)
            except ValueError as error:
                bad_flag("pr_classes", f"{error} Give class names or indices of {self.data_dir!r}"
                                       ", separated by commas.")
        if self.control_model_dir:
            self._validate_control(info)
        if self.strategy == "multi_worker":
            workers = cluster_size()
            shards = len(info.split("train").shards)
            if shards < workers:
                bad_flag("strategy", f"multi_worker with {workers} workers needs at least "
                                     f"{workers} train shards; {self.data_dir!r} has {shards}. "
                                     f"Rebuild the dataset with --num_shards >= {workers}.")
        self._validate_resume()

    def _validate_warm_start(self, info: data_lib.DatasetInfo) -> None:
        from imcl_tf import models

        if not os.path.exists(os.path.join(self.warm_start, models.MODEL_CONFIG_JSON)):
            bad_flag("warm_start", f"{self.warm_start!r} is not the model_dir of a finished run "
                                   f"(no {models.MODEL_CONFIG_JSON}).")
        source = models.read_model_info(self.warm_start)
        names = list(source.get("class_names", []))
        if len(names) != info.num_classes:
            bad_flag("warm_start", f"the run in {self.warm_start!r} has {len(names)} classes but "
                                   f"the dataset has {info.num_classes}; warm-start from a run "
                                   "trained on the same classes.")
        if names != list(info.class_names):
            bad_flag("warm_start", f"the run in {self.warm_start!r} has other class names (or "
                                   f"order) than {self.data_dir!r}, e.g. {names[:3]} against "
                                   f"{list(info.class_names)[:3]}.")
        if source.get("backbone") != self.backbone:
            bad_flag("warm_start", f"the run in {self.warm_start!r} used backbone "
                                   f"{source.get('backbone')!r}, this one {self.backbone!r}.")

    def _validate_control(self, info: data_lib.DatasetInfo) -> None:
        from imcl_tf import models

        if not self.val_split:
            bad_flag("control_model_dir", "compares validation APs; it needs --val_split.")
        if not os.path.exists(os.path.join(self.control_model_dir, models.MODEL_CONFIG_JSON)):
            bad_flag("control_model_dir", f"{self.control_model_dir!r} is not the model_dir of a "
                                          f"finished run (no {models.MODEL_CONFIG_JSON}).")
        control = models.read_model_info(self.control_model_dir)
        if list(control.get("class_names", [])) != list(info.class_names):
            bad_flag("control_model_dir", f"the run in {self.control_model_dir!r} has other "
                                          f"classes (or another order) than {self.data_dir!r}; "
                                          "compare with a run trained on the same dataset.")
        if control.get("input_mode", "image") != info.mode:
            bad_flag("control_model_dir", f"the run in {self.control_model_dir!r} takes "
                                          f"{control.get('input_mode')!r} inputs, the dataset is "
                                          f"of mode {info.mode!r}.")

    def _validate_resume(self) -> None:
        """A model_dir with a checkpoint must be resumed with the settings it was written with."""
        previous = read_json(os.path.join(self.model_dir, RUN_CONFIG))
        has_checkpoint = os.path.exists(os.path.join(self.model_dir, CHECKPOINT_DIR, "checkpoint"))
        if not previous or not has_checkpoint:
            return
        before = dict(previous.get("config", {}))
        now = dataclasses.asdict(self)
        if now["warm_start"] == "auto":  # the stage-2 run records where the baseline went
            now["warm_start"] = os.path.join(self.model_dir, LOGISTIC_STAGE_DIR)
        before_dir = before.get("model_dir", self.model_dir)
        changed = [name for name in now if name not in RESUMABLE_CHANGES and name in before
                   and before[name] != now[name]
                   and not (name in PATH_OPTIONS and _same_path(before[name], now[name],
                                                                before_dir, self.model_dir))]
        if changed:
            details = ", ".join(f"--{name}={before[name]!r} (now {now[name]!r})"
                                for name in changed)
            bad_flag(changed[0], f"{self.model_dir!r} holds a run checkpointed with {details}; it "
                                 "can only be resumed with the same settings. Use a new "
                                 "--model_dir (or delete this one) to train with other settings.")


def image_class_count(info: data_lib.DatasetInfo) -> int:
    """C, the number of image classes (labels.image_class_names) of a dataset, 0 if none.

    A dataset made by tfrecords_tools.partial keeps its source's labels under source_labels.
    """
    labels = info.labels
    while isinstance(labels, dict):
        if labels.get("image_class_names"):
            return len(labels["image_class_names"])
        labels = labels.get("source_labels")
    return 0


# Options that name files: a resumed run may name them by another path (the run folder was moved
# or copied, a relative path became absolute) as long as it is the same file.
PATH_OPTIONS = frozenset({"model_dir", "warm_start", "label_graph", "backbone_weights"})


def _same_path(before: str, now: str, before_model_dir: str, model_dir: str) -> bool:
    """Whether two spellings of a path option name the same thing.

    The same file (os.path.samefile), or the same place relative to the run folder (a moved or
    copied folder: its model_dir, and the logistic stage inside it). The run folder itself is
    always the same: its run_config.json is the one being read.
    """
    if before == model_dir or os.path.realpath(before) == os.path.realpath(before_model_dir):
        return os.path.realpath(now) == os.path.realpath(model_dir)
    try:
        if os.path.samefile(before, now):
            return True
    except OSError:
        pass  # one of them does not exist (here): compare them inside the run folder
    inside = os.path.relpath(os.path.realpath(before), os.path.realpath(before_model_dir))
    return not inside.startswith("..") and os.path.realpath(
        os.path.join(model_dir, inside)) == os.path.realpath(now)


# Options that may change when a checkpointed run is resumed: how long and how it is watched,
# where the data and exports are, and how it is distributed (checkpoints are strategy-agnostic).
RESUMABLE_CHANGES = frozenset({
    "data_dir", "train_steps", "epochs", "eval_every", "checkpoint_every", "log_every",
    "warm_start_steps", "strategy", "export_dir", "export_model_name", "verify_data", "verbose",
    "pr_classes", "control_model_dir", "max_image_pixels", "export_diverged",
    "deterministic",
})

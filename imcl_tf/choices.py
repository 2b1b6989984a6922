"""The names an option may take (backbones, methods, modes, optimizers, strategies, graphs).

One place for them, free of TensorFlow, so that flag definitions and `--help` need no TensorFlow
import; the modules that implement each option re-export its names (e.g. `models.BACKBONES`).
"""

from imcl_tf.methods import registry as _registry

BACKBONES = ("small_cnn", "mobilenet_v2", "resnet50", "resnet101", "features")
# The registered training methods (imcl_tf.methods.registry, no TensorFlow either).
METHODS = _registry.names()
NEIGHBOUR_MODES = ("cached", "forward")
# How forward mode gets the coefficients of the re-encoded neighbours (docs/method.md).
REFIT_MODES = ("reuse_support_refit", "reuse_all")
BALANCE_MODES = ("loss_ratio", "none")
# How a neighbour reconstruction is formed: linear (official code) or the outer tanh of Eq. 3.
RECONSTRUCTIONS = ("linear", "tanh")
GRAPH_KINDS = ("identity", "cooccurrence")
OPTIMIZERS = ("adam", "adamw", "rmsprop", "sgd")
LR_SCHEDULES = ("constant", "plateau")
STRATEGIES = ("default", "mirrored", "multi_worker")
# The largest OMP sparsity k: exact NNLS enumerates all 2^k sub-supports per query (imcl_tf.omp).
OMP_MAX_K = 8

"""The training methods of imcl_tf, one module each; `registry` names them.

  registry   the methods' names, modules and options (no TensorFlow)
  base       the Method interface the model and the training application use
  logistic   masked BCE on the known labels (the baseline)
  imcl       IMCL: BCE plus the OMP smoothness loss over a dictionary bank
  fast0tag   Fast0Tag: fixed label word vectors ranked along a learned per-image direction
  cnn_rnn    CNN-RNN: an LSTM decoder of label sequences conditioned on the image
  lsep       LSEP: log-sum-exp pairwise ranking of known positives above known negatives
  wsabie     WSABIE: the WARP rank-weighted hinge ranking loss
  ranking    what the ranking methods share (known positive and negative sets)
  curriculum   Curriculum Labeling: partial-BCE and score-threshold relabelling in stages
  latent_noise Latent Noise: visual presence through an image-conditional reporting noise

    from imcl_tf import methods
    methods.get("lsep")        # the Method class (imports TensorFlow)
    methods.names()            # every registered name
"""

from imcl_tf.methods.registry import get, names, options

__all__ = ["get", "names", "options"]

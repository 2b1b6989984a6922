"""imcl_tf: multi-label image classification from partial labels with IMCL on TensorFlow/Keras."""

__version__ = "0.1.0"

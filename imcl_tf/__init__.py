"""imcl_tf: multi-label image classification from partial labels with IMCL on TensorFlow/Keras.

Importing the package imports no TensorFlow (the console commands answer --help at once); the
modules do: `imcl_tf.models`, `imcl_tf.data`, `imcl_tf.training`, ... See docs/architecture.md.
"""

__version__ = "0.1.0"


def load_model(path: str, checkpoint: str = "best"):
    """A trained Keras model: the best (or latest) model of a run folder, or a `.keras` file.

    Plain `keras.saving.load_model("run/best.keras")` works too once `imcl_tf.models` is imported
    (that registers the package's Keras classes); this function imports it for you.
    """
    import os

    import keras

    from imcl_tf import models

    if os.path.isdir(path):
        return models.load_model_dir(path, checkpoint)[0]
    return keras.saving.load_model(path, compile=False)

"""The `imcl-serve` and `imcl-client` console commands: the server and client mains, with
TensorFlow's start-up lines filtered (`imcl_tf.console`). `python -m serving.server` and
`python -m serving.client` run the same mains without the filter."""

from __future__ import annotations

import sys


def _quietly_imported(module: str):
    from imcl_tf import console

    console.quiet_tensorflow()
    console.import_tensorflow_quietly()
    import importlib

    return importlib.import_module(module)


def serve() -> None:
    """The `imcl-serve` command (serving.server)."""
    sys.exit(_quietly_imported("serving.server").main())


def client() -> None:
    """The `imcl-client` command (serving.client)."""
    sys.exit(_quietly_imported("serving.client").main())

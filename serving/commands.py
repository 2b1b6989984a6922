"""The `imcl-serve` and `imcl-client` console commands: the server and client mains, with
TensorFlow's start-up lines filtered (`imcl_tf.console`). `python -m serving.server` and
`python -m serving.client` run the same mains without the filter. The arguments are checked first
with TensorFlow-free parsers (`serving.arguments`), so `--help` and a usage mistake answer at once.
"""

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
    from serving import arguments

    arguments.server_parser().parse_args(sys.argv[1:])  # --help, usage mistakes: exit here
    sys.exit(_quietly_imported("serving.server").main())


def client() -> None:
    """The `imcl-client` command (serving.client)."""
    from serving import arguments

    arguments.client_parser().parse_args(sys.argv[1:])  # --help, usage mistakes: exit here
    sys.exit(_quietly_imported("serving.client").main())

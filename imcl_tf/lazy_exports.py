"""Names of a package imported from their modules on first use (PEP 562).

A package whose modules import TensorFlow can still be imported cheaply (flags, `--help`):

    __getattr__, __dir__ = lazy_exports.attach(globals(), {"run": "imcl_tf.training.trainer"})
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def attach(namespace: dict[str, Any], module_of: dict[str, str]
           ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` that load `module_of[name]` on first use."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> Any:
        if name in module_of:
            value = getattr(importlib.import_module(module_of[name]), name)
            namespace[name] = value  # later lookups are plain attribute reads
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(list(namespace) + list(module_of))

    return __getattr__, __dir__

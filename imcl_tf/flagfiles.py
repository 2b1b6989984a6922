"""Flagfiles: the configs shipped in `imcl_tf/configs/` (named as `--flagfile=demo`) and expansion.

`--flagfile=NAME` takes, in this order: a file at that path; for a file included by another
flagfile, a file at that path next to the including file; a config shipped with the package
(`demo`, `demo.flags`, `cub`, ...). `expand_flagfiles` replaces each `--flagfile` by the flags the
file sets, remembering for each flag the file and line it came from, so a bad flag inside a
flagfile is reported as `FILE:LINE`.

This module imports neither TensorFlow nor the rest of the package: `--help` stays fast.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from absl import flags

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
SUFFIX = ".flags"


@dataclasses.dataclass(frozen=True)
class Argument:
    """One command-line argument after expansion and where it came from (None: the command line)."""
    text: str
    origin: str | None = None


def shipped_configs() -> list[str]:
    """The names of the configs shipped with the package (without .flags), sorted."""
    if not os.path.isdir(CONFIG_DIR):
        return []
    return sorted(name[:-len(SUFFIX)] for name in os.listdir(CONFIG_DIR) if name.endswith(SUFFIX))


def shipped_config_path(name: str) -> str | None:
    """The path of the shipped config `name` (`demo` or `demo.flags`), or None."""
    if os.sep in name or (os.altsep and os.altsep in name):
        return None
    file_name = name if name.endswith(SUFFIX) else name + SUFFIX
    path = os.path.join(CONFIG_DIR, file_name)
    return path if os.path.isfile(path) else None


def resolve_flagfile(path: str, stack: Sequence[str] = ()) -> str:
    """The absolute path `--flagfile=path` means (see the module docstring).

    Raises:
      flags.CantOpenFlagFileError: no such file, or a file that includes itself; the message
        names the include chain and the shipped configs.
    """
    path = os.path.expanduser(path.strip())
    candidates = []
    if stack and not os.path.isabs(path):
        candidates.append(os.path.join(os.path.dirname(stack[-1]), path))
    candidates.append(path)
    shipped = shipped_config_path(path)
    if shipped:
        candidates.append(shipped)
    found = next((c for c in candidates if os.path.isfile(c)), None)
    chain = " -> ".join(list(stack) + [os.path.abspath(found or path)])
    if found is None:
        where = f" (included by {' -> '.join(stack)})" if stack else ""
        raise flags.CantOpenFlagFileError(
            f"flagfile {os.path.abspath(path)!r} does not exist{where}; give a path or the name "
            f"of a shipped config: {', '.join(shipped_configs()) or 'none installed'}.")
    found = os.path.abspath(found)
    if found in stack:
        raise flags.CantOpenFlagFileError(f"flagfile includes itself: {chain}.")
    return found


def expand_flagfiles(argv: Sequence[str], _stack: tuple[str, ...] = ()) -> list[Argument]:
    """argv with every `--flagfile=PATH` replaced, in place, by the flags that file sets.

    Same syntax as absl's flagfiles (one flag per line; blank lines and lines starting with `#` or
    `//` are skipped) and the same order, so later flags still override earlier ones.
    """
    expanded: list[Argument] = []
    arguments = [a if isinstance(a, Argument) else Argument(a) for a in argv]
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        path = None
        if argument.text in ("--flagfile", "-flagfile"):
            if index + 1 >= len(arguments):
                raise flags.CantOpenFlagFileError("--flagfile needs a file name.")
            path = arguments[index + 1].text
            index += 1
        elif argument.text.startswith(("--flagfile=", "-flagfile=")):
            path = argument.text.split("=", 1)[1]
        index += 1
        if path is None:
            expanded.append(argument)
            continue
        if not path.strip():
            continue  # absl ignores an empty --flagfile= too
        path = resolve_flagfile(path, _stack)
        expanded.extend(expand_flagfiles(_flagfile_lines(path), _stack + (path,)))
    return expanded


def _flagfile_lines(path: str) -> list[Argument]:
    with open(path, encoding="utf-8") as f:
        lines = [(number, line.strip()) for number, line in enumerate(f, start=1)]
    return [Argument(line, f"{path}:{number}") for number, line in lines
            if line and not line.startswith(("#", "//"))]


def origin_of_flag(arguments: Sequence[Argument], name: str) -> str | None:
    """Where the last argument setting flag `name` (`--name`, `--name=`, `--noname`) came from."""
    for argument in reversed(arguments):
        text = argument.text.lstrip("-").split("=", 1)[0]
        if text in (name, "no" + name):
            return argument.origin
    return None

"""Where the demo's Fashion-MNIST files are: `--fashion_mnist_dir`, $IMCL_FASHION_MNIST_DIR, the
repository's `data/fashion-mnist`, or `./data/fashion-mnist` of the working directory.

A checkout of the repository carries the four files in `data/fashion-mnist`; a package installed
with `pip install .` does not (30 MB of data is no package data), so the user is told where to put
them. TensorFlow-free.
"""

from __future__ import annotations

import os

ENV_VAR = "IMCL_FASHION_MNIST_DIR"
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
SOURCE_URL = "https://github.com/zalandoresearch/fashion-mnist (folder data/fashion)"
# The repository's copy, when the package runs from a checkout (editable install or PYTHONPATH).
REPOSITORY_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "data", "fashion-mnist")


def candidate_dirs() -> list[str]:
    """The folders searched, in order (the environment variable first when it is set)."""
    candidates = [os.environ[ENV_VAR]] if os.environ.get(ENV_VAR) else []
    return candidates + [REPOSITORY_DIR, os.path.join(os.getcwd(), "data", "fashion-mnist")]


def has_files(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, name)) for name in FILES)


def default_dir() -> str:
    """The first candidate folder holding the four files, else the first candidate."""
    candidates = candidate_dirs()
    return next((d for d in candidates if has_files(d)), candidates[0])


def find_dir(explicit: str | None = None) -> str:
    """`explicit` if given (it must hold the files), else the first candidate that holds them.

    Raises:
      ValueError: the files are not there; the message names every folder searched.
    """
    if explicit:
        if not has_files(explicit):
            raise ValueError(missing_files_message(explicit))
        return explicit
    for directory in candidate_dirs():
        if has_files(directory):
            return directory
    searched = ", ".join(repr(d) for d in dict.fromkeys(candidate_dirs()))
    raise ValueError(f"the four Fashion-MNIST .gz files are in none of {searched}. Download them "
                     f"from {SOURCE_URL} into a folder and pass --fashion_mnist_dir=FOLDER or set "
                     f"{ENV_VAR}=FOLDER (a checkout of the repository has them in "
                     "data/fashion-mnist).")


def missing_files_message(directory: str) -> str:
    """What is missing, where it was looked for and what to do."""
    missing = [name for name in FILES if not os.path.isfile(os.path.join(directory, name))]
    return (f"the Fashion-MNIST files {', '.join(missing)} are not in {directory!r}. Download the "
            f"four .gz files from {SOURCE_URL} into a folder and pass --fashion_mnist_dir=FOLDER "
            f"or set {ENV_VAR}=FOLDER (a checkout of the repository has them in "
            "data/fashion-mnist).")

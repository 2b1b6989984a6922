"""Which classes TensorBoard shows one by one: `--pr_classes` lists, frequency extremes, top N.

Frequencies are the known positives of each class in the training split; ties go to the lower
class index, so the choice is the same on every run of a dataset.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Classes with a PR curve when --pr_classes is empty: this many most and least frequent ones.
DEFAULT_PR_EXTREMES = 5


def parse_class_list(spec: str, class_names: Sequence[str]) -> list[int]:
    """The class indices named by a comma-separated list of class names or indices, in order.

    A token that is a class name means that class (names win over numbers, so a class called
    "7" is found by name); otherwise it must be an integer in [0, L). Repeats count once.
    Raises ValueError naming the first unknown token.
    """
    index_of = {name: index for index, name in enumerate(class_names)}
    chosen: list[int] = []
    for token in (part.strip() for part in spec.split(",")):
        if not token:
            continue
        if token in index_of:
            index = index_of[token]
        elif token.lstrip("-").isdigit() and 0 <= int(token) < len(class_names):
            index = int(token)
        else:
            examples = ", ".join(repr(name) for name in list(class_names)[:3])
            raise ValueError(f"{token!r} is neither a class name (e.g. {examples}) nor a class "
                             f"index in [0, {len(class_names)}).")
        if index not in chosen:
            chosen.append(index)
    return chosen


def frequency_order(positive_counts) -> np.ndarray:
    """Class indices from the most to the least frequent (ties: lower index first)."""
    counts = np.asarray(positive_counts, np.int64)
    return np.lexsort((np.arange(counts.size), -counts))


def frequency_extremes(positive_counts, per_end: int = DEFAULT_PR_EXTREMES) -> list[int]:
    """The `per_end` most frequent classes, then the `per_end` least frequent (all if L <= 2n)."""
    order = frequency_order(positive_counts)
    if order.size <= 2 * per_end:
        return order.tolist()
    return order[:per_end].tolist() + order[-per_end:].tolist()


def most_frequent(positive_counts, limit: int) -> np.ndarray:
    """Every class when L <= limit, else the `limit` most frequent; in index order."""
    counts = np.asarray(positive_counts)
    if counts.size <= limit:
        return np.arange(counts.size)
    return np.sort(frequency_order(counts)[:limit])

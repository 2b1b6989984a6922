"""The pictures written to TensorBoard, drawn with matplotlib into uint8 RGBA arrays [H, W, 4]."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np

# Tick labels are printed on a heat map of at most this many labels (beyond, only the axes).
_HEATMAP_TICK_LABELS = 40
# Label names longer than this are cut in the image grid's captions.
_CAPTION_NAME_CHARS = 14
# Predicted / true labels listed per caption before "+n".
_CAPTION_LABELS = 3
# Captions are wrapped at this many characters (a grid cell is about 40 wide at font size 7).
_CAPTION_WIDTH = 30


def label_graph_heatmap(current: np.ndarray, initial: np.ndarray | None,
                        names: Sequence[str], note: str) -> np.ndarray:
    """The label graph G (and, when `initial` is given, G - G0) as heat maps side by side.

    Entry [l, j] is the weight of label l in the propagated state of label j (the code's
    row-vector convention: column j feeds label j), so rows are "from" and columns "to".
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("label graph G", current, "viridis", 0.0, max(float(current.max()), 1e-6))]
    if initial is not None:
        change = current - initial
        limit = max(float(np.abs(change).max()), 1e-6)
        panels.append(("change G - G0 since the start", change, "coolwarm", -limit, limit))
    size = len(names)
    figure = Figure(figsize=(5.2 * len(panels), 5.0))
    FigureCanvasAgg(figure)
    for place, (title, matrix, colormap, low, high) in enumerate(panels, start=1):
        axis = figure.add_subplot(1, len(panels), place)
        image = axis.imshow(matrix, cmap=colormap, vmin=low, vmax=high, interpolation="nearest")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("to label j (column)", fontsize=8)
        axis.set_ylabel("from label l (row)", fontsize=8)
        if size <= _HEATMAP_TICK_LABELS:
            axis.set_xticks(range(size))
            axis.set_xticklabels(names, rotation=90, fontsize=7)
            axis.set_yticks(range(size))
            axis.set_yticklabels(names, fontsize=7)
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    figure.suptitle(note, fontsize=9)
    figure.tight_layout()
    return _pixels(figure)


def prediction_grid(images: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                    class_names: Sequence[str], threshold: float = 0.5,
                    columns: int = 4) -> np.ndarray:
    """Validation images captioned with their known positives and the predicted labels.

    A label is predicted when its score >= threshold (the top label is shown in brackets when
    none is); the prediction line is green when it equals the known positives exactly (among the
    known entries), red otherwise.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count = images.shape[0]
    rows = -(-count // columns)
    figure = Figure(figsize=(2.4 * columns, 3.0 * rows))
    FigureCanvasAgg(figure)
    for index in range(count):
        axis = figure.add_subplot(rows, columns, index + 1)
        axis.imshow(np.clip(images[index], 0, 255).astype(np.uint8), interpolation="nearest")
        axis.set_xticks([])
        axis.set_yticks([])
        known = labels[index] != 0
        true = np.flatnonzero(labels[index] > 0)
        predicted = np.flatnonzero(scores[index] >= threshold)
        predicted = predicted[np.argsort(-scores[index][predicted], kind="stable")]
        correct = np.array_equal(np.sort(predicted[known[predicted]]), true)
        if predicted.size:
            shown = [f"{_short(class_names[c])} {scores[index][c]:.2f}" for c in predicted]
        else:
            top = int(np.argmax(scores[index]))
            shown = [f"(top {_short(class_names[top])} {scores[index][top]:.2f})"]
        axis.set_title(_caption("true", [_short(class_names[c]) for c in true]), fontsize=7)
        axis.set_xlabel(_caption("pred", shown), fontsize=7,
                        color="tab:green" if correct else "tab:red")
    figure.tight_layout()
    return _pixels(figure)


def _short(name: str) -> str:
    return name if len(name) <= _CAPTION_NAME_CHARS else name[:_CAPTION_NAME_CHARS - 1] + "~"


def _listing(items: list[str]) -> str:
    if not items:
        return "-"
    text = ", ".join(items[:_CAPTION_LABELS])
    return text + (f" +{len(items) - _CAPTION_LABELS}" if len(items) > _CAPTION_LABELS else "")


def _caption(title: str, items: list[str]) -> str:
    return textwrap.fill(f"{title}: {_listing(items)}", _CAPTION_WIDTH)


def _pixels(figure) -> np.ndarray:
    """[H, W, 4] uint8 RGBA of a drawn figure."""
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba(), dtype=np.uint8).copy()

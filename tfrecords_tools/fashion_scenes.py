"""The demo dataset: multi-label RGB scenes composed of Fashion-MNIST items, built offline.

Each 64x64 scene shows 1 to 4 tinted Fashion-MNIST items of distinct classes on a light plain or
textured background. Most scenes follow an outfit template (t-shirt + trouser + sneaker, dress +
sandal + bag, ...) with random additions and removals, so classes really co-occur and a
co-occurrence label graph has something to learn; the rest are random class sets. Labels are FULL
(every class known present or absent); tfrecords_tools.partial masks them afterwards.

Train and val scenes take items from disjoint index ranges of Fashion-MNIST's 60k training file,
test scenes from its 10k test file, so no item image is shared between splits. With
--reserve_pretrain_items the training scenes use only train[0:40000], leaving
train[40000:50000] (PRETRAIN_SOURCE) to no scene at all: the items a backbone can be pretrained
on (tfrecords_tools.fashion_pretrain) for the transfer regime.

Label spaces (--label_space):
  items                the 10 Fashion-MNIST classes (the demo).
  item_tint_position   80 labels "<item> <tint> <left|right>": the item class, one of 4 named
                       tints and the half of the scene holding the item's centre. Templates,
                       tints and random items are drawn with long-tailed (Zipf-like)
                       probabilities, and the items of a scene usually share the scene's colour
                       scheme, so label frequencies span two orders of magnitude and labels
                       co-occur through outfits and colour schemes (the paper's regime: many
                       classes, few known labels for most of them).

    imcl-data fashion_scenes --output_dir /tmp/fashion_scenes
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import os
import sys
from typing import Sequence

import numpy as np
from absl import flags
from PIL import Image

from imcl_tf import data, fashion_mnist_files
from tfrecords_tools import common
from tfrecords_tools.common import Progress

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
TSHIRT, TROUSER, PULLOVER, DRESS, COAT, SANDAL, SHIRT, SNEAKER, BAG, ANKLE_BOOT = range(10)

# Outfits: the source of the real class co-occurrence of the dataset.
OUTFIT_TEMPLATES = [
    (TSHIRT, TROUSER, SNEAKER),
    (DRESS, SANDAL, BAG),
    (COAT, TROUSER, ANKLE_BOOT),
    (SHIRT, TROUSER, SNEAKER),
    (PULLOVER, TROUSER, ANKLE_BOOT),
    (TSHIRT, BAG, SANDAL),
    (COAT, DRESS, ANKLE_BOOT),
]
TEMPLATE_PROBABILITY = 0.8  # the rest of the scenes draw 1-4 classes uniformly at random
ADD_PROBABILITY = 0.3  # a template scene gains one random extra item
REMOVE_PROBABILITY = 0.3  # a template scene loses one of its items
MAX_ITEMS = 4

LABEL_SPACES = ("items", "item_tint_position")
# item_tint_position: named tints (RGB before jitter and shading), their long-tailed
# probabilities, how often an item takes the scene's colour scheme, and the positions.
TINT_NAMES = ("red", "green", "blue", "purple")
TINT_RGB = ((200.0, 40.0, 40.0), (40.0, 150.0, 60.0), (40.0, 70.0, 210.0), (130.0, 40.0, 160.0))
TINT_WEIGHTS = (0.45, 0.3, 0.17, 0.08)
SCHEME_PROBABILITY = 0.7
TINT_JITTER = 15.0
POSITION_NAMES = ("left", "right")
# Zipf-like weights: template t is drawn with probability proportional to 1 / (t + 1); in the
# random scenes item class c with probability proportional to 1 / (c + 1) ** 0.8.
TEMPLATE_WEIGHTS = tuple(1.0 / (t + 1) for t in range(len(OUTFIT_TEMPLATES)))
ITEM_WEIGHTS = tuple(1.0 / (c + 1) ** 0.8 for c in range(len(CLASS_NAMES)))


@dataclasses.dataclass(frozen=True)
class SplitSource:
    """Where a split's items come from: a Fashion-MNIST file and a half-open index range."""
    file: str  # "train" or "t10k"
    start: int
    stop: int


# Disjoint item sources: no Fashion-MNIST image appears in two splits.
SPLIT_SOURCES = {
    "train": SplitSource("train", 0, 50_000),
    "val": SplitSource("train", 50_000, 60_000),
    "test": SplitSource("t10k", 0, 10_000),
}
SPLIT_ORDER = ("train", "val", "test")
# Items no scene uses when the training scenes are built with reserve_pretrain_items.
PRETRAIN_SOURCE = SplitSource("train", 40_000, 50_000)
RESERVED_TRAIN_SOURCE = SplitSource("train", 0, 40_000)


def split_sources(reserve_pretrain_items: bool = False) -> dict[str, SplitSource]:
    """The item source of every split; with reserve_pretrain_items, PRETRAIN_SOURCE is left out."""
    if not reserve_pretrain_items:
        return dict(SPLIT_SOURCES)
    return {**SPLIT_SOURCES, "train": RESERVED_TRAIN_SOURCE}


def label_names(label_space: str = "items") -> list[str]:
    """The class names of a label space (item_tint_position: item-major, then tint, position)."""
    _check_label_space(label_space)
    if label_space == "items":
        return list(CLASS_NAMES)
    return [f"{item} {tint} {position}" for item in CLASS_NAMES for tint in TINT_NAMES
            for position in POSITION_NAMES]


def label_index(item: int, tint: int, position: int) -> int:
    """The item_tint_position label of an item class, tint index and position index."""
    return (item * len(TINT_NAMES) + tint) * len(POSITION_NAMES) + position


def _check_label_space(label_space: str) -> None:
    if label_space not in LABEL_SPACES:
        raise ValueError(f"label_space must be one of {LABEL_SPACES}. Received: "
                         f"{label_space!r}.")

DEFAULT_FASHION_MNIST_DIR = fashion_mnist_files.default_dir()
SOURCE_DESCRIPTION = ("Fashion-MNIST (Xiao, Rasul & Vollgraf 2017), "
                      "github.com/zalandoresearch/fashion-mnist; MIT licence, Copyright 2017 "
                      "Zalando SE")

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines this tool's flags (in `flag_values`, so tests can use a fresh FlagValues)."""
    flags.DEFINE_string("output_dir", None, "Dataset folder to write (shards + dataset.json).",
                        flag_values=flag_values)
    flags.DEFINE_string("fashion_mnist_dir", DEFAULT_FASHION_MNIST_DIR,
                        "Folder with the four Fashion-MNIST .gz files (default: "
                        f"${fashion_mnist_files.ENV_VAR}, else the repository's "
                        "data/fashion-mnist, else ./data/fashion-mnist).",
                        flag_values=flag_values)
    flags.DEFINE_integer("image_size", 64, "Side of the square scenes in pixels.",
                         lower_bound=32, flag_values=flag_values)
    flags.DEFINE_integer("num_train", 6000, "Training scenes.", lower_bound=0,
                         flag_values=flag_values)
    flags.DEFINE_integer("num_val", 1000, "Validation scenes.", lower_bound=0,
                         flag_values=flag_values)
    flags.DEFINE_integer("num_test", 2000, "Test scenes.", lower_bound=0,
                         flag_values=flag_values)
    flags.DEFINE_integer("seed", 0, "Seed of the scene composition (recorded in dataset.json).",
                         flag_values=flag_values)
    flags.DEFINE_integer("num_shards", 4, "TFRecord shards per split (>= the training workers).",
                         lower_bound=1, flag_values=flag_values)
    flags.DEFINE_enum("label_space", "items", list(LABEL_SPACES),
                      "items: the 10 item classes (the demo); item_tint_position: 80 long-tailed "
                      "labels (item x tint x left/right half).", flag_values=flag_values)
    flags.DEFINE_boolean("reserve_pretrain_items", False,
                         "Training scenes use only train[0:40000], so train[40000:50000] is "
                         "left to backbone pretraining (tfrecords_tools.fashion_pretrain).",
                         flag_values=flag_values)
    flags.mark_flag_as_required("output_dir", flag_values=flag_values)


def build(output_dir: str,
          *,
          fashion_mnist_dir: str = DEFAULT_FASHION_MNIST_DIR,
          image_size: int = 64,
          num_examples: dict[str, int] | None = None,
          seed: int = 0,
          num_shards: int = 4,
          label_space: str = "items",
          reserve_pretrain_items: bool = False,
          progress_interval: float = 10.0,
          stream=None) -> data.DatasetInfo:
    """Composes the scenes of every split, writes the shards and dataset.json; returns the info.

    Args:
      output_dir: dataset folder to write.
      fashion_mnist_dir: folder with the Fashion-MNIST .gz files.
      image_size: side of the square scenes.
      num_examples: scenes per split, {"train": ..., "val": ..., "test": ...}; a split with 0
        scenes is not written. Defaults to 6000 / 1000 / 2000.
      seed: composition seed; each split draws from its own stream, so changing one split's size
        leaves the others unchanged.
      num_shards: shards per split.
      label_space: one of LABEL_SPACES (see the module docstring).
      reserve_pretrain_items: training scenes leave PRETRAIN_SOURCE unused.
    """
    stream = stream if stream is not None else sys.stderr
    num_examples = dict(num_examples or {"train": 6000, "val": 1000, "test": 2000})
    unknown = sorted(set(num_examples) - set(SPLIT_SOURCES))
    if unknown:
        raise ValueError(f"unknown splits {unknown}; the demo has {list(SPLIT_ORDER)}.")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 to fit the items. Received: {image_size}.")
    class_names = label_names(label_space)
    sources = split_sources(reserve_pretrain_items)
    fashion = {name: load_fashion_mnist(fashion_mnist_dir, name) for name in ("train", "t10k")}
    splits = {}
    for split in SPLIT_ORDER:
        count = num_examples.get(split, 0)
        if count <= 0:
            continue
        source = sources[split]
        images, labels = fashion[source.file]
        rng = np.random.default_rng([seed, SPLIT_ORDER.index(split)])
        progress = Progress(f"fashion_scenes {split}", total=count, interval=progress_interval,
                            stream=stream)
        with data.SplitWriter(output_dir, split, num_shards) as writer:
            for index, scene in enumerate(compose_scenes(images, labels, source, count, rng,
                                                         image_size, label_space)):
                positives = sorted(scene.labels)
                negatives = [c for c in range(len(class_names)) if c not in scene.labels]
                writer.write(data.make_example(f"{split}-{index:06d}", positives, negatives,
                                               len(class_names),
                                               encoded_image=encode_png(scene.image)))
                progress.update()
        progress.close()
        splits[split] = writer.split_info
    info = data.DatasetInfo(
        class_names=class_names,
        splits=splits,
        mode="image",
        image_size=image_size,
        labels={"source": "full labels of composed Fashion-MNIST scenes (every class known "
                          "present or absent)",
                "protocol": "full", "known_ratio": 1.0, "seed": seed},
        provenance={
            "converter": "tfrecords_tools.fashion_scenes",
            "date": data.utc_now(),
            "seed": seed,
            "flags": {"image_size": image_size, "seed": seed, "num_shards": num_shards,
                      "label_space": label_space,
                      "reserve_pretrain_items": reserve_pretrain_items,
                      **{f"num_{split}": num_examples.get(split, 0) for split in SPLIT_ORDER}},
            "source": SOURCE_DESCRIPTION,
            "item_sources": {split: dataclasses.asdict(sources[split]) for split in splits},
            **({"unused_item_source": dataclasses.asdict(PRETRAIN_SOURCE)}
               if reserve_pretrain_items else {}),
            "templates": [[CLASS_NAMES[c] for c in t] for t in OUTFIT_TEMPLATES],
            "template_probability": TEMPLATE_PROBABILITY,
        })
    data.replace_dataset_info(output_dir, info)
    print(f"fashion_scenes: wrote {', '.join(f'{s} {i.num_examples}' for s, i in splits.items())}"
          f" scenes to {output_dir}", file=stream)
    return info


@dataclasses.dataclass
class Scene:
    """One composed scene: the RGB image, its classes and the Fashion-MNIST items drawn."""
    image: np.ndarray  # uint8 [S, S, 3]
    classes: frozenset[int]  # the item classes
    item_indices: tuple[int, ...]  # indices into the split's Fashion-MNIST file
    labels: frozenset[int] = frozenset()  # the label-space classes (= classes for "items")


def compose_scenes(images: np.ndarray, labels: np.ndarray, source: SplitSource, count: int,
                   rng: np.random.Generator, image_size: int = 64, label_space: str = "items"):
    """Yields `count` Scenes whose items come only from `images[source.start:source.stop]`.

    Args:
      images: uint8 [N, 28, 28] Fashion-MNIST images (bright item on black).
      labels: int [N] their classes.
      label_space: one of LABEL_SPACES; "items" draws exactly what it always drew.
    """
    _check_label_space(label_space)
    # Per class, the item indices this split may use.
    in_range = np.arange(source.start, source.stop)
    by_class = [in_range[labels[source.start:source.stop] == c] for c in range(len(CLASS_NAMES))]
    empty = [CLASS_NAMES[c] for c, items in enumerate(by_class) if not len(items)]
    if empty:
        raise data.DataError(f"Fashion-MNIST {source.file}[{source.start}:{source.stop}] has no "
                             f"items of classes {empty}; the files look wrong.")
    for _ in range(count):
        if label_space == "items":
            classes, tints = draw_classes(rng), None
        else:
            classes, tints = draw_longtail_classes(rng)
        canvas = _background(rng, image_size)  # float32 [S, S, 3]
        boxes: list[tuple[int, int, int]] = []
        item_indices, scene_labels = [], []
        for position, c in enumerate(classes):
            item = int(by_class[c][rng.integers(len(by_class[c]))])
            item_indices.append(item)
            if tints is None:
                _paste_item(canvas, images[item], rng, boxes)
                scene_labels.append(c)
            else:
                rgb = np.asarray(TINT_RGB[tints[position]], np.float32) + rng.uniform(
                    -TINT_JITTER, TINT_JITTER, size=3).astype(np.float32)
                _paste_item(canvas, images[item], rng, boxes, tint=rgb)
                top, left, side = boxes[-1]
                half = int(left + side / 2.0 >= image_size / 2.0)
                scene_labels.append(label_index(c, tints[position], half))
        yield Scene(image=np.clip(np.rint(canvas), 0, 255).astype(np.uint8),
                    classes=frozenset(classes), item_indices=tuple(item_indices),
                    labels=frozenset(scene_labels))


def draw_classes(rng: np.random.Generator) -> list[int]:
    """The distinct classes of one scene: a perturbed outfit template, or a random set."""
    num_classes = len(CLASS_NAMES)
    if rng.random() < TEMPLATE_PROBABILITY:
        classes = list(OUTFIT_TEMPLATES[rng.integers(len(OUTFIT_TEMPLATES))])
        _perturb_template(classes, num_classes, rng)
    else:
        size = int(rng.integers(1, MAX_ITEMS + 1))
        classes = [int(c) for c in rng.choice(num_classes, size=size, replace=False)]
    rng.shuffle(classes)  # drawing order = depth order
    return classes

def _perturb_template(classes: list[int], num_classes: int, rng: np.random.Generator) -> None:
    """Drops one item of an outfit template or adds a random other one, in place (as drawn)."""
    if rng.random() < REMOVE_PROBABILITY and len(classes) > 1:
        classes.pop(int(rng.integers(len(classes))))
    if rng.random() < ADD_PROBABILITY and len(classes) < MAX_ITEMS:
        others = [c for c in range(num_classes) if c not in classes]
        classes.append(int(rng.choice(others)))


def draw_longtail_classes(rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """item_tint_position: (distinct item classes, their tint indices) of one scene.

    A template (Zipf-weighted) perturbed as in `draw_classes`, or a random set of items drawn
    with ITEM_WEIGHTS; the scene draws a colour scheme from TINT_WEIGHTS and each item takes it
    with probability SCHEME_PROBABILITY, otherwise its own tint from TINT_WEIGHTS.
    """
    num_classes = len(CLASS_NAMES)
    if rng.random() < TEMPLATE_PROBABILITY:
        weights = np.asarray(TEMPLATE_WEIGHTS) / sum(TEMPLATE_WEIGHTS)
        classes = list(OUTFIT_TEMPLATES[rng.choice(len(OUTFIT_TEMPLATES), p=weights)])
        _perturb_template(classes, num_classes, rng)
    else:
        size = int(rng.integers(1, MAX_ITEMS + 1))
        weights = np.asarray(ITEM_WEIGHTS) / sum(ITEM_WEIGHTS)
        classes = [int(c) for c in rng.choice(num_classes, size=size, replace=False, p=weights)]
    rng.shuffle(classes)  # drawing order = depth order
    tint_weights = np.asarray(TINT_WEIGHTS) / sum(TINT_WEIGHTS)
    scheme = int(rng.choice(len(TINT_NAMES), p=tint_weights))
    tints = [scheme if rng.random() < SCHEME_PROBABILITY
             else int(rng.choice(len(TINT_NAMES), p=tint_weights)) for _ in classes]
    return classes, tints


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(directory: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads `<kind>-images-idx3-ubyte.gz` and `<kind>-labels-idx1-ubyte.gz` (kind: train, t10k).

    Returns read-only uint8 images [N, 28, 28] and uint8 labels [N] (cached: decompressing the
    training file takes a second).
    """
    image_path = os.path.join(directory, f"{kind}-images-idx3-ubyte.gz")
    label_path = os.path.join(directory, f"{kind}-labels-idx1-ubyte.gz")
    for path in (image_path, label_path):
        if not os.path.exists(path):
            raise data.DataError(fashion_mnist_files.missing_files_message(directory))
    images = _read_idx(image_path, magic=2051)
    labels = _read_idx(label_path, magic=2049)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise data.DataError(f"{image_path}: expected [N, 28, 28] images matching {len(labels)} "
                             f"labels, got shape {images.shape}.")
    return images, labels


def encode_png(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes."""
    buffer = io.BytesIO()
    # Level 3 is ~1.5x faster to write than the default 6 for 10% larger files.
    Image.fromarray(image).save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


def _read_idx(path: str, magic: int) -> np.ndarray:
    """An IDX file (the MNIST format): big-endian magic, dims, then uint8 data."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise data.DataError(f"{path}: not an IDX file of the expected kind (magic {found}, "
                             f"expected {magic}).")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise data.DataError(f"{path}: truncated ({body.size} bytes of data, dims {dims}).")
    return body.reshape(dims)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A light background, float32 [S, S, 3]: plain, a gradient, stripes or soft noise."""
    base = rng.uniform(170, 250, size=3).astype(np.float32)
    kind = rng.integers(4)
    if kind == 0:
        pattern = np.zeros([size, size], np.float32)
    elif kind == 1:
        axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
        angle = rng.uniform(0, np.pi)
        pattern = 20 * (np.cos(angle) * axis[None, :] + np.sin(angle) * axis[:, None])
    elif kind == 2:
        period = rng.integers(6, 16)
        pattern = 10 * np.sign(np.sin(2 * np.pi * np.arange(size) / period)).astype(np.float32)
        pattern = pattern[None, :] if rng.random() < 0.5 else pattern[:, None]
        pattern = np.broadcast_to(pattern, [size, size])
    else:
        coarse = rng.normal(0, 12, size=[size // 8, size // 8]).astype(np.float32)
        pattern = np.asarray(Image.fromarray(coarse).resize((size, size),
                                                                      Image.BILINEAR))
    return np.clip(base[None, None, :] + pattern[:, :, None], 0, 255).astype(np.float32)


_ITEM_SIZE_RANGE = (22, 36)  # pixels of the pasted 28x28 item on a 64 canvas (scaled with S)
_MAX_PLACEMENT_TRIES = 20
_MAX_OVERLAP = 0.35  # of the smaller item's box, so every item stays recognisable


def _paste_item(canvas: np.ndarray, item: np.ndarray, rng: np.random.Generator,
                boxes: list[tuple[int, int, int]], tint: np.ndarray | None = None) -> None:
    """Draws a tinted, scaled item onto `canvas` in place, avoiding heavy overlap with `boxes`.

    `tint` (RGB float32 [3]) replaces the random saturated tint; its box is appended to `boxes`.
    """
    size = canvas.shape[0]
    scale = size / 64.0
    side = int(round(rng.integers(_ITEM_SIZE_RANGE[0], _ITEM_SIZE_RANGE[1] + 1) * scale))
    top = left = 0
    for _ in range(_MAX_PLACEMENT_TRIES):
        top, left = (int(v) for v in rng.integers(0, size - side + 1, size=2))
        if all(_overlap(top, left, side, *box) <= _MAX_OVERLAP for box in boxes):
            break
    boxes.append((top, left, side))
    resized = Image.fromarray(item).resize((side, side), Image.BILINEAR)
    alpha = np.asarray(resized, np.float32)[:, :, None] / 255.0  # [s, s, 1] item intensity
    # A saturated, darker-than-background tint keeps items visible on every background.
    if tint is None:
        tint = rng.uniform(20, 160, size=3).astype(np.float32)
        tint[rng.integers(3)] = rng.uniform(120, 230)
    shading = 0.6 + 0.4 * alpha  # keeps the item's own texture visible inside its silhouette
    region = canvas[top:top + side, left:left + side]
    region[...] = (1.0 - alpha) * region + alpha * (tint[None, None, :] * shading)


def _overlap(top: int, left: int, side: int, other_top: int, other_left: int,
             other_side: int) -> float:
    height = max(0, min(top + side, other_top + other_side) - max(top, other_top))
    width = max(0, min(left + side, other_left + other_side) - max(left, other_left))
    return height * width / float(min(side, other_side) ** 2)


def run(argv: Sequence[str]) -> data.DatasetInfo:
    """Parses `argv` (argv[0] = program name) with fresh flags and builds the dataset."""
    return _build_from_flags(common.parse_flags(define_flags, argv))


def _build_from_flags(flag_values: flags.FlagValues) -> data.DatasetInfo:
    return build(flag_values.output_dir,
                 fashion_mnist_dir=flag_values.fashion_mnist_dir,
                 image_size=flag_values.image_size,
                 num_examples={"train": flag_values.num_train, "val": flag_values.num_val,
                               "test": flag_values.num_test},
                 seed=flag_values.seed,
                 num_shards=flag_values.num_shards,
                 label_space=flag_values.label_space,
                 reserve_pretrain_items=flag_values.reserve_pretrain_items)


def main(argv: Sequence[str]) -> None:
    common.run_main(_build_from_flags, argv, program="fashion_scenes")


if __name__ == "__main__":
    from tfrecords_tools import commands

    commands.run_tool("fashion_scenes", define_flags, main)

"""dataset.json: the description of a dataset folder (DatasetInfo, SplitInfo), read and written."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
from typing import Any, Sequence

import tensorflow as tf

from imcl_tf.data.errors import DataError
from imcl_tf.data.schema import DATASET_JSON, SCHEMA_VERSION


@dataclasses.dataclass
class SplitInfo:
    """One split: its shard file names (relative to the dataset folder) and exact example count."""
    shards: list[str]
    num_examples: int
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # --skip_corrupt report
    # Records per shard, in `shards` order; lets a worker that reads only some shards know its exact
    # count. Empty in hand-written descriptions: readers then assume SplitWriter's round-robin
    # layout.
    shard_sizes: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DatasetInfo:
    """The contents of dataset.json."""
    class_names: list[str]
    splits: dict[str, SplitInfo]
    mode: str = "image"  # "image" (image/encoded) or "features" (feature/embedding)
    embedding_dim: int | None = None
    image_size: int | None = None  # a hint for training (pixels of the square input)
    label_graph: str | None = None  # optional .npy file (relative to the folder)
    labels: dict[str, Any] = dataclasses.field(default_factory=dict)  # source, protocol, known ratio, seed
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)  # converter, flags, date
    schema_version: int = SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise DataError(f"split {name!r} is not in this dataset; it has {sorted(self.splits)}.")
        return self.splits[name]

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["num_classes"] = self.num_classes
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = DATASET_JSON) -> "DatasetInfo":
        if not isinstance(obj, dict):
            raise DataError(f"{where}: malformed dataset description (a JSON object is expected, "
                            f"got {type(obj).__name__}); rebuild it with tfrecords_tools.")
        if not isinstance(obj.get("splits"), dict) or not obj["splits"]:
            raise DataError(f"{where}: \"splits\" must be a non-empty object of split name -> "
                            f"split description, got {obj.get('splits')!r}; rebuild the dataset "
                            "with tfrecords_tools.")
        try:
            splits = {name: SplitInfo(**split) for name, split in obj["splits"].items()}
            fields = {f.name for f in dataclasses.fields(cls)}
            kwargs = {k: v for k, v in obj.items() if k in fields and k != "splits"}
            info = cls(splits=splits, **kwargs)
        except (KeyError, TypeError) as e:
            raise DataError(f"{where}: malformed dataset description ({e}); rebuild it with "
                            "tfrecords_tools.") from e
        for name, split in info.splits.items():
            _check_split(name, split, where)
        if obj.get("num_classes", info.num_classes) != info.num_classes:
            raise DataError(f"{where}: num_classes={obj['num_classes']} but {info.num_classes} "
                            "class names are listed.")
        if info.mode not in ("image", "features"):
            raise DataError(f"{where}: mode must be 'image' or 'features', got {info.mode!r}.")
        return info


def check_shard_name(name: Any, where: str = DATASET_JSON) -> str:
    """`name` after checking it is a plain file name inside the dataset folder.

    Shard names come from dataset.json, which may be hand-edited or hostile: a name with a path
    separator, `..` or an absolute path would make readers open, and rewriting converters
    delete, files outside the folder.

    Raises:
      DataError naming `where` and the bad name.
    """
    if (not isinstance(name, str) or not name or name in (".", "..") or "/" in name
            or "\\" in name or "\0" in name or os.path.isabs(name)
            or os.path.basename(name) != name):
        raise DataError(f"{where}: shard name {name!r} is not a plain file name; shards must be "
                        "files directly inside the dataset folder (no '/', '..' or absolute "
                        "path). Rebuild the dataset with tfrecords_tools.")
    return name


def _check_split(name: str, split: SplitInfo, where: str) -> None:
    """The shapes and names of one split's description (DataError naming the split)."""
    what = f"{where}: split {name!r}"
    if not isinstance(split.shards, list) or not split.shards:
        raise DataError(f"{what} lists no shards (\"shards\": {split.shards!r}); every split "
                        "has at least one shard file. Rebuild the dataset with tfrecords_tools.")
    for shard in split.shards:
        check_shard_name(shard, what)
    if len(set(split.shards)) != len(split.shards):
        raise DataError(f"{what} lists a shard twice: {split.shards!r}.")
    if isinstance(split.num_examples, bool) or not isinstance(split.num_examples, int) \
            or split.num_examples < 0:
        raise DataError(f"{what}: num_examples must be an integer >= 0, got "
                        f"{split.num_examples!r}.")
    if not isinstance(split.shard_sizes, list) or not isinstance(split.skipped, list):
        raise DataError(f"{what}: shard_sizes and skipped must be lists.")
    if split.shard_sizes and (len(split.shard_sizes) != len(split.shards) or any(
            isinstance(n, bool) or not isinstance(n, int) or n < 0 for n in split.shard_sizes)):
        raise DataError(f"{what}: shard_sizes {split.shard_sizes!r} must be one count >= 0 per "
                        f"shard ({len(split.shards)} shards).")


def load_dataset_info(data_dir: str) -> DatasetInfo:
    """Reads `<data_dir>/dataset.json`; DataError when missing or malformed."""
    path = os.path.join(data_dir, DATASET_JSON)
    if not tf.io.gfile.exists(path):
        raise DataError(f"{path} not found: --data_dir must be a dataset folder written by "
                        "tfrecords_tools (imcl-data <tool> --output_dir ...).")
    with tf.io.gfile.GFile(path, "r") as f:
        try:
            obj = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e}).") from e
    return DatasetInfo.from_json(obj, where=path)


def save_dataset_info(data_dir: str, info: DatasetInfo) -> None:
    """Writes dataset.json atomically (temporary file, then rename)."""
    tf.io.gfile.makedirs(data_dir)
    remove_stale_temporaries(data_dir)
    path = os.path.join(data_dir, DATASET_JSON)
    _atomic_write_text(path, json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n")


def replace_dataset_info(data_dir: str, info: DatasetInfo,
                         splits: Sequence[str] | None = None) -> None:
    """Publishes `info` over an existing description, then deletes the shards it no longer lists.

    The rename of dataset.json is the single commit point of a rebuild: new shards are written
    under names no old shard has (SplitWriter), readers only open the shards dataset.json lists,
    and old shards are deleted only after the new description is in place. A build killed at any
    point therefore leaves either the old dataset or the new one, plus unlisted leftovers that the
    next call removes: shard files of `splits` (default: every split of `info`) that dataset.json
    does not list, and temporaries of processes that are gone.
    """
    previous = None
    if tf.io.gfile.exists(os.path.join(data_dir, DATASET_JSON)):
        try:
            previous = load_dataset_info(data_dir)
        except DataError:
            previous = None  # an unreadable old description lists nothing we could trust
    save_dataset_info(data_dir, info)  # the commit point
    listed = {name for split in info.splits.values() for name in split.shards}
    stale = set()
    if previous is not None:
        stale = {name for split in previous.splits.values() for name in split.shards}
    names = list(info.splits) if splits is None else list(splits)
    patterns = [re.compile(rf"^{re.escape(name)}-(g\d+-)?\d{{5}}-of-\d{{5}}\.tfrecord$")
                for name in names]
    for name in tf.io.gfile.listdir(data_dir):
        if any(pattern.match(name) for pattern in patterns):
            stale.add(name)  # a shard of a build that was killed before its commit
    for name in sorted(stale - listed):
        path = os.path.join(data_dir, name)
        if tf.io.gfile.exists(path):
            tf.io.gfile.remove(path)


_TEMPORARY = re.compile(r"\.tmp-(\d+)$")


def remove_stale_temporaries(data_dir: str) -> list[str]:
    """Deletes `*.tmp-<pid>` files of `data_dir` whose writing process is gone; returns them.

    Shards and dataset.json are written as `<name>.tmp-<pid>` and renamed into place; a process
    killed before its rename leaves such a file behind. A file of a process still running here
    (a concurrent writer) is kept.
    """
    removed = []
    if not tf.io.gfile.isdir(data_dir):
        return removed
    for name in tf.io.gfile.listdir(data_dir):
        match = _TEMPORARY.search(name)
        if match and not _process_alive(int(match.group(1))):
            tf.io.gfile.remove(os.path.join(data_dir, name))
            removed.append(name)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process (or an odd number): keep its file
    return True


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(text)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

"""Writing a split's TFRecord shards: shard file names and the atomic SplitWriter."""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf

from imcl_tf.data.dataset_info import SplitInfo, remove_stale_temporaries
from imcl_tf.data.errors import DataError
from imcl_tf.data.schema import IMAGE_ID_KEY


def shard_names(split: str, num_shards: int, generation: int = 0) -> list[str]:
    """File names of a split's shards, e.g. train-00000-of-00004.tfrecord.

    A `generation` > 0 gives the names of a rebuild in place, train-g1-00000-of-00004.tfrecord,
    so that a new build never overwrites the shards the published dataset.json lists.
    """
    if num_shards < 1:
        raise DataError(f"num_shards must be >= 1, got {num_shards}.")
    tag = f"g{generation}-" if generation else ""
    return [f"{split}-{tag}{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)]


def fresh_shard_names(output_dir: str, split: str, num_shards: int) -> list[str]:
    """shard_names of the lowest generation of which no file exists yet in `output_dir`."""
    existing = set(tf.io.gfile.listdir(output_dir)) if tf.io.gfile.isdir(output_dir) else set()
    generation = 0
    while True:
        names = shard_names(split, num_shards, generation)
        if not existing.intersection(names):
            return names
        generation += 1


class SplitWriter:
    """Writes one split's Examples round-robin into `num_shards` shards, atomically.

    Shards are written under temporary names and renamed by `close()` to names no file in the
    folder has yet (`fresh_shard_names`): a rebuild in place never touches the shards of the
    published dataset, which stays whole until `replace_dataset_info` publishes the new one.
    Temporaries left by killed writers are removed first; ids are checked for duplicates.

        with SplitWriter(out_dir, "train", num_shards=4) as writer:
            writer.write(example)
        split_info = writer.split_info
    """

    def __init__(self, output_dir: str, split: str, num_shards: int):
        tf.io.gfile.makedirs(output_dir)
        remove_stale_temporaries(output_dir)
        self.output_dir = output_dir
        self.split = split
        self.names = fresh_shard_names(output_dir, split, num_shards)
        self._tmp = [os.path.join(output_dir, f".{n}.tmp-{os.getpid()}") for n in self.names]
        self._writers = [tf.io.TFRecordWriter(p) for p in self._tmp]
        self._shard_sizes = [0] * num_shards
        self._ids: set[bytes] = set()
        self.num_examples = 0
        self.skipped: list[dict[str, Any]] = []
        self.split_info: SplitInfo | None = None

    def write(self, example: tf.train.Example) -> None:
        image_id = example.features.feature[IMAGE_ID_KEY].bytes_list.value[0]
        if image_id in self._ids:
            raise DataError(f"split {self.split!r}: duplicate image id "
                            f"{image_id.decode('utf-8', 'replace')!r}; ids must be unique.")
        self._ids.add(image_id)
        shard = self.num_examples % len(self._writers)
        self._writers[shard].write(example.SerializeToString())
        self._shard_sizes[shard] += 1
        self.num_examples += 1

    def skip(self, source: str, reason: str) -> None:
        """Records an input that was skipped (--skip_corrupt), for the report and dataset.json."""
        self.skipped.append({"source": source, "reason": reason})

    def close(self) -> SplitInfo:
        for writer in self._writers:
            writer.close()
        try:
            for tmp, name in zip(self._tmp, self.names):
                tf.io.gfile.rename(tmp, os.path.join(self.output_dir, name), overwrite=False)
        except BaseException:
            self.abort()  # the temporaries not renamed yet; renamed ones are unlisted leftovers
            raise
        self.split_info = SplitInfo(shards=list(self.names), num_examples=self.num_examples,
                                    skipped=list(self.skipped), shard_sizes=list(self._shard_sizes))
        return self.split_info

    def abort(self) -> None:
        for writer in self._writers:
            writer.close()
        for tmp in self._tmp:
            if tf.io.gfile.exists(tmp):
                tf.io.gfile.remove(tmp)

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

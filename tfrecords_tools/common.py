"""What every converter shares: common flags, image checks, progress lines and the split runner.

A converter turns its annotation format into a list of `Record`s (id, image path or bytes,
positive and negative class indices) and hands them to `convert_split`, which reads and checks
the images in parallel, writes atomic shards with `imcl_tf.data.SplitWriter` and merges the split
into the output folder's dataset.json with its provenance.

Only image problems (missing, unreadable, truncated, undecodable, corrupt JPEG data, not
JPEG/PNG, over --max_image_pixels) can be skipped
with --skip_corrupt; annotation problems (unknown class, class both positive and negative,
duplicate ids, index out of range) always stop the conversion, because skipping them would
silently hide a mismatched class list or a bug in the annotations.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import os
import re
import sys
import time
from typing import Any, Callable, Iterable, Iterator, Sequence, TextIO

import numpy as np
from absl import app, flags

from imcl_tf import data, image_header

DEFAULT_NUM_WORKERS = 8  # threads reading and decode-checking images (I/O bound, GIL released)
MAX_SKIPPED_LISTED = 1000  # skipped inputs listed one by one in dataset.json; all are counted


# ---- Records ------------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)  # slots: millions of records stay small (Open Images)
class Record:
    """One image (or feature vector) to convert: the lightweight description a converter yields.

    `source` says where it came from for error messages (e.g. "train.csv line 12"); `image_path`
    (read by the worker threads) or `image_bytes` (already in memory) give the image; features-mode
    records give `embedding` instead.
    """
    image_id: str
    positives: Sequence[int]
    negatives: Sequence[int]
    source: str = ""
    image_path: str | None = None
    image_bytes: bytes | None = None
    embedding: np.ndarray | None = None
    image_class: int | None = None

    def where(self) -> str:
        return self.source or f"record {self.image_id!r}"


class ImageError(data.DataError):
    """A bad image; `kind` is one of missing, unreadable, truncated, undecodable, corrupt
    (decodable, but libjpeg reported damaged data), unsupported, too_large.

    `detail` is the problem alone (for the skip report); the message adds where and what to do.
    """

    def __init__(self, where: str, detail: str, kind: str, remedy: str):
        super().__init__(f"{where}: {detail}; {remedy}, or rerun with --skip_corrupt to skip it.")
        self.where = where
        self.detail = detail
        self.kind = kind



# ---- The split runner ---------------------------------------------------------------------------

_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def convert_split(records: Iterable[Record], *,
                  output_dir: str,
                  split: str = "train",
                  class_names: Sequence[str],
                  converter: str,
                  num_shards: int = 1,
                  num_workers: int = DEFAULT_NUM_WORKERS,
                  seed: int = 0,
                  shuffle: bool = True,
                  skip_corrupt: bool = False,
                  max_image_pixels: int = image_header.DEFAULT_MAX_IMAGE_PIXELS,
                  inputs: dict[str, Any] | None = None,
                  label_source: str | None = None,
                  label_info: dict[str, Any] | None = None,
                  split_label_info: dict[str, Any] | None = None,
                  mode: str = "image",
                  image_size: int | None = None,
                  progress_interval: float = 10.0,
                  stream: TextIO | None = None) -> data.SplitInfo:
    """Writes one split of `records` into `output_dir` and merges it into dataset.json.

    Args:
      records: the split's Records. Labels and ids are all checked before any image is read, so
        annotation errors stop the run in seconds.
      output_dir, split, num_shards: where and how to write (`<split>-0000i-of-0000n.tfrecord`,
        or `<split>-g<k>-0000i-of-0000n.tfrecord` when a rebuild in place must not overwrite the
        published shards; dataset.json lists the names).
      class_names: the L class names; must equal those of splits already in dataset.json.
      converter: the converter's module name, recorded as provenance.
      num_workers: threads reading and decode-checking images; the output is identical for any
        value (records are written in order).
      seed, shuffle: the record order is a seeded permutation (shuffle=True) or the given order.
      skip_corrupt: skip bad images (counted, printed, listed in dataset.json) instead of raising.
      max_image_pixels: images with more pixels (read from the header, before decoding) are bad
        images of kind too_large: a decompression bomb of a few KB never gets decoded.
      inputs: the converter's own inputs (annotation paths, options) recorded in the provenance.
      label_source: how the labels were obtained, recorded in dataset.json `labels.source`.
      label_info: more dataset-wide entries for dataset.json `labels` (e.g. Open Images MIDs).
      split_label_info: more entries for `labels.splits[split]` (e.g. counts of ignored labels).
      mode: "image" (records carry images) or "features" (records carry embeddings).
      image_size: optional training input size hint for dataset.json.
      progress_interval, stream: progress lines on `stream` (stderr) every so many seconds.

    Returns:
      the written SplitInfo.

    Raises:
      DataError naming the record or file, on the first bad input (or on bad labels and duplicate
      ids even with skip_corrupt), or when dataset.json has other class names or another mode.
    """
    stream = stream if stream is not None else sys.stderr
    _check_options(output_dir, split, num_shards, num_workers, mode, class_names)
    try:
        image_header.check_max_image_pixels(max_image_pixels)
    except ValueError as e:
        raise data.DataError(str(e)) from e
    records = list(records)
    existing = _load_existing(output_dir, class_names, mode, split)
    embedding_dim = _check_records(records, len(class_names), split, mode)
    if existing is not None and mode == "features" and existing.embedding_dim not in (
            None, embedding_dim):
        raise data.DataError(f"{output_dir}: dataset.json has embedding_dim="
                             f"{existing.embedding_dim} but split {split!r} has {embedding_dim}.")
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(records))
        records = [records[i] for i in order]

    label = f"{converter} {split}"
    progress = Progress(label, total=len(records), interval=progress_interval, stream=stream)
    skipped_by_kind: collections.Counter[str] = collections.Counter()
    num_positive = num_negative = 0
    # closing(): on an error the reader stops at once (pending reads cancelled, threads joined).
    with data.SplitWriter(output_dir, split, num_shards) as writer, \
            contextlib.closing(_read_in_order(records, num_workers, max_image_pixels)) \
            as checked_images:
        for record, future in checked_images:
            try:
                encoded = future.result()
            except ImageError as e:
                if not skip_corrupt:
                    raise
                skipped_by_kind[e.kind] += 1
                if len(writer.skipped) < MAX_SKIPPED_LISTED:
                    writer.skip(e.where, e.detail)
                progress.update()
                continue
            writer.write(data.make_example(
                record.image_id, record.positives, record.negatives, len(class_names),
                encoded_image=encoded, embedding=record.embedding,
                image_class=record.image_class))
            num_positive += len(record.positives)
            num_negative += len(record.negatives)
            progress.update()
    split_info = writer.split_info  # set by the writer's close() on leaving the block
    progress.close()

    num_skipped = sum(skipped_by_kind.values())
    if num_skipped:
        print(f"{label}: skipped {num_skipped} of {len(records)} inputs "
              f"({', '.join(f'{k}: {n}' for k, n in sorted(skipped_by_kind.items()))}):",
              file=stream)
        for entry in split_info.skipped:
            print(f"  {entry['source']}: {entry['reason']}", file=stream)
        if num_skipped > len(split_info.skipped):
            print(f"  ... and {num_skipped - len(split_info.skipped)} more", file=stream)

    num_written = split_info.num_examples
    stats = {
        "num_positive": num_positive,
        "num_negative": num_negative,
        "known_ratio": ((num_positive + num_negative) / (num_written * len(class_names))
                        if num_written else 0.0),
        **(split_label_info or {}),
    }
    run = {
        "converter": converter,
        "date": data.utc_now(),
        "flags": {**(inputs or {}), "output_dir": output_dir, "split": split,
                  "num_shards": num_shards, "num_workers": num_workers, "seed": seed,
                  "shuffle": shuffle, "skip_corrupt": skip_corrupt,
                  "max_image_pixels": max_image_pixels},
        "num_skipped": num_skipped,
        "skipped_by_kind": dict(sorted(skipped_by_kind.items())),
    }
    _merge_dataset_info(output_dir, existing, split, split_info, class_names, mode, embedding_dim,
                        image_size, label_source, label_info, stats, run)
    print(f"{label}: wrote {num_written} examples in {num_shards} shard(s) to {output_dir}",
          file=stream)
    return split_info


def _check_options(output_dir: str, split: str, num_shards: int, num_workers: int, mode: str,
                   class_names: Sequence[str]) -> None:
    if not output_dir:
        raise data.DataError("--output_dir is required (the dataset folder to write).")
    if not _SPLIT_NAME.match(split or ""):
        raise data.DataError(f"--split must be a plain name like 'train' (letters, digits, _ . -), "
                             f"got {split!r}.")
    if num_shards < 1:
        raise data.DataError(f"--num_shards must be >= 1, got {num_shards}.")
    if num_workers < 1:
        raise data.DataError(f"--num_workers must be >= 1, got {num_workers}.")
    if mode not in ("image", "features"):
        raise data.DataError(f"mode must be 'image' or 'features', got {mode!r}.")
    if not class_names:
        raise data.DataError("the class list is empty; a dataset needs at least one class.")
    repeated = sorted(n for n, c in collections.Counter(class_names).items() if c > 1)
    if repeated:
        raise data.DataError(f"class names must be unique; repeated: {repeated[:10]}.")


def _check_records(records: list[Record], num_classes: int, split: str, mode: str) -> int | None:
    """Checks ids, labels and image/embedding presence of every record before any image is read.

    Returns the embedding dimension in features mode (None in image mode).
    """
    first_source: dict[str, str] = {}
    embedding_dim = None
    for record in records:
        where = record.where()
        if not record.image_id:
            raise data.DataError(f"{where}: empty image id.")
        if record.image_id in first_source:
            raise data.DataError(f"split {split!r}: duplicate image id {record.image_id!r} in "
                                 f"{where} and {first_source[record.image_id]}; ids must be "
                                 "unique (they key the dictionary bank and predictions).")
        first_source[record.image_id] = where
        for kind, indices in (("positive", record.positives), ("negative", record.negatives)):
            bad = [int(i) for i in indices if not 0 <= int(i) < num_classes]
            if bad:
                raise data.DataError(f"{where}: {kind} class indices {bad} are outside "
                                     f"[0, {num_classes}); the class list has {num_classes} "
                                     "classes.")
            if len(set(indices)) != len(indices):
                raise data.DataError(f"{where}: repeated {kind} class indices {sorted(indices)}.")
        both = sorted(set(record.positives) & set(record.negatives))
        if both:
            raise data.DataError(f"{where}: classes {both} are both positive and negative; a class "
                                 "is present, absent, or unknown.")
        if mode == "image":
            if (record.image_path is None) == (record.image_bytes is None):
                raise data.DataError(f"{where}: an image record needs exactly one of image_path "
                                     "and image_bytes.")
        else:
            if record.embedding is None:
                raise data.DataError(f"{where}: a features-mode record needs an embedding.")
            dim = int(np.asarray(record.embedding).size)
            if embedding_dim is None:
                embedding_dim = dim
            elif dim != embedding_dim:
                raise data.DataError(f"{where}: embedding has {dim} values, earlier records have "
                                     f"{embedding_dim}.")
    return embedding_dim


def _read_in_order(records: Sequence[Record], num_workers: int,
                   max_image_pixels: int = image_header.DEFAULT_MAX_IMAGE_PIXELS
                   ) -> Iterator[tuple[Record, concurrent.futures.Future]]:
    """Yields (record, future of its checked image bytes or None) in record order.

    At most a bounded window of images is in flight, so memory does not grow with the split.
    """
    max_in_flight = 4 * num_workers
    with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
        pending: collections.deque = collections.deque()
        try:
            for record in records:
                pending.append((record, pool.submit(_load_checked_image, record,
                                                    max_image_pixels)))
                if len(pending) >= max_in_flight:
                    yield pending.popleft()
            while pending:
                yield pending.popleft()
        finally:
            for _, future in pending:
                future.cancel()


def _load_checked_image(record: Record, max_image_pixels: int) -> bytes | None:
    if record.image_path is not None:
        encoded = read_image(record.image_path, record.where())
        return check_image(encoded, f"image file {record.image_path} ({record.where()})",
                           max_image_pixels)[0]
    if record.image_bytes is not None:
        return check_image(record.image_bytes, record.where(), max_image_pixels)[0]
    return None


def _load_existing(output_dir: str, class_names: Sequence[str], mode: str,
                   split: str) -> data.DatasetInfo | None:
    import tensorflow as tf

    if not tf.io.gfile.exists(os.path.join(output_dir, data.DATASET_JSON)):
        return None
    info = data.load_dataset_info(output_dir)
    if list(info.class_names) != list(class_names):
        differ = [i for i, (a, b) in enumerate(zip(info.class_names, class_names)) if a != b]
        raise data.DataError(
            f"{output_dir}/dataset.json has {info.num_classes} classes that differ from the "
            f"{len(class_names)} classes of split {split!r} (first difference at index "
            f"{differ[0] if differ else min(info.num_classes, len(class_names))}); write the split "
            "to another --output_dir or use the same class list.")
    if info.mode != mode:
        raise data.DataError(f"{output_dir}/dataset.json is a {info.mode!r}-mode dataset; split "
                             f"{split!r} is {mode!r}-mode. Use another --output_dir.")
    return info


def _merge_dataset_info(output_dir: str, existing: data.DatasetInfo | None, split: str,
                        split_info: data.SplitInfo, class_names: Sequence[str], mode: str,
                        embedding_dim: int | None, image_size: int | None,
                        label_source: str | None, label_info: dict[str, Any] | None,
                        stats: dict[str, Any], run: dict[str, Any]) -> None:
    info = existing or data.DatasetInfo(class_names=list(class_names), splits={}, mode=mode)
    info.splits[split] = split_info
    if mode == "features":
        info.embedding_dim = embedding_dim
    if image_size is not None:
        info.image_size = image_size
    if label_source is not None:
        info.labels["source"] = label_source
    info.labels.update(label_info or {})
    info.labels.setdefault("splits", {})[split] = stats
    info.provenance["converter"] = run["converter"]
    info.provenance["date"] = run["date"]
    info.provenance.setdefault("splits", {})[split] = run
    # The commit point: the old shards of this split (and leftovers of killed builds) are removed
    # only once the new dataset.json is in place.
    data.replace_dataset_info(output_dir, info, splits=[split])



# ---- Images -------------------------------------------------------------------------------------

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"


def read_image(path: str, source: str = "") -> bytes:
    """Returns the bytes of an image file (local or any tf.io.gfile path); ImageError if missing."""
    import tensorflow as tf

    where = f"image file {path}" + (f" ({source})" if source else "")
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return f.read()
    except tf.errors.NotFoundError as e:
        raise ImageError(where, "not found", "missing",
                         "check --images_dir and the file names in the annotations") from e
    except (tf.errors.OpError, OSError) as e:
        raise ImageError(where, f"cannot be read ({_op_message(e)})", "unreadable",
                         "check its permissions") from e


def check_image(encoded: bytes, source: str,
                max_image_pixels: int = image_header.DEFAULT_MAX_IMAGE_PIXELS
                ) -> tuple[bytes, str]:
    """Decode-checks JPEG or PNG bytes with TensorFlow's decoder (the one training uses).

    The size is read from the header first: an image of more than `max_image_pixels` pixels is
    refused before anything is decoded (a 48 KB PNG can decode to 20000 x 20000 pixels).
    Returns (the same bytes, "jpeg" | "png"); the bytes are stored as they are, never re-encoded.
    Raises ImageError naming `source` when the bytes are empty, not JPEG/PNG, too large,
    truncated or undecodable, or when libjpeg warns of corrupt data it decoded around
    (`jpeg_check`).
    """
    import tensorflow as tf

    from tfrecords_tools import jpeg_check  # imports TensorFlow

    if not encoded:
        raise ImageError(source, "empty image (0 bytes)", "truncated", "re-download it")
    if encoded.startswith(_JPEG_MAGIC):
        image_format = "jpeg"
    elif encoded.startswith(_PNG_MAGIC):
        image_format = "png"
    else:
        raise ImageError(source, f"not a JPEG or PNG file (starts with {encoded[:8]!r})",
                         "unsupported", "convert it to JPEG or PNG")
    try:
        size = image_header.read_image_size(encoded, source)
    except image_header.ImageHeaderError as e:
        kind = "truncated" if "truncated" in str(e) else "undecodable"
        raise ImageError(source, f"{kind} {image_format.upper()} image ({len(encoded)} bytes: "
                         f"{str(e).split(': ', 1)[-1]})", kind, "re-download or re-export it") \
            from e
    if size.pixels > max_image_pixels:
        flag = image_header.MAX_IMAGE_PIXELS_FLAG
        raise ImageError(source, f"{size.format} image of {size.width} x {size.height} pixels "
                         f"({size.pixels:,} pixels) is over the limit of {max_image_pixels:,} "
                         f"pixels ({flag}={max_image_pixels}), checked before decoding",
                         "too_large", f"resize it, or raise {flag} if such images are expected")
    try:
        if image_format == "jpeg":
            warnings = jpeg_check.decode_jpeg_warnings(encoded)
        else:
            tf.io.decode_image(encoded, channels=3, expand_animations=False)
            warnings = []
    except tf.errors.OpError as e:
        kind = "truncated" if _looks_truncated(encoded, image_format) else "undecodable"
        raise ImageError(source, f"{kind} {image_format.upper()} image ({len(encoded)} bytes: "
                         f"{_op_message(e)})", kind, "re-download or re-export it") from e
    if warnings:
        # libjpeg decoded it anyway, with grey or shifted blocks where the data is damaged.
        kind = "truncated" if "Premature end of JPEG file" in warnings else "corrupt"
        raise ImageError(source, f"{kind} JPEG image ({len(encoded)} bytes: libjpeg: "
                         f"{'; '.join(warnings)})", kind, "re-download or re-export it")
    return encoded, image_format


def _looks_truncated(encoded: bytes, image_format: str) -> bool:
    # A complete JPEG ends with the EOI marker (some writers pad with zeros after it); a complete
    # PNG ends with the IEND chunk. Used only to name the failure in messages and counts.
    if image_format == "jpeg":
        return not encoded.rstrip(b"\x00").endswith(b"\xff\xd9")
    return not encoded.endswith(_PNG_END)


def _op_message(error: Exception) -> str:
    message = getattr(error, "message", None) or str(error)
    # TF prefixes eager errors with "{{function_node __wrapped__...}} "; keep the readable part.
    return re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", message).split("[Op:")[0].strip()



# ---- Progress -----------------------------------------------------------------------------------


class Progress:
    """Plain-text progress lines on stderr: count/total, rate per second and ETA.

    A line is printed at most every `interval` seconds, plus a final one from `close()`.
    """

    def __init__(self, label: str, total: int | None = None, interval: float = 10.0,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.monotonic):
        self.label = label
        self.total = total
        self.interval = interval
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.count = 0
        self.start = clock()
        self._last_print = self.start

    def update(self, n: int = 1) -> None:
        self.count += n
        now = self.clock()
        if now - self._last_print >= self.interval:
            self._last_print = now
            self._print(now)

    def close(self) -> None:
        self._print(self.clock(), done=True)

    def line(self, now: float | None = None) -> str:
        now = self.clock() if now is None else now
        elapsed = max(now - self.start, 1e-9)
        rate = self.count / elapsed
        if self.total:
            percent = 100.0 * self.count / self.total
            text = f"{self.label}: {self.count}/{self.total} ({percent:.1f}%)"
        else:
            text = f"{self.label}: {self.count}"
        text += f" {rate:.1f}/s"
        if self.total and rate > 0 and self.count < self.total:
            text += f" ETA {_format_seconds((self.total - self.count) / rate)}"
        return text

    def _print(self, now: float, done: bool = False) -> None:
        suffix = f" done in {_format_seconds(now - self.start)}" if done else ""
        print(self.line(now) + suffix, file=self.stream, flush=True)


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"



# ---- Command-line flags -------------------------------------------------------------------------


def define_common_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines the flags every converter has; a flag already defined is left as it is.

    Safe to call from several converters in one process (each is defined once per FlagValues).
    """
    define_flag(flags.DEFINE_string, "output_dir", None,
                "Dataset folder to write (shards + dataset.json). Splits already in it are kept; "
                "the class names must match.", flag_values, required=True)
    define_flag(flags.DEFINE_string, "split", "train",
                "Name of the split to write (e.g. train, validation, test).", flag_values)
    define_flag(flags.DEFINE_integer, "num_shards", 1,
                "Number of TFRecord shards of the split (>= the number of training workers).",
                flag_values, lower_bound=1)
    define_flag(flags.DEFINE_integer, "num_workers", DEFAULT_NUM_WORKERS,
                "Threads reading and decode-checking images. The output does not depend on it.",
                flag_values, lower_bound=1)
    define_flag(flags.DEFINE_integer, "seed", 0,
                "Seed of the record-order shuffle before writing (recorded in dataset.json).",
                flag_values)
    define_flag(flags.DEFINE_boolean, "shuffle", True,
                "Shuffle the record order (seeded) so shards mix classes; --noshuffle keeps the "
                "order of the annotation file.", flag_values)
    define_flag(flags.DEFINE_boolean, "skip_corrupt", False,
                "Skip missing, truncated, undecodable, corrupt (libjpeg warnings) or too large "
                "images instead of stopping; "
                "they are counted, printed at the end and listed in dataset.json.", flag_values)
    define_flag(flags.DEFINE_integer, image_header.MAX_IMAGE_PIXELS_FLAG.lstrip("-"),
                image_header.DEFAULT_MAX_IMAGE_PIXELS,
                "Refuse images with more pixels (width x height, read from the file header "
                "before decoding: decompression bombs never get decoded).", flag_values,
                lower_bound=1)


def define_flag(define: Callable[..., Any], name: str, default: Any, help_text: str,
                flag_values: flags.FlagValues, *, required: bool = False, **kwargs: Any) -> None:
    """Calls `flags.DEFINE_*` unless `name` is already in `flag_values` (no double definition)."""
    if name in flag_values:
        return
    # Register the flag under the converter that asked for it (not this module), so that
    # `python -m tfrecords_tools.<converter> --help` lists it.
    define(name, default, help=help_text, flag_values=flag_values,
           module_name=_calling_module_name(), **kwargs)
    if required:
        flags.mark_flag_as_required(name, flag_values=flag_values)


def _calling_module_name() -> str:
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame = frame.f_back
    name = frame.f_globals.get("__name__", __name__) if frame is not None else __name__
    # absl files the flags of the main program under sys.argv[0], not "__main__".
    return sys.argv[0] if name == "__main__" else name


def write_options(flag_values: flags.FlagValues) -> dict[str, Any]:
    """The common flags' values as keyword arguments of `convert_split`."""
    return {name: flag_values[name].value
            for name in ("output_dir", "split", "num_shards", "num_workers", "seed", "shuffle",
                         "skip_corrupt", "max_image_pixels")}


def parse_flags(define_flags: Callable[[flags.FlagValues], None],
                argv: Sequence[str]) -> flags.FlagValues:
    """Parses `argv` (argv[0] = program name) into a fresh FlagValues; for `run(argv)` in tests.

    Raises DataError on unknown flags, missing required flags or stray positional arguments.
    """
    flag_values = flags.FlagValues()
    define_flags(flag_values)
    try:
        rest = flag_values(list(argv))
    except flags.Error as e:
        raise data.DataError(f"bad command line {list(argv[1:])}: {e}") from e
    if len(rest) > 1:
        raise data.DataError(f"unexpected positional arguments {rest[1:]}; every input is a flag.")
    return flag_values


def run_main(convert_from_flags: Callable[[flags.FlagValues], Any], argv: Sequence[str],
             program: str = "") -> None:
    """Body of a tool's absl `main`: runs `convert_from_flags` on the global flags.

    A DataError or ValueError ends the program with its message and exit status 1 (no traceback:
    the message already says what, where and what to do).
    """
    if len(argv) > 1:
        raise app.UsageError(f"unexpected positional arguments {list(argv[1:])}; every input is "
                             "a flag.")
    try:
        convert_from_flags(flags.FLAGS)
    except ValueError as e:  # DataError is a ValueError
        print(f"{program + ': ' if program else ''}error: {e}", file=sys.stderr)
        sys.exit(1)

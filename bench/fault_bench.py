"""The hostile-input and fault battery, in one run: every case is injected for real
and its outcome checked, then the totals are printed.

    python bench/fault_bench.py [--quick] [--out bench/results/faults.md]

Bad inputs (each must be refused with a clear error that names the file or record, and leave
nothing behind): decompression bombs and fake image headers given to a converter, hostile shard
names and empty lists in dataset.json, a bomb and a non-image record inside a shard, an empty
validation split, a bad export name, a learning rate of 1e6. Faults (each must be survived with
nothing lost): a converter SIGKILLed between its shard renames, stale temporaries of killed
writers, a second training on a busy run folder, a kill right after an export, a kill inside an
evaluation interval (the resumed run must be bit-identical with --deterministic).

--quick keeps the cases that need no training and no subprocess running TensorFlow
(tests/test_fault_bench.py runs them). The serving cases (compact oversized tensors, bombs sent
to a server process, malformed requests, version faults under gRPC and REST traffic) are
bench/fault_serving.py's `run(workdir, quick)`: its figures are added to the totals (requests
sent / failed come from it alone) and its report, with the server's peak RSS, is printed;
--no_serving leaves them out.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import io
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # image_bombs: bombs built from bytes

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from image_bombs import jpeg_header, png_bomb  # noqa: E402
from imcl_tf import data  # noqa: E402
from tfrecords_tools import common, manifest  # noqa: E402

BAD_INPUT, FAULT = "bad input", "fault"


@dataclasses.dataclass
class Outcome:
    """One case: `ok` means rejected clearly (bad input) or survived with nothing lost (fault)."""
    kind: str
    name: str
    ok: bool
    detail: str
    requests_sent: int = 0
    requests_failed: int = 0
    records_lost: int = 0
    tried: int = 1  # inputs tried or faults injected by this outcome (many for serving's)
    passed: int | None = None  # of them rejected clearly / survived (default: 1 if ok)

    def __post_init__(self):
        if self.passed is None:
            self.passed = int(self.ok) * self.tried


class Case:
    def __init__(self, kind: str, name: str, quick: bool, function: Callable[[str], str]):
        self.kind, self.name, self.quick, self.function = kind, name, quick, function


CASES: list[Case] = []


def case(kind: str, name: str, quick: bool = True):
    def register(function):
        CASES.append(Case(kind, name, quick, function))
        return function
    return register


class Failed(AssertionError):
    """A case whose outcome is wrong: the message says how."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Failed(what)


def refused(action: Callable[[], object], errors, *parts: str) -> str:
    """The message of the error `action` must raise; every part must be in it."""
    try:
        action()
    except errors as e:
        message = str(e)
        missing = [part for part in parts if part not in message]
        expect(not missing, f"the error does not name {missing}: {message}")
        expect("Traceback" not in message, "a traceback in the message")
        return message.splitlines()[0][:160]
    raise Failed("accepted")


# ---- fixtures -----------------------------------------------------------------------------------


def small_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return tf.io.encode_png(rng.integers(0, 256, [8, 8, 3], dtype=np.uint8)).numpy()


def write_dataset(out: str, num: int = 6, num_shards: int = 2, last_image: bytes | None = None,
                  splits=("train",)) -> data.DatasetInfo:
    infos = {}
    for split in splits:
        with data.SplitWriter(out, split, num_shards) as writer:
            for i in range(num):
                image = last_image if last_image is not None and i == num - 1 else small_png(i)
                writer.write(data.make_example(f"{split}-{i}", [i % 3], [(i + 1) % 3], 3,
                                               encoded_image=image))
        infos[split] = writer.split_info
    info = data.DatasetInfo(class_names=["a", "b", "c"], splits=infos, image_size=8)
    data.save_dataset_info(out, info)
    return info


def manifest_argv(root: str, image: bytes, name: str) -> list[str]:
    photos = os.path.join(root, "photos")
    os.makedirs(photos, exist_ok=True)
    for index in range(2):
        with open(os.path.join(photos, f"ok{index}.png"), "wb") as f:
            f.write(small_png(index))
    with open(os.path.join(photos, name), "wb") as f:
        f.write(image)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.write("cat\ndog\n")
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.write(f"image,positives,negatives\nok0.png,cat,\n{name},dog,\nok1.png,,cat\n")
    return ["manifest", f"--manifest={root}/train.csv", f"--images_dir={photos}",
            f"--classes={root}/classes.txt", f"--output_dir={root}/out", "--num_shards=2"]


def nothing_written(out: str) -> None:
    left = os.listdir(out) if os.path.isdir(out) else []
    expect(not left, f"files left behind: {left}")


def edited(out: str, edit: Callable[[dict], None]) -> None:
    path = os.path.join(out, data.DATASET_JSON)
    with open(path) as f:
        obj = json.load(f)
    edit(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


# ---- bad inputs ---------------------------------------------------------------------------------


@case(BAD_INPUT, "converter: 20000 x 20000 PNG bomb (48 KB)")
def png_bomb_to_converter(root):
    argv = manifest_argv(root, png_bomb(20000, 20000), "bomb.png")
    message = refused(lambda: manifest.run(argv), common.ImageError, "bomb.png",
                      "20000 x 20000", "--max_image_pixels")
    nothing_written(os.path.join(root, "out"))
    return message


@case(BAD_INPUT, "converter: JPEG header claiming 65535 x 65535")
def fake_jpeg_to_converter(root):
    argv = manifest_argv(root, jpeg_header(65535, 65535) + b"\xff\xd9", "huge.jpg")
    message = refused(lambda: manifest.run(argv), common.ImageError, "huge.jpg",
                      "65535 x 65535", "--max_image_pixels")
    nothing_written(os.path.join(root, "out"))
    return message


@case(BAD_INPUT, "converter: non-image bytes named .png")
def text_to_converter(root):
    argv = manifest_argv(root, b"<html>not an image</html>", "page.png")
    message = refused(lambda: manifest.run(argv), common.ImageError, "page.png",
                      "not a JPEG or PNG")
    nothing_written(os.path.join(root, "out"))
    return message


def shard_name_case(bad_name):
    def check(root):
        out = os.path.join(root, "data")
        write_dataset(out)
        victim = os.path.join(root, "outside.tfrecord")
        with open(victim, "wb") as f:
            f.write(b"precious")
        edited(out, lambda obj: obj["splits"]["train"]["shards"].__setitem__(
            0, bad_name if bad_name != "ABS" else victim))
        messages = [refused(action, data.DataError, "not a plain file name")
                    for action in (lambda: data.load_dataset_info(out),
                                   lambda: data.verify_dataset(out),
                                   lambda: data.make_dataset(out, "train", batch_size=2))]
        # A converter writing into the folder refuses it too, and deletes nothing it lists.
        refused(lambda: common.convert_split(
            [common.Record("x", [0], [], image_bytes=small_png(0))], output_dir=out,
            class_names=["a", "b", "c"], converter="bench", stream=io.StringIO()),
            data.DataError, "not a plain file name")
        with open(victim, "rb") as f:
            expect(f.read() == b"precious", "a file outside the dataset folder was touched")
        return messages[0]
    return check


case(BAD_INPUT, "dataset.json: shard '../outside.tfrecord'")(shard_name_case("../outside.tfrecord"))
case(BAD_INPUT, "dataset.json: shard by absolute path")(shard_name_case("ABS"))


@case(BAD_INPUT, 'dataset.json: "shards": [] and "splits": []')
def empty_lists(root):
    out = os.path.join(root, "data")
    write_dataset(out)
    edited(out, lambda obj: obj["splits"]["train"].update(shards=[]))
    first = refused(lambda: data.load_dataset_info(out), data.DataError, "lists no shards")
    edited(out, lambda obj: obj.update(splits=[]))
    refused(lambda: data.load_dataset_info(out), data.DataError, '"splits" must be')
    return first


@case(BAD_INPUT, "shard: a PNG bomb record, verified before training")
def bomb_in_shard(root):
    out = os.path.join(root, "data")
    info = write_dataset(out, last_image=png_bomb(20000, 20000))
    message = refused(lambda: data.verify_dataset(out, max_image_pixels=50_000_000),
                      data.DataError, info.splits["train"].shards[1], "record 2",
                      "20000 x 20000", "--max_image_pixels")
    refused(lambda: next(iter(data.make_dataset(out, "train", batch_size=6))),
            tf.errors.InvalidArgumentError, "train-5", "20000 x 20000")
    return message


@case(BAD_INPUT, "shard: a record whose image bytes are not an image")
def text_in_shard(root):
    out = os.path.join(root, "data")
    info = write_dataset(out, last_image=b"plain text, no image")
    return refused(lambda: data.verify_dataset(out, max_image_pixels=50_000_000), data.DataError,
                   info.splits["train"].shards[1], "record 2", "train-5")


@case(BAD_INPUT, "training: empty validation split, bad --export_model_name")
def late_options(root):
    from imcl_tf.training.config import TrainConfig
    out = os.path.join(root, "data")
    write_dataset(out, splits=("train", "val"))
    config = TrainConfig(data_dir=out, model_dir=os.path.join(root, "run"),
                         export_dir=os.path.join(root, "exports"), export_model_name="a/b")
    message = refused(config.validate, ValueError, "--export_model_name")
    edited(out, lambda obj: obj["splits"]["val"].update(num_examples=0, shard_sizes=[0, 0]))
    refused(TrainConfig(data_dir=out, model_dir=os.path.join(root, "run")).validate, ValueError,
            "--val_split", "is empty")
    nothing_written(os.path.join(root, "run"))
    return message


@case(BAD_INPUT, "training: --learning_rate=1e6 (divergence)", quick=False)
def learning_rate_1e6(root):
    from imcl_tf.training.config import TrainConfig
    from imcl_tf.training.run_files import RunError
    from imcl_tf.training.trainer import run
    out = os.path.join(root, "data")
    write_dataset(out, num=16, num_shards=1, splits=("train", "val"))
    exports = os.path.join(root, "exports")
    config = TrainConfig(data_dir=out, model_dir=os.path.join(root, "run"), method="logistic",
                         train_steps=40, eval_every=20, batch_size=4, learning_rate=1e6,
                         verbose=0, export_dir=exports, export_model_name="m")
    message = refused(lambda: run(config), RunError, "training diverged", "--learning_rate")
    expect(not os.path.exists(exports), "a diverged run was exported")
    return message


# ---- faults -------------------------------------------------------------------------------------

REBUILD = """
import os, signal, sys
import tensorflow as tf
sys.path.insert(0, {root!r})
from bench.fault_bench import rebuild
kill_at = int(sys.argv[3])
if kill_at:
    rename, calls = tf.io.gfile.rename, [0]
    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return rename(*args, **kwargs)
    tf.io.gfile.rename = dying
rebuild(sys.argv[1], int(sys.argv[2]))
"""


def rebuild(out: str, build: int) -> None:
    """Converts 12 records whose labels depend on `build`, into 4 shards of `out`."""
    records = [common.Record(f"img-{i}", [(i + build) % 3], [], source=f"row {i}",
                             image_bytes=small_png(i)) for i in range(12)]
    common.convert_split(records, output_dir=out, class_names=["a", "b", "c"], converter="bench",
                         num_shards=4, shuffle=False, num_workers=1, stream=io.StringIO())


def labels_by_id(out: str) -> dict[str, int]:
    _, labels, ids = data.load_split_arrays(out, "train", image_size=8, string_ids=True)
    return {i.decode(): int(np.argmax(row)) for i, row in zip(ids, labels)}


def lost_records(out: str, build: int) -> int:
    found = labels_by_id(out)
    return sum(found.get(f"img-{i}") != (i + build) % 3 for i in range(12))


@case(FAULT, "converter SIGKILLed between shard renames of a rebuild", quick=False)
def killed_rebuild(root):
    out = os.path.join(root, "data")
    rebuild(out, 0)
    before = sorted(os.listdir(out))
    script = os.path.join(root, "rebuild.py")
    with open(script, "w") as f:
        f.write(REBUILD.format(root=ROOT))
    result = subprocess.run([sys.executable, script, out, "1", "3"], capture_output=True,
                            env={**os.environ, "PYTHONPATH": ROOT})
    expect(result.returncode == -signal.SIGKILL, f"not killed: {result.returncode}")
    data.verify_dataset(out)
    expect(lost_records(out, 0) == 0, "the published dataset is not the old one")
    rebuild(out, 1)  # the next run
    lost = lost_records(out, 1)
    listed = data.load_dataset_info(out).splits["train"].shards
    expect(sorted(os.listdir(out)) == sorted(["dataset.json"] + listed),
           f"leftovers not cleaned: {sorted(set(os.listdir(out)) - set(listed))}")
    expect(lost == 0, f"{lost} records lost")
    return f"old dataset intact ({len(before) - 1} shards), rebuilt after, leftovers removed"


@case(FAULT, "converter crashing between shard renames (in process)")
def crashed_rebuild(root):
    out = os.path.join(root, "data")
    rebuild(out, 0)
    rename, calls = tf.io.gfile.rename, [0]

    def crashing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError("injected: disk gone")
        return rename(*args, **kwargs)
    tf.io.gfile.rename = crashing
    try:
        refused(lambda: rebuild(out, 1), OSError, "injected")
    finally:
        tf.io.gfile.rename = rename
    data.verify_dataset(out)
    expect(lost_records(out, 0) == 0, "the published dataset is not the old one")
    rebuild(out, 1)
    expect(lost_records(out, 1) == 0, "records lost in the rebuild")
    listed = data.load_dataset_info(out).splits["train"].shards
    expect(sorted(os.listdir(out)) == sorted(["dataset.json"] + listed), "leftovers not cleaned")
    return "old dataset intact, rebuilt after, leftovers removed"


@case(FAULT, "stale *.tmp-<pid> files of killed writers")
def stale_temporaries(root):
    out = os.path.join(root, "data")
    os.makedirs(out)
    stale = [".train-00000-of-00002.tfrecord.tmp-4199999", "dataset.json.tmp-4199999"]
    for name in stale:
        with open(os.path.join(out, name), "wb") as f:
            f.write(b"half")
    write_dataset(out)
    expect(not set(stale) & set(os.listdir(out)), "stale temporaries kept")
    return f"{len(stale)} removed on the next write"


HOLDER = ("import fcntl, sys, time\nf = open(sys.argv[1], 'a+')\nfcntl.flock(f, fcntl.LOCK_EX)\n"
          "f.write('pid holder'); f.flush()\nprint('locked', flush=True)\ntime.sleep(60)\n")


@case(FAULT, "a second training on a busy --model_dir")
def busy_folder(root):
    from imcl_tf.training.config import TrainConfig
    from imcl_tf.training.run_files import RUN_LOCK, RunError
    from imcl_tf.training.trainer import run
    out = os.path.join(root, "data")
    write_dataset(out, splits=("train", "val"))
    model_dir = os.path.join(root, "run")
    os.makedirs(model_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, os.path.join(model_dir, RUN_LOCK)],
                              stdout=subprocess.PIPE, text=True)
    try:
        expect(holder.stdout.readline().strip() == "locked", "the holder did not lock")
        config = TrainConfig(data_dir=out, model_dir=model_dir, method="logistic",
                             train_steps=2, batch_size=2, verbose=0)
        message = refused(lambda: run(config), RunError, "is in use by another training")
        expect(os.listdir(model_dir) == [RUN_LOCK], "the second training wrote files")
    finally:
        holder.kill()
        holder.wait()
    return message


class Killed(BaseException):
    """Raised in place of a SIGKILL by the in-process training faults."""


@case(FAULT, "a kill right after an export's rename", quick=False)
def killed_after_export(root):
    from imcl_tf import export
    from imcl_tf.training.config import TrainConfig
    from imcl_tf.training.trainer import run
    out = os.path.join(root, "data")
    write_dataset(out, num=8, num_shards=1, splits=("train", "val"))
    exports = os.path.join(root, "exports")
    config = TrainConfig(data_dir=out, model_dir=os.path.join(root, "run"), method="logistic",
                         train_steps=2, batch_size=4, verbose=0, export_dir=exports,
                         export_model_name="m")
    original = export.export_from_model_dir

    def export_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise Killed()
    export.export_from_model_dir = export_then_die
    try:
        run(config)
    except Killed:
        pass
    finally:
        export.export_from_model_dir = original
    run(config)
    versions = export.list_versions(os.path.join(exports, "m"))
    expect(versions == [1], f"versions after the restart: {versions}")
    return "restart reused version 1"


@case(FAULT, "a kill inside an evaluation interval, resumed (--deterministic)", quick=False)
def killed_mid_interval(root):
    from imcl_tf.training.callbacks import TrainingMonitor
    from imcl_tf.training.config import TrainConfig
    from imcl_tf.training.trainer import run
    out = os.path.join(root, "data")
    write_dataset(out, num=16, num_shards=2, splits=("train", "val"))
    options = dict(data_dir=out, method="logistic", train_steps=10, eval_every=6,
                   checkpoint_every=2, batch_size=4, augment=True, seed=1, verbose=0,
                   deterministic=True)
    run(TrainConfig(model_dir=os.path.join(root, "whole"), **options))
    original = TrainingMonitor.on_train_batch_end

    def dying(self, batch, logs=None):
        original(self, batch, logs)
        if int(self.model.optimizer.iterations.numpy()) == 3:
            raise Killed()
    TrainingMonitor.on_train_batch_end = dying
    try:
        run(TrainConfig(model_dir=os.path.join(root, "killed"), **options))
    except Killed:
        pass
    finally:
        TrainingMonitor.on_train_batch_end = original
    run(TrainConfig(model_dir=os.path.join(root, "killed"), **options))
    whole = tf.train.load_checkpoint(os.path.join(root, "whole", "checkpoints", "ckpt-10"))
    resumed = tf.train.load_checkpoint(os.path.join(root, "killed", "checkpoints", "ckpt-10"))
    keys = [k for k in whole.get_variable_to_shape_map() if k.startswith(("model/", "optimizer/"))]
    differ = [k for k in keys if not np.array_equal(whole.get_tensor(k), resumed.get_tensor(k))]
    expect(not differ, f"{len(differ)} of {len(keys)} arrays differ, e.g. {differ[:2]}")
    return f"resumed at step 2, {len(keys)} arrays bit-identical at step 10"


# ---- the run ------------------------------------------------------------------------------------


def run_serving_cases(quick: bool, stream=sys.stdout) -> list[Outcome] | None:
    """bench/fault_serving.py's battery as Outcomes (None when the module is absent)."""
    try:
        serving = importlib.import_module("bench.fault_serving")
    except ModuleNotFoundError:
        return None
    with tempfile.TemporaryDirectory(prefix="fault_serving_") as workdir:
        figures = serving.run(workdir, quick=quick)
    print(serving.format_figures(figures), file=stream, flush=True)
    outcomes = [Outcome(FAULT, f"serving: {name}", bool(survived), detail or "")
                for name, survived, detail in figures["fault_details"]]
    if len(outcomes) != figures["faults"]:  # faults reported in the totals only
        outcomes.append(Outcome(FAULT, "serving: other faults",
                                figures["survived"] - sum(o.ok for o in outcomes)
                                == figures["faults"] - len(outcomes), "",
                                tried=figures["faults"] - len(outcomes),
                                passed=figures["survived"] - sum(o.ok for o in outcomes)))
    unclear = list(figures["unclear"])
    rss = figures["rss"]
    memory = (f"server RSS {rss['after start']:.0f} MB after start, peak "
              f"{rss['peak during hostile inputs']:.0f} MB during the hostile inputs")
    outcomes.append(Outcome(BAD_INPUT, "serving: hostile and malformed requests",
                            figures["rejected"] == figures["tried"],
                            "; ".join([memory] + unclear[:3]),
                            tried=figures["tried"], passed=figures["rejected"],
                            requests_sent=figures["sent"], requests_failed=figures["failed"]))
    return outcomes


def run_battery(quick: bool = False, stream=sys.stdout, serving: bool = True
                ) -> list[Outcome]:
    outcomes = []
    for item in CASES:
        if quick and not item.quick:
            continue
        root = tempfile.mkdtemp(prefix="fault_bench_")
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                detail = item.function(root).replace(root, "<case>")
            outcome = Outcome(item.kind, item.name, True, detail)
        except Exception as e:  # a wrong outcome or an unexpected error: the case failed
            detail = f"{type(e).__name__}: {e}" if isinstance(e, Failed) else \
                traceback.format_exc(limit=3)
            outcome = Outcome(item.kind, item.name, False, detail)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        outcomes.append(outcome)
        print(f"[{'ok' if outcome.ok else 'FAILED'}] {item.kind}: {item.name}: "
              f"{outcome.detail.splitlines()[0] if outcome.detail else ''}", file=stream,
              flush=True)
    if serving:
        results = run_serving_cases(quick, stream)
        if results is None:
            print("serving cases: bench/fault_serving.py is not present; not run", file=stream)
        else:
            outcomes.extend(results)
    return outcomes


def totals(outcomes: list[Outcome]) -> dict[str, int]:
    bad = [o for o in outcomes if o.kind == BAD_INPUT]
    faults = [o for o in outcomes if o.kind == FAULT]
    return {
        "requests_sent": sum(o.requests_sent for o in outcomes),
        "requests_failed": sum(o.requests_failed for o in outcomes),
        "faults_injected": sum(o.tried for o in faults),
        "faults_survived": sum(o.passed for o in faults),
        "bad_inputs_tried": sum(o.tried for o in bad),
        "bad_inputs_rejected_clearly": sum(o.passed for o in bad),
        "records_lost": sum(o.records_lost for o in outcomes),
    }


def format_totals(figures: dict[str, int], serving_run: bool) -> str:
    requests = (f"{figures['requests_sent']} / {figures['requests_failed']}" if serving_run
                else "none sent (serving cases not run)")
    return (f"requests sent / failed: {requests}\n"
            f"faults injected / survived: {figures['faults_injected']} / "
            f"{figures['faults_survived']}\n"
            f"bad inputs tried / rejected clearly: {figures['bad_inputs_tried']} / "
            f"{figures['bad_inputs_rejected_clearly']}\n"
            f"records lost: {figures['records_lost']}")


def write_results(path: str, outcomes: list[Outcome], figures: dict[str, int], command: str,
                  serving_run: bool) -> None:
    load = os.getloadavg()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# Fault battery: data, training and serving", "", f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()}-core CPU, no GPU, shared with other jobs (load average "
             f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end); Python "
             f"{platform.python_version()}, TensorFlow {tf.__version__}. Date: {now}.", "",
             "```", format_totals(figures, serving_run), "```", "",
             "| kind | case | outcome |", "|---|---|---|"]
    temp = tempfile.gettempdir()
    for o in outcomes:
        detail = o.detail.splitlines()[0].replace("|", "\\|") if o.detail else ""
        detail = re.sub(re.escape(temp) + r"/[^\s/)']+", "<tmp>", detail)
        lines.append(f"| {o.kind} | {o.name} | {'ok' if o.ok else 'FAILED'}: {detail} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="cheap cases only")
    parser.add_argument("--out", help="write a results section (markdown) here")
    parser.add_argument("--no_serving", action="store_true",
                        help="leave out bench/fault_serving.py's server cases")
    args = parser.parse_args(argv)
    started = datetime.datetime.now()
    outcomes = run_battery(args.quick, serving=not args.no_serving)
    print(f"battery time: {(datetime.datetime.now() - started).total_seconds():.0f} s")
    figures = totals(outcomes)
    serving_run = any(o.requests_sent for o in outcomes)
    print(format_totals(figures, serving_run))
    if args.out:
        command = ("python bench/fault_bench.py" + (" --quick" if args.quick else "")
                   + (" --no_serving" if args.no_serving else "") + f" --out={args.out}")
        write_results(args.out, outcomes, figures, command, serving_run)
    return 0 if all(o.ok for o in outcomes) and not figures["records_lost"] else 1


if __name__ == "__main__":
    sys.exit(main())

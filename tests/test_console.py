"""The console layer: quiet TensorFlow start-up, log lines, the live bar, flagfile names."""

import io
import logging
import os

import pytest
from absl import flags

from imcl_tf import console, flagfiles

STARTUP_LINES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796217859.205043   23599 port.cc:153] oneDNN custom operations are on. You may "
    "see slightly different numerical results.",
    "I0000 00:00:1796217859.205568   23599 cudart_stub.cc:31] Could not find cuda drivers on your "
    "machine, GPU will not be used.",
    "I0000 00:00:1796217859.385600   23599 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.",
    "E0000 00:00:1796218185.349625   31342 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
]


@pytest.mark.parametrize("line", STARTUP_LINES, ids=range(len(STARTUP_LINES)))
def test_startup_noise_is_recognised(line):
    assert console._STARTUP_NOISE.match(line)


@pytest.mark.parametrize("line", [
    "E0000 00:00:1796218185.349625   31342 op_kernel.cc:52] OP_REQUIRES failed: out of memory",
    "Traceback (most recent call last):",
    "ImportError: libcudnn.so.9: cannot open shared object file",
])
def test_other_lines_are_kept(line):
    assert not console._STARTUP_NOISE.match(line)


def record(path, level=logging.INFO, message="hello %s", args=("there",)):
    return logging.LogRecord("absl", level, path, 1, message, args, None)


def test_info_lines_of_other_libraries_are_dropped_warnings_kept():
    keep = console._OwnInfoOnly()
    package = os.path.dirname(os.path.abspath(console.__file__))
    assert keep.filter(record(os.path.join(package, "training", "trainer.py")))
    foreign = os.path.join(os.sep, "venv", "tensorflow", "python", "checkpoint", "saver.py")
    assert not keep.filter(record(foreign))
    assert keep.filter(record(foreign, logging.WARNING))
    formatter = console._PlainFormatter()
    assert formatter.format(record(foreign)) == "hello there"
    assert formatter.format(record(foreign, logging.WARNING)) == "WARNING: hello there"


def test_user_errors_and_messages():
    assert console.is_user_error(ValueError("x"))
    assert console.is_user_error(FileNotFoundError(2, "No such file or directory", "a.txt"))
    assert console.is_user_error(FileNotFoundError("model_config.json not found: ..."))
    assert console.is_user_error(OSError(28, "No space left on device"))
    assert not console.is_user_error(OSError(5, "Input/output error"))
    assert not console.is_user_error(KeyError("x"))
    assert not console.is_user_error(TypeError("x"))
    assert console.error_message(FileNotFoundError(2, "No such file", "a.txt")) == \
        "[Errno 2] No such file: 'a.txt'"
    assert console.error_message(ValueError("first\nsecond\nthird")) == "first second"


def test_flag_errors_name_their_flagfile_line():
    arguments = [flagfiles.Argument("--k=3", "a.flags:2"), flagfiles.Argument("--nofeature_loss",
                                                                              "b.flags:7"),
                 flagfiles.Argument("--k=4")]
    assert flagfiles.origin_of_flag(arguments, "k") is None  # the command line's --k wins
    assert flagfiles.origin_of_flag(arguments, "feature_loss") == "b.flags:7"
    error = flags.UnrecognizedFlagError("feature_loss")
    assert console.flag_error_origin(error, lambda name: flagfiles.origin_of_flag(
        arguments, name)).startswith("b.flags:7: ")


def test_shipped_configs_are_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"demo", "cub", "coco", "openimages", "voc", "paper_common"} <= set(
        flagfiles.shipped_configs())
    demo = flagfiles.resolve_flagfile("demo")
    assert demo == flagfiles.resolve_flagfile("demo.flags") == os.path.join(
        flagfiles.CONFIG_DIR, "demo.flags")
    (tmp_path / "demo").write_text("--k=9\n")  # a file of that name in the working directory wins
    assert flagfiles.resolve_flagfile("demo") == str(tmp_path / "demo")
    # cub.flags includes paper_common.flags beside it, whatever the working directory
    expanded = flagfiles.expand_flagfiles(["--flagfile=cub"])
    [optimizer] = [a for a in expanded if a.text.startswith("--optimizer")]
    assert optimizer.text == "--optimizer=rmsprop"
    common = os.path.join(flagfiles.CONFIG_DIR, "paper_common.flags")
    with open(common, encoding="utf-8") as f:
        line = 1 + [text.strip() for text in f].index("--optimizer=rmsprop")
    assert optimizer.origin == f"{common}:{line}"


def test_live_bar_runs_once_over_the_whole_run_and_shows_val_map(monkeypatch):
    from imcl_tf.training import progress

    now = [100.0]
    monkeypatch.setattr(progress.time, "time", lambda: now[0])
    stream = io.StringIO()
    bar = progress.LiveBar(total_steps=40, stream=stream, width=10, min_seconds=0.0)
    bar.start_interval(0)
    now[0] += 10
    bar.update(10, loss=0.5)
    assert stream.getvalue() == "\rstep 10/40 [==>.......] 25% | loss 0.5000 | ETA 0:00:30"
    bar.clear()
    bar.val_map = 0.61234
    bar.start_interval(20)  # the second interval continues at step 20, not from 0
    now[0] += 4
    bar.update(30, loss=float("nan"))
    last = stream.getvalue().split("\r")[-1]
    assert last == "step 30/40 [=======>..] 75% | val mAP 0.6123 | ETA 0:00:04"
    assert not progress.shows_live_bar(1, io.StringIO())  # no terminal: interval lines only


def test_the_fashion_mnist_files_are_found_or_every_searched_folder_is_named(tmp_path,
                                                                               monkeypatch):
    from imcl_tf import fashion_mnist_files as files

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(files, "REPOSITORY_DIR", str(tmp_path / "repo" / "data" / "fashion-mnist"))
    monkeypatch.delenv(files.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="none of .*repo.*fashion-mnist.*--fashion_mnist_dir"):
        files.find_dir()
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in files.FILES[:3]:
        (mine / name).write_bytes(b"")
    monkeypatch.setenv(files.ENV_VAR, str(mine))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz are not in"):
        files.find_dir(str(mine))
    (mine / files.FILES[3]).write_bytes(b"")
    assert files.find_dir() == str(mine) == files.default_dir()

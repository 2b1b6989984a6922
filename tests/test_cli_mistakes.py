"""User mistakes through the console commands: one or two lines (what, where, what to do), a
non-zero exit, never a traceback (unless --debug).

The fast cases are answered before TensorFlow is imported (about half a second each); the cases
that need a dataset or a model are marked slow.
"""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The module behind each console command (pyproject.toml [project.scripts]).
COMMANDS = {"imcl-train": "imcl_tf.train", "imcl-evaluate": "imcl_tf.evaluate_cli",
            "imcl-export": "imcl_tf.export_cli", "imcl-predict": "imcl_tf.predict",
            "imcl-data": "tfrecords_tools.commands", "imcl-demo": "imcl_tf.demo"}


def cli(command, *arguments, cwd=None):
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the commands must quieten TensorFlow themselves
    return subprocess.run([sys.executable, "-m", COMMANDS[command], *arguments],
                          capture_output=True, text=True, cwd=cwd or REPO_ROOT, env=env,
                          timeout=600)


def assert_one_line_error(done, command, *fragments, status=None):
    """A non-zero exit, stderr of at most two lines starting `command: error:`, no traceback."""
    assert done.returncode != 0, done.stdout + done.stderr
    if status is not None:
        assert done.returncode == status
    lines = done.stderr.strip().splitlines()
    assert 1 <= len(lines) <= 2, done.stderr
    assert lines[0].startswith(f"{command}: error: "), done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---- answered before TensorFlow is imported --------------------------------------------------


FAST_MISTAKES = [
    ("imcl-train", ["--backbone=resnet18"], ["--backbone=resnet18", "small_cnn"]),
    ("imcl-train", ["--flagfile=no_such_config"], ["does not exist", "demo"]),
    ("imcl-train", ["--lamda_y=0.5"], ["Unknown command line flag 'lamda_y'", "lambda_y"]),
    ("imcl-train", ["--flagfile=demo", "--k=0", "--data_dir=d", "--model_dir=m"],
     ["--k: must be in [1, 8]"]),
    ("imcl-train", ["--flagfile=demo", "--model_dir=m"], ["--data_dir: is required"]),
    ("imcl-train", ["--flagfile=demo", "--data_dir=d", "--model_dir=m", "extra"],
     ["unexpected positional arguments ['extra']"]),
    ("imcl-train", ["--data_dir=d", "--model_dir=m", "--method=logistic", "--warm_start=auto"],
     ["--warm_start: 'auto' trains a logistic baseline first"]),
    ("imcl-train", ["--data_dir=d", "--model_dir=m", "--label_graph=graph.txt"],
     ["--label_graph: must be identity, cooccurrence or a .npy file"]),
    ("imcl-evaluate", ["--data_dir=d"], ["--model_dir"]),
    ("imcl-evaluate", ["--model_dir=/no/such/run", "--data_dir=d"],
     ["--model_dir='/no/such/run' is not a folder"]),
    ("imcl-export", ["--model_dir=/no/such/run", "--export_base=e", "--model_name=m"],
     ["is not a folder"]),
    ("imcl-export", ["--model_dir=r", "--export_base=e", "--model_name=m", "--top_k=0"],
     ["--top_k"]),
    ("imcl-predict", ["--model=r"], ["give the images to label"]),
    ("imcl-predict", [REPO_ROOT, "--model=/no/such/run"], ["no .jpg/.jpeg/.png images"]),
    ("imcl-predict", ["/no/such/folder", "--model=r"], ["no such file or folder"]),
    ("imcl-predict", ["x.jpg", "--model=r", "--output=labels.txt"], [".csv or .json"]),
    ("imcl-data", ["vocc"], ["no tool 'vocc'", "did you mean voc"]),
]


@pytest.mark.parametrize("command,arguments,fragments", FAST_MISTAKES,
                         ids=[f"{c} {' '.join(a)}" for c, a, _ in FAST_MISTAKES])
def test_a_mistake_is_one_line(command, arguments, fragments, tmp_path):
    assert_one_line_error(cli(command, *arguments, cwd=str(tmp_path)), command, *fragments)


def test_a_bad_flag_inside_a_flagfile_names_the_file_and_line(tmp_path):
    misspelt = write(tmp_path / "mine.flags", "# my settings\n--flagfile=demo\n--lamda_f=0.2\n")
    done = cli("imcl-train", f"--flagfile={misspelt}", cwd=str(tmp_path))
    assert_one_line_error(done, "imcl-train", f"{misspelt}:3:", "lamda_f", status=2)
    bad_value = write(tmp_path / "value.flags", "--k=three\n")
    done = cli("imcl-train", f"--flagfile={bad_value}", cwd=str(tmp_path))
    assert_one_line_error(done, "imcl-train", f"{bad_value}:1:", "--k=three")
    # A bad value found by validation (not by absl) is also traced to its line.
    out_of_range = write(tmp_path / "range.flags", "--data_dir=d\n--model_dir=m\n--k=-2\n")
    done = cli("imcl-train", f"--flagfile={out_of_range}", cwd=str(tmp_path))
    assert_one_line_error(done, "imcl-train", f"{out_of_range}:3:", "--k: must be in [1, 8]")


def test_a_flagfile_that_includes_itself(tmp_path):
    loop = write(tmp_path / "loop.flags", "--k=2\n--flagfile=loop.flags\n")
    assert_one_line_error(cli("imcl-train", f"--flagfile={loop}"), "imcl-train",
                          "includes itself")


def test_usage_errors_do_not_print_the_help_page(tmp_path):
    done = cli("imcl-train", "--flagfile=demo", "--data_dir=d", "--model_dir=m", "extra")
    assert len(done.stderr.splitlines()) == 2 and "--help" in done.stderr
    assert done.stdout == ""


def test_debug_shows_the_traceback(tmp_path):
    done = cli("imcl-train", "--flagfile=demo", "--data_dir=d", "--model_dir=m", "--k=0",
               "--debug")
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_help_is_complete_and_needs_no_tensorflow():
    done = cli("imcl-train", "--help")
    for name in ("--data_dir", "--warm_start", "--strategy", "--[no]mixed_precision", "--debug",
                 "--flagfile"):
        assert name in done.stdout, name
    assert "tensorflow" not in done.stderr.lower()
    listing = cli("imcl-data")
    for tool in ("voc", "coco", "cub", "openimages", "manifest", "partial", "inspect",
                 "fashion_scenes"):
        assert f"\n  {tool} " in listing.stdout


# ---- mistakes that need a dataset or a model (TensorFlow imported) ---------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tests.test_train_common import write_dataset

    return write_dataset(str(tmp_path_factory.mktemp("mistakes") / "data"), num_train=16,
                         num_val=8, num_shards=2)


@pytest.mark.slow
def test_not_a_dataset_and_a_wrong_warm_start(dataset, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = cli("imcl-train", "--flagfile=demo", f"--data_dir={empty}",
               f"--model_dir={tmp_path / 'run'}")
    assert_one_line_error(done, "imcl-train", "has no dataset.json", "imcl-data")
    done = cli("imcl-train", "--flagfile=demo", f"--data_dir={dataset}",
               f"--model_dir={tmp_path / 'run'}", f"--warm_start={empty}")
    assert_one_line_error(done, "imcl-train", "--warm_start", "is not the model_dir of a "
                          "finished run")
    assert not os.path.exists(tmp_path / "run")
    # the start-up lines of TensorFlow are filtered
    assert "oneDNN" not in done.stderr and "absl::InitializeLog" not in done.stderr


@pytest.mark.slow
def test_a_truncated_shard(dataset, tmp_path):
    import shutil

    damaged = str(tmp_path / "damaged")
    shutil.copytree(dataset, damaged)
    shard = sorted(f for f in os.listdir(damaged) if f.startswith("train"))[0]
    path = os.path.join(damaged, shard)
    with open(path, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
        f.write(content[:len(content) // 2])
    done = cli("imcl-train", "--flagfile=demo", f"--data_dir={damaged}",
               f"--model_dir={tmp_path / 'run'}", "--train_steps=2")
    assert_one_line_error(done, "imcl-train", shard)
    done = cli("imcl-data", "inspect", damaged)
    assert done.returncode != 0 and "Traceback" not in done.stderr and shard in done.stderr


@pytest.mark.slow
def test_evaluate_and_predict_with_something_that_is_not_a_run(dataset, tmp_path):
    import numpy as np
    import tensorflow as tf

    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir()
    done = cli("imcl-evaluate", f"--model_dir={not_a_run}", f"--data_dir={dataset}",
               "--split=val")
    assert_one_line_error(done, "imcl-evaluate", str(not_a_run))
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(tf.io.encode_png(np.zeros([8, 8, 3], np.uint8)).numpy())
    done = cli("imcl-predict", str(images), f"--model={not_a_run}")
    assert_one_line_error(done, "imcl-predict", "neither a training run")

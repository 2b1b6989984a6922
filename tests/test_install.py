"""`pip install .` (not editable) into a fresh venv: the console commands and the shipped configs
work from another folder. The venv reuses this interpreter's installed dependencies through a
.pth file (no download), and the package is built from a copy of the tracked files."""

import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tracked_files():
    done = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode:
        pytest.skip("not a git checkout")
    return [f for f in done.stdout.splitlines() if not f.startswith("data/")]


@pytest.mark.slow
def test_a_non_editable_install_runs_from_another_folder(tmp_path):
    from tests.test_train_common import write_dataset

    source = tmp_path / "source"
    for name in tracked_files():
        if os.path.isfile(os.path.join(REPO_ROOT, name)):
            os.makedirs(source / os.path.dirname(name), exist_ok=True)
            shutil.copy2(os.path.join(REPO_ROOT, name), source / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()"
                              "['purelib'])"], capture_output=True, text=True,
                             check=True).stdout.strip()
    with open(os.path.join(purelib, "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps",
                           "--no-build-isolation", str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL")}
    env["PATH"] = str(venv / "bin") + os.pathsep + env.get("PATH", "")

    def run(*command):
        return subprocess.run(list(command), cwd=str(elsewhere), capture_output=True, text=True,
                              env=env, timeout=600)

    where = run(python, "-c", "import imcl_tf, os; from imcl_tf import flagfiles; "
                "print(imcl_tf.__file__, os.path.isfile(flagfiles.shipped_config_path('demo')))")
    assert where.stdout.startswith(purelib) and where.stdout.split()[1] == "True", \
        where.stdout + where.stderr
    for command in ("imcl-train", "imcl-evaluate", "imcl-export", "imcl-predict", "imcl-demo"):
        helped = run(command, "--help")
        assert helped.returncode == 0 and "--[no]debug" in helped.stdout, (command, helped.stderr)
        assert command in helped.stdout.split("flags:")[0]  # the command's own description
    assert "fashion_scenes" in run("imcl-data").stdout
    data_dir = write_dataset(str(tmp_path / "data"), num_train=16, num_val=8, num_shards=1)
    trained = run("imcl-train", "--flagfile=demo", f"--data_dir={data_dir}",
                  f"--model_dir={tmp_path / 'run'}", "--method=logistic", "--train_steps=2",
                  "--eval_every=2", "--batch_size=8")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "step 2/2 (100%)" in trained.stdout
    assert trained.stderr == "", trained.stderr  # TensorFlow's start-up lines are filtered

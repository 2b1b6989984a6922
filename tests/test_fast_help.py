"""`--help` of every console command answers without importing TensorFlow (so at once).

Each case runs the command's entry point (pyproject.toml [project.scripts]) with `--help` in a
fresh interpreter and reports whether `tensorflow` got imported. No clock is involved: an import
of TensorFlow is what made `--help` take 10-40 s.
"""

import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# command -> (module, function) of pyproject.toml [project.scripts]
ENTRY_POINTS = {"imcl-train": ("imcl_tf.train", "run_cli"),
                "imcl-evaluate": ("imcl_tf.evaluate_cli", "run_cli"),
                "imcl-export": ("imcl_tf.export_cli", "run_cli"),
                "imcl-predict": ("imcl_tf.predict", "run_cli"),
                "imcl-demo": ("imcl_tf.demo", "run_cli"),
                "imcl-serve": ("serving.commands", "serve"),
                "imcl-client": ("serving.commands", "client"),
                "imcl-data": ("tfrecords_tools.commands", "run_cli")}

_PROBE = """
import importlib, sys
module, function, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.argv = argv
try:
    getattr(importlib.import_module(module), function)()
    status = 0
except SystemExit as done:
    status = done.code
print(f"\\nPROBE status={status} tensorflow={'tensorflow' in sys.modules}", file=sys.stderr)
"""


def help_of(command, *arguments):
    module, function = ENTRY_POINTS[command]
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _PROBE, module, function, command, *arguments,
                           "--help"], capture_output=True, text=True, cwd=REPO_ROOT, env=env,
                          timeout=600)
    probe = done.stderr.strip().splitlines()[-1]
    return done.stdout, probe


def data_tools():
    from tfrecords_tools import commands

    return list(commands.TOOLS)


@pytest.mark.parametrize("command", sorted(ENTRY_POINTS))
def test_help_imports_no_tensorflow(command):
    text, probe = help_of(command)
    assert probe == "PROBE status=0 tensorflow=False", (command, probe)
    assert "usage" in text.lower() or "flags" in text.lower(), text


@pytest.mark.parametrize("tool", data_tools())
def test_data_tool_help_imports_no_tensorflow(tool):
    text, probe = help_of("imcl-data", tool)
    assert probe == "PROBE status=0 tensorflow=False", (tool, probe)
    assert "\n  --" in text and "Try --helpfull" in text, text  # the tool's flags are listed


def test_asks_for_help():
    from tfrecords_tools.commands import asks_for_help

    for arguments in (["--help"], ["--input_dir=x", "-help"], ["--helpfull"], ["-?"],
                      ["--helpshort", "--output_dir=y"]):
        assert asks_for_help(arguments), arguments
    for arguments in ([], ["--input_dir=help"], ["--", "--help"], ["--helper=1"], ["help"]):
        assert not asks_for_help(arguments), arguments


def test_serving_help_lists_the_options():
    text, _ = help_of("imcl-serve")
    for name in ("--model_base_path", "--rest_api_port", "--max_image_pixels", "--enable_batching"):
        assert name in text, name
    assert "TensorFlow-Serving-compatible" in text  # serving/server.py's docstring
    text, _ = help_of("imcl-client")
    assert "--model_name" in text and "{serving_default,predict_images}" in text


def test_client_signatures_are_the_exported_ones():
    from imcl_tf import export
    from serving import arguments

    assert arguments.CLIENT_SIGNATURES == (export.SERVING_DEFAULT, export.PREDICT_IMAGES)

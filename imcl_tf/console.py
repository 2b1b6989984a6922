"""What every console command (imcl-train, imcl-evaluate, ...) shares: a quiet TensorFlow, one-line
errors, and `--debug` for the traceback.

`run_app(main, program=...)` replaces `absl.app.run(main)`:
  * TensorFlow's C++ start-up lines and its Python INFO messages are switched off before
    TensorFlow is imported (`quiet_tensorflow`); the package's own messages stay.
  * A bad command line (unknown flag, bad value, missing flagfile) is one line naming the flag,
    and for a flag set inside a flagfile, the file and line; then a pointer to `--help`. It
    never prints the whole help page.
  * A user mistake found while running (a ValueError such as DataError, a missing file, a damaged
    TFRecord) ends the program with `PROGRAM: error: MESSAGE` and exit status 1 (2 for usage
    errors). `--debug` shows the Python traceback instead.

This module imports neither TensorFlow nor the rest of the package.
"""

from __future__ import annotations

import errno
import logging as std_logging
import os
import re
import sys
from typing import Any, Callable, Sequence

from absl import app, flags

USAGE_EXIT = 2
HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml")
ERROR_EXIT = 1

# Python loggers of TensorFlow and its libraries whose INFO lines are not ours.
_NOISY_LOGGERS = ("tensorflow", "h5py", "matplotlib", "PIL")


def quiet_tensorflow() -> None:
    """Before TensorFlow is imported: no C++ INFO/WARNING start-up lines, no Python INFO noise.

    An explicit TF_CPP_MIN_LOG_LEVEL in the environment is kept (set it to 0 to see everything).
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in _NOISY_LOGGERS:
        std_logging.getLogger(name).setLevel(std_logging.WARNING)


# TensorFlow's start-up lines on stderr (C++ logging before absl::InitializeLog ignores
# TF_CPP_MIN_LOG_LEVEL): the oneDNN notice, the CUDA probe of a CPU-only machine, CPU features.
_STARTUP_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IWE]\d{4} [\d:.]+\s+\d+ (port|cudart_stub|cpu_feature_guard|cuda_platform|"
    r"cuda_executor|cuda_diagnostics|gpu_device|dso_loader)\.cc:\d+\]"
    r"|To enable the following instructions: .*rebuild TensorFlow)")


def import_tensorflow_quietly() -> Any:
    """Imports TensorFlow and probes its devices with its start-up lines filtered from stderr.

    The lines are written by C++ code to file descriptor 2 during the import and the first
    device query, before any log level applies; they are caught in a temporary file and every
    line that is not known start-up noise is written back to stderr.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            import tensorflow as tf
            tf.config.list_physical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode("utf-8", "replace").splitlines():
                if line.strip() and not _STARTUP_NOISE.match(line):
                    print(line, file=sys.stderr)
    tf.get_logger().setLevel(std_logging.WARNING)
    return tf


class _PlainFormatter(std_logging.Formatter):
    """Log lines for a person at a console: INFO is the bare message, others name their level."""

    def format(self, record: std_logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno == std_logging.INFO:
            return message
        return f"{record.levelname}: {message}"


# The folders of this project's packages: INFO lines logged from elsewhere (TensorFlow logs some
# through absl, e.g. "Sharding callback duration" at every checkpoint) are dropped.
_PROJECT_DIRS = tuple(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                   name) + os.sep
                      for name in ("imcl_tf", "tfrecords_tools", "serving", "bench"))


class _OwnInfoOnly(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        return record.levelno >= std_logging.WARNING or os.path.abspath(
            record.pathname).startswith(_PROJECT_DIRS)


def plain_log_lines() -> None:
    """absl's log lines without its `I1202 13:05:59.123 4242 file.py:12]` prefix, and at INFO
    only the package's own."""
    from absl import logging as absl_logging

    handler = absl_logging.get_absl_handler()
    handler.setFormatter(_PlainFormatter())
    if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
        handler.addFilter(_OwnInfoOnly())


def define_debug_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if "debug" not in flag_values:
        flags.DEFINE_boolean("debug", False, "Show the Python traceback of an error (for a bug "
                             "report) instead of the one-line message.", flag_values=flag_values)


def adopt_flags_of(module_names: Sequence[str],
                   flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Lists the flags defined by these modules in the program's own `--help`.

    absl's `--help` shows the flags of the main module; a console script's main module is the
    generated `bin/imcl-...` file, so the flags of the module that defines them are adopted.
    """
    program = sys.argv[0]
    main_module = sys.modules.get("__main__")
    if module_names and main_module is not None and not main_module.__doc__:
        # absl's --help starts with the main module's docstring: the command's own
        owner = sys.modules.get(module_names[0])
        main_module.__doc__ = getattr(owner, "__doc__", None)
    for name in list(module_names) + [__name__]:
        for flag in flag_values.get_key_flags_for_module(name):
            flag_values.register_key_flag_for_module(program, flag)


def is_user_error(error: BaseException) -> bool:
    """Whether an exception reports a user's mistake (bad input, missing file), not a bug."""
    if isinstance(error, (ValueError, flags.Error, app.UsageError, FileNotFoundError,
                          NotADirectoryError, IsADirectoryError, PermissionError,
                          FileExistsError)):
        return True
    if isinstance(error, OSError) and error.errno in (
            errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.ENOSPC, errno.EEXIST,
            errno.EADDRINUSE, errno.EROFS):
        return True
    if isinstance(error, ImportError) and "pip install" in str(error):
        return True
    tf = sys.modules.get("tensorflow")
    if tf is not None and isinstance(error, (tf.errors.DataLossError, tf.errors.NotFoundError,
                                             tf.errors.InvalidArgumentError,
                                             tf.errors.PermissionDeniedError)):
        return True
    return False


def error_message(error: BaseException) -> str:
    """The first useful line(s) of an exception's message."""
    message = getattr(error, "message", None)  # tf.errors.OpError keeps the op's message here
    text = str(message if isinstance(message, str) and message else error).strip()
    if isinstance(error, OSError) and error.filename and str(error.filename) not in text:
        text = f"{text}: {error.filename}"
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = lines[0] if len(lines) == 1 else lines[0] + " " + lines[1].strip()
    return text[:600] + (" ..." if len(text) > 600 else "")


def fail(program: str, message: str, status: int = ERROR_EXIT, hint: str | None = None) -> None:
    """Prints `PROGRAM: error: MESSAGE` (and a hint line) to stderr and exits with `status`."""
    print(f"{program}: error: {message}", file=sys.stderr)
    if hint:
        print(hint, file=sys.stderr)
    sys.stdout.flush()
    raise SystemExit(status)


def flag_error_origin(error: flags.Error, origins: Callable[[str], str | None] | None) -> str:
    """A flag error's message, prefixed with `FILE:LINE: ` when the flag came from a flagfile."""
    message = str(error).strip()
    if origins is None:
        return message
    name = getattr(error, "flagname", None)
    if name is None:
        match = re.search(r"flag --(\w+)[=:]", message, re.IGNORECASE)
        name = match.group(1) if match else None
    origin = origins(name) if name else None
    return f"{origin}: {message}" if origin else message


def wrap_parser(program: str,
                parse: Callable[[list[str]], Any] | None = None,
                origins: Callable[[str], str | None] | None = None) -> Callable[[list[str]], Any]:
    """An absl `flags_parser` whose errors are one line plus a pointer to `--help`."""
    def parser(argv: list[str]) -> Any:
        try:
            if parse is None:
                return flags.FLAGS(argv)
            return parse(argv)
        except flags.Error as error:
            fail(program, flag_error_origin(error, origins), USAGE_EXIT,
                 hint=f"({program} --help lists the options)")
    return parser


def run_app(main: Callable[[list[str]], Any], *, program: str,
            flags_parser: Callable[[list[str]], Any] | None = None,
            flag_origins: Callable[[str], str | None] | None = None,
            flag_modules: Sequence[str] = (), needs_tensorflow: bool = True) -> None:
    """`absl.app.run(main)` with the behaviour in the module docstring.

    With `needs_tensorflow`, TensorFlow is imported (quietly) after the flags are parsed, so
    `--help` and usage errors never wait for it.
    """
    quiet_tensorflow()
    define_debug_flag()
    adopt_flags_of(flag_modules)

    def guarded_main(argv: list[str]) -> Any:
        try:
            plain_log_lines()
            if needs_tensorflow:
                import_tensorflow_quietly()
            return main(argv)
        except app.UsageError as error:
            if flags.FLAGS.debug:  # the traceback, not absl's help page
                import traceback

                traceback.print_exc()
                raise SystemExit(USAGE_EXIT) from None
            fail(program, error_message(error), USAGE_EXIT,
                 hint=f"({program} --help lists the options)")
        except KeyboardInterrupt:
            fail(program, "interrupted.", 130)
        except Exception as error:  # noqa: BLE001 - sorted into user mistakes and bugs below
            if flags.FLAGS.debug or not is_user_error(error):
                raise
            fail(program, error_message(error),
                 hint="(--debug shows the Python traceback)")

    try:
        app.run(guarded_main, flags_parser=wrap_parser(program, flags_parser, flag_origins))
    except SystemExit as done:
        # absl ends --help with status 1; asking for help is not an error.
        if done.code == 1 and any(a in HELP_FLAGS for a in sys.argv[1:]):
            raise SystemExit(0) from None
        raise


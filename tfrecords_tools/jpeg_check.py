"""Decoding a JPEG while catching libjpeg's corruption warnings (issue 13).

libjpeg recovers from damaged entropy data (a flipped byte, garbage or a restart marker in the
scan, a scan cut short before a kept EOI marker): it prints a warning such as "Corrupt JPEG data:
12 extraneous bytes before marker 0xd9" on file descriptor 2, naming no file, and returns an
image with grey or shifted blocks. Neither tf.io.decode_jpeg nor Pillow reports it to the caller.
`decode_jpeg_warnings` decodes once with file descriptor 2 redirected and returns those warnings,
so the converters can refuse the image by name; everything else written to file descriptor 2
meanwhile (by this or another thread) is written back to the real stderr.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading

import tensorflow as tf

# libjpeg(-turbo)'s warnings that mean damaged data (jerror.h: JWRN_EXTRANEOUS_DATA, HIT_MARKER,
# HUFF_BAD_CODE, MUST_RESYNC, ARITH_BAD_CODE, BOGUS_ICC, JPEG_EOF, BOGUS_PROGRESSION,
# NOT_SEQUENTIAL). Benign ones ("Warning: unknown JFIF revision number") are passed through.
_CORRUPTION_WARNING = re.compile(
    rb"(Corrupt JPEG data: .*|Premature end of JPEG file|"
    rb"Inconsistent progression sequence for component \d+ coefficient \d+|"
    rb"Invalid SOS parameters for sequential JPEG)\r?\n?")

# File descriptor 2 is shared by the whole process: one redirection at a time.
_LOCK = threading.Lock()


def decode_jpeg_warnings(encoded: bytes) -> list[str]:
    """Decodes JPEG bytes with TensorFlow's decoder (the one training uses); returns libjpeg's
    corruption warnings for them (empty for a sound image).

    Raises what tf.io.decode_image raises for bytes it cannot decode at all. Decodes are
    serialized (file descriptor 2 is redirected to a temporary file for each). A temporary file,
    not a pipe: a pipe holds 64 KiB, so a thread writing more to stderr meanwhile would block.
    """
    with _LOCK:
        try:
            saved = os.dup(2)
        except OSError:  # no file descriptor 2 (a detached process): nothing can be caught
            tf.io.decode_image(encoded, channels=3, expand_animations=False)
            return []
        try:
            with tempfile.TemporaryFile() as capture:
                os.dup2(capture.fileno(), 2)
                try:
                    tf.io.decode_image(encoded, channels=3, expand_animations=False)
                finally:
                    os.dup2(saved, 2)
                    capture.seek(0)
                    warnings = _pass_on_the_rest(capture.read())
        finally:
            os.close(saved)
    return warnings


def _pass_on_the_rest(captured: bytes) -> list[str]:
    # Returns the corruption warnings; writes every other line back to the real stderr.
    warnings, rest = [], []
    for line in captured.splitlines(keepends=True):
        match = _CORRUPTION_WARNING.fullmatch(line)
        if match:
            warnings.append(match.group(1).decode("ascii", "replace"))
        else:
            rest.append(line)
    view = memoryview(b"".join(rest))
    while view:
        view = view[os.write(2, view):]
    return warnings

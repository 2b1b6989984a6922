"""Image width and height read from the file header, so an image can be refused before decoding.

A few kilobytes of PNG can decode to 20000 x 20000 pixels (1.2 GB as RGB): a decompression bomb.
`check_image_pixels` reads the size from the first bytes (PNG IHDR, JPEG SOFn, GIF logical screen
and frames, BMP info header) and refuses images above `--max_image_pixels` with a clear error,
without decoding anything. The Python part needs no TensorFlow; `image_shape` and
`check_image_pixels_op` do the same inside a TensorFlow graph (tf.data pipelines, the exported
serving signature).

    size = read_image_size(encoded)          # ImageSize(width=640, height=480, frames=1, ...)
    check_image_pixels(encoded, where="image_bytes[3]")   # raises ImageTooLargeError
"""

from __future__ import annotations

import dataclasses

# 50 megapixels: above every common camera (45 MP full frame 8192 x 5464, 48 MP phone sensors
# 8000 x 6000), so no real photo is refused, while one decoded image costs at most 150 MB as RGB
# uint8. The models read 64-448 pixel squares, so nothing is gained from larger inputs. A
# 20000 x 20000 bomb (400 MP) is eight times over. Pillow warns at 89 MP and refuses at 179 MP.
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
MAX_IMAGE_PIXELS_FLAG = "--max_image_pixels"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
BMP_SIGNATURE = b"BM"

# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic...); C4 (DHT),
# C8 (JPG) and CC (DAC) share the range but are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7 (SOI is handled before the loop).
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
_JPEG_SOS_MARKER = b"\xff\xda"
_HEAD_BYTES = 32  # enough for every fixed header field read in the graph
# Markers (and fill bytes) walked before the first frame header at most: real files have a few
# dozen; the bound keeps a hostile file of fill bytes from costing a pass per byte.
_MAX_JPEG_MARKERS = 100_000


class ImageHeaderError(ValueError):
    """The bytes are not a PNG, JPEG, GIF or BMP file, or end before the image size."""


class ImageTooLargeError(ValueError):
    """An image has more pixels than the limit; raised before anything is decoded."""

    def __init__(self, where: str, size: "ImageSize", max_pixels: int):
        frames = f" x {size.frames} frames" if size.frames > 1 else ""
        super().__init__(
            f"{where}: {size.format} image of {size.width} x {size.height} pixels{frames} "
            f"({size.pixels:,} pixels) is over the limit of {max_pixels:,} pixels "
            f"({MAX_IMAGE_PIXELS_FLAG}={max_pixels}); resize the image, or raise "
            f"{MAX_IMAGE_PIXELS_FLAG} if such images are expected.")
        self.where = where
        self.size = size
        self.max_pixels = max_pixels


@dataclasses.dataclass(frozen=True)
class ImageSize:
    """What the header says: `pixels` is what decoding costs (all frames of an animated GIF,
    which TensorFlow's decoder decodes even when only the first is kept)."""
    width: int
    height: int
    format: str  # "PNG", "JPEG", "GIF" or "BMP"
    frames: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.frames


def read_image_size(data: bytes, where: str = "image") -> ImageSize:
    """Width and height from the header of PNG, JPEG, GIF or BMP bytes; nothing is decoded.

    Raises:
      ImageHeaderError naming `where` for bytes of another format or cut before the size.
    """
    data = bytes(data) if not isinstance(data, bytes) else data
    if data.startswith(PNG_SIGNATURE):
        return _png_size(data, where)
    if data.startswith(JPEG_SOI):
        return _jpeg_size(data, where)
    if data[:6] in GIF_SIGNATURES:
        return _gif_size(data, where)
    if data.startswith(BMP_SIGNATURE):
        return _bmp_size(data, where)
    raise ImageHeaderError(f"{where}: not a PNG, JPEG, GIF or BMP file (it starts with "
                           f"{data[:8]!r}, {len(data)} bytes); send the encoded image file.")


def check_image_pixels(data: bytes, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                       where: str = "image") -> ImageSize:
    """The header's ImageSize, after checking it has at most `max_pixels` pixels.

    Raises:
      ImageTooLargeError naming `where`, the size, the limit and --max_image_pixels.
      ImageHeaderError when the size cannot be read.
    """
    size = read_image_size(data, where)
    if size.pixels > max_pixels:
        raise ImageTooLargeError(where, size, max_pixels)
    return size


def check_max_image_pixels(max_pixels: int) -> int:
    """`max_pixels` after checking it is a usable limit (the flag's validator)."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"{MAX_IMAGE_PIXELS_FLAG} must be a positive integer. Received: "
                         f"{max_pixels!r}.")
    return max_pixels


# ---- Python header parsers ---------------------------------------------------------------------


def _truncated(where: str, kind: str, data: bytes) -> ImageHeaderError:
    return ImageHeaderError(f"{where}: truncated {kind} file ({len(data)} bytes): it ends before "
                            "the image size; the file was cut short.")


def _png_size(data: bytes, where: str) -> ImageSize:
    # Signature (8), then the first chunk must be IHDR: length (4), type (4), width, height (4+4).
    if len(data) < 24:
        raise _truncated(where, "PNG", data)
    if data[12:16] != b"IHDR":
        raise ImageHeaderError(f"{where}: damaged PNG file: its first chunk is {data[12:16]!r}, "
                               "not IHDR.")
    return ImageSize(int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big"),
                     "PNG")


def _jpeg_size(data: bytes, where: str) -> ImageSize:
    """Walks the marker segments after SOI up to the first SOFn. Every pass moves forward and
    there are at most _MAX_JPEG_MARKERS passes (markers and fill bytes), whatever the bytes are."""
    end = len(data)
    pos = 2
    passes = 0
    while pos < end:
        if data[pos] != 0xFF:
            raise ImageHeaderError(f"{where}: damaged JPEG file: no marker at byte {pos} (found "
                                   f"0x{data[pos]:02x}).")
        while pos < end and data[pos] == 0xFF:  # a marker may be preceded by fill bytes
            pos += 1
            passes += 1
        if passes > _MAX_JPEG_MARKERS:
            raise ImageHeaderError(f"{where}: damaged JPEG file: no frame header (SOFn) within "
                                   f"the first {_MAX_JPEG_MARKERS:,} markers.")
        if pos >= end:
            break
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker in (_JPEG_SOS, _JPEG_EOI, 0xD8):
            raise ImageHeaderError(f"{where}: damaged JPEG file: marker 0x{marker:02x} at byte "
                                   f"{pos - 1} comes before any frame header (SOFn).")
        if pos + 2 > end:
            break
        length = int.from_bytes(data[pos:pos + 2], "big")  # includes its own two bytes
        if length < 2:
            raise ImageHeaderError(f"{where}: damaged JPEG file: segment 0x{marker:02x} at byte "
                                   f"{pos - 1} has length {length}.")
        if marker in _JPEG_SOF:
            if pos + 7 > end:
                break
            # length (2), precision (1), height (2), width (2)
            return ImageSize(int.from_bytes(data[pos + 5:pos + 7], "big"),
                             int.from_bytes(data[pos + 3:pos + 5], "big"), "JPEG")
        pos += length
    raise _truncated(where, "JPEG", data)


def _gif_size(data: bytes, where: str) -> ImageSize:
    """The frame count (image descriptors) and the largest of the logical screen and the frames:
    TensorFlow decodes every frame, at a size taken from the screen or the frames depending on
    the file, so the larger one is counted. Each pass of the walk moves forward: it is bounded."""
    if len(data) < 13:
        raise _truncated(where, "GIF", data)
    width = int.from_bytes(data[6:8], "little")
    height = int.from_bytes(data[8:10], "little")
    packed = data[10]
    pos = 13 + (3 << ((packed & 7) + 1) if packed & 0x80 else 0)  # global colour table
    end = len(data)
    frames = 0
    while pos < end:
        block = data[pos]
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then sub-blocks
            pos = _skip_gif_sub_blocks(data, pos + 2)
        elif block == 0x2C:  # image descriptor (10 bytes), local colour table, LZW size, data
            if pos + 10 > end:
                break
            frames += 1
            width = max(width, int.from_bytes(data[pos + 5:pos + 7], "little"))
            height = max(height, int.from_bytes(data[pos + 7:pos + 9], "little"))
            local = data[pos + 9]
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
            pos = _skip_gif_sub_blocks(data, pos + 1)
        else:
            break  # the decoder stops (or fails) here too; count what came before
    return ImageSize(width, height, "GIF", max(frames, 1))


def _skip_gif_sub_blocks(data: bytes, pos: int) -> int:
    """Position after a chain of GIF data sub-blocks (size byte, data; size 0 ends it)."""
    end = len(data)
    while pos < end:
        size = data[pos]
        pos += 1 + size
        if size == 0:
            break
    return pos


def _bmp_size(data: bytes, where: str) -> ImageSize:
    # File header (14 bytes), then the info header: its size (4), then width and height, 16-bit
    # in the old 12-byte OS/2 header, signed 32-bit otherwise (a negative height is top-down).
    if len(data) < 26:
        raise _truncated(where, "BMP", data)
    header_size = int.from_bytes(data[14:18], "little")
    if header_size == 12:
        return ImageSize(int.from_bytes(data[18:20], "little"),
                         int.from_bytes(data[20:22], "little"), "BMP")
    return ImageSize(abs(int.from_bytes(data[18:22], "little", signed=True)),
                     abs(int.from_bytes(data[22:26], "little", signed=True)), "BMP")


# ---- TensorFlow graph version ------------------------------------------------------------------


def image_shape(encoded, where="image"):
    """int64 [2] (height, width) of a tf.string scalar of image bytes, read from the header.

    For tf.data pipelines and serving signatures: JPEG through tf.image.extract_jpeg_shape
    (libjpeg's header reader, the decoder's own view of the size) once the header is known to be
    complete, PNG, GIF and BMP from their fixed header fields; nothing is decoded. For a GIF it is the logical
    screen only: frame counts and frame sizes need a walk of the whole file, which only the
    Python `read_image_size` does (use it where GIFs are expected). `where` (a Python or
    tf.string scalar) names the image in the error, except for a JPEG header damaged before its
    scan, which fails with libjpeg's message ("Invalid JPEG data ...").

    Raises:
      InvalidArgumentError (at run time) naming `where` for bytes of another format or cut before
      the size.
    """
    import tensorflow as tf

    encoded = tf.convert_to_tensor(encoded, tf.string)
    length = tf.strings.length(encoded)
    # The fixed fields lie in the first 26 bytes; reading them from a zero-padded copy of the head
    # keeps substr in range for short inputs (which the checks below then refuse).
    head = tf.strings.join([tf.strings.substr(encoded, 0, _HEAD_BYTES), b"\0" * _HEAD_BYTES])

    def field(start, size, dtype, little_endian):
        # [n] integers from head bytes start..start+size.
        return tf.cast(tf.io.decode_raw(tf.strings.substr(head, start, size), dtype,
                                        little_endian=little_endian), tf.int64)

    def png():
        # uint32 fields read as int32: masking the int64 restores values of 2**31 and more.
        return tf.bitwise.bitwise_and(field(16, 8, tf.int32, False)[::-1], 0xFFFFFFFF)

    def jpeg():
        return _jpeg_shape_graph(encoded, length, where)

    def gif():
        return field(6, 4, tf.uint16, True)[::-1]

    def bmp():
        old = tf.strings.substr(head, 14, 4) == b"\x0c\x00\x00\x00"
        return tf.cond(old, lambda: field(18, 4, tf.uint16, True)[::-1],
                       lambda: tf.abs(field(18, 8, tf.int32, True))[::-1])

    is_png = tf.strings.substr(head, 0, 8) == PNG_SIGNATURE
    is_jpeg = tf.strings.substr(head, 0, 2) == JPEG_SOI
    is_gif = ((tf.strings.substr(head, 0, 6) == GIF_SIGNATURES[0])
              | (tf.strings.substr(head, 0, 6) == GIF_SIGNATURES[1]))
    is_bmp = tf.strings.substr(head, 0, 2) == BMP_SIGNATURE
    known = is_png | is_jpeg | is_gif | is_bmp
    long_enough = ((is_png & (length >= 24) & (tf.strings.substr(head, 12, 4) == b"IHDR"))
                   | is_jpeg | (is_gif & (length >= 10)) | (is_bmp & (length >= 26)))
    size = tf.strings.as_string(length)
    checks = [
        tf.debugging.Assert(known, [tf.strings.join([
            where, ": not a PNG, JPEG, GIF or BMP file (", size,
            " bytes); send the encoded image file."])]),
        tf.debugging.Assert(~known | long_enough, [tf.strings.join([
            where, ": truncated or damaged image file (", size,
            " bytes): it ends before the image size."])]),
    ]
    with tf.control_dependencies(checks):
        branch = tf.argmax(tf.stack([is_png, is_jpeg, is_gif, is_bmp]))
        shape = tf.switch_case(tf.cast(branch, tf.int32), [png, jpeg, gif, bmp])
    shape.set_shape([2])
    return shape


def _jpeg_shape_graph(encoded, length, where):
    """int64 [2] (height, width) by libjpeg's header reader, after checking that the header is
    complete (a start-of-scan marker is present), so a truncated file gets an error naming it.
    One C++ op instead of a marker walk in the graph: this runs for every served JPEG."""
    import tensorflow as tf

    has_scan = tf.size(tf.strings.split(encoded, sep=_JPEG_SOS_MARKER, maxsplit=1)) > 1
    check = tf.debugging.Assert(has_scan, [tf.strings.join([
        where, ": truncated JPEG file (", tf.strings.as_string(length), " bytes): its header "
        "ends before the first scan; the file was cut short."])])
    with tf.control_dependencies([check]):
        return tf.cast(tf.image.extract_jpeg_shape(encoded)[:2], tf.int64)


def check_image_pixels_op(encoded, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, where="image"):
    """int64 [2] (height, width) of `encoded` (as image_shape), after a run-time check that the
    image has at most `max_pixels` pixels: put decoding under tf.control_dependencies on it.

    Raises:
      InvalidArgumentError (at run time) naming `where`, the size, the limit and
      --max_image_pixels; the errors of image_shape.
    """
    import tensorflow as tf

    check_max_image_pixels(max_pixels)
    shape = image_shape(encoded, where)
    pixels = shape[0] * shape[1]
    text = tf.strings.as_string
    check = tf.debugging.Assert(pixels <= max_pixels, [tf.strings.join([
        where, ": image of ", text(shape[1]), " x ", text(shape[0]), " pixels (", text(pixels),
        f" pixels) is over the limit of {max_pixels:,} pixels ({MAX_IMAGE_PIXELS_FLAG}="
        f"{max_pixels}); resize the image, or raise {MAX_IMAGE_PIXELS_FLAG} if such images are "
        "expected."])])
    with tf.control_dependencies([check]):
        return tf.identity(shape)

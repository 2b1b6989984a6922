"""Hand-built image files for the hostile-input tests: small files with huge or fake sizes.

Built from bytes (zlib for PNG data), never by allocating the decoded image, so a 20000 x 20000
bomb costs a few KB of memory and a fraction of a second. Shared by the header, converter,
pipeline and serving tests and by bench/fault_serving.py.
"""

import struct
import zlib


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def png_header(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """The PNG signature and IHDR chunk only (what the header reader looks at)."""
    return (b"\x89PNG\r\n\x1a\n"
            + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color_type,
                                             0, 0, 0)))


def png_bomb(width: int = 20000, height: int = 20000) -> bytes:
    """A valid, all-black 1-bit grayscale PNG: ~48 KB for 20000 x 20000, decoding to 1.2 GB RGB.

    Rows are compressed in blocks, so building it never holds more than a few MB.
    """
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    parts = []
    rows_per_block = max(1, (4 << 20) // len(row))
    for start in range(0, height, rows_per_block):
        parts.append(compressor.compress(row * min(rows_per_block, height - start)))
    parts.append(compressor.flush())
    return (png_header(width, height, bit_depth=1, color_type=0)
            + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b""))


def jpeg_header(width: int, height: int, sof: int = 0xC0, app_segments: int = 2,
                fill_bytes: int = 1) -> bytes:
    """SOI, APPn/COM segments (skipped by the reader), fill bytes, an SOFn with the size and a
    start-of-scan header: a JPEG file's header as libjpeg reads it, without scan data (a
    decompression bomb's header costs the same few hundred bytes whatever size it declares)."""
    out = b"\xff\xd8"
    for i in range(app_segments):
        payload = bytes([i % 251]) * (100 + 37 * i)
        out += bytes([0xFF, 0xE0 + i % 16]) + struct.pack(">H", len(payload) + 2) + payload
    out += b"\xff\xfe" + struct.pack(">H", 7) + b"hello"  # COM
    out += b"\xff" * fill_bytes  # optional fill before the marker
    out += bytes([0xFF, sof]) + struct.pack(">HBHHB", 11, 8, height, width, 1) + b"\x01\x11\x00"
    out += b"\xff\xda" + struct.pack(">HBBBBBB", 8, 1, 1, 0x00, 0, 63, 0)  # SOS, one component
    return out


def gif_frames(width: int, height: int, frames: int) -> bytes:
    """A GIF of `frames` 1x1 frames on a width x height logical screen (TensorFlow decodes each
    frame at the screen size), with a global colour table and a comment extension."""
    out = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00" * 6  # 2 colours
    out += b"\x21\xfe\x05hello\x00"  # comment extension
    for _ in range(frames):
        out += b"\x21\xf9\x04\x00\x00\x00\x00\x00"  # graphic control extension
        out += b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0)  # image descriptor, no local table
        out += b"\x02\x02\x44\x01\x00"  # LZW minimum code size 2, one sub-block, terminator
    return out + b"\x3b"


def bmp_header(width: int, height: int, old_header: bool = False) -> bytes:
    """A BMP file header and info header (40-byte BITMAPINFOHEADER, or the 12-byte OS/2 one)."""
    if old_header:
        info = struct.pack("<IHHHH", 12, width, height, 1, 24)
    else:
        info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 0, 0, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info

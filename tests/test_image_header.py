"""Tests for imcl_tf.image_header: image sizes from file headers, in Python and in the graph."""

import io
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from image_bombs import bmp_header, gif_frames, jpeg_header, png_bomb, png_header
from imcl_tf import image_header
from imcl_tf.image_header import (DEFAULT_MAX_IMAGE_PIXELS, ImageHeaderError, ImageSize,
                                  ImageTooLargeError, check_image_pixels, read_image_size)


def pillow_bytes(rng, size, image_format, mode="RGB", **save_args):
    width, height = size
    pixels = rng.integers(0, 256, size=[height, width, 3], dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, image_format, **save_args)
    return buffer.getvalue()


def graph_shape(encoded, where="image"):
    return tuple(image_header.image_shape(tf.constant(encoded), where).numpy().tolist())


REAL_CASES = [("PNG", "RGB", {}), ("PNG", "L", {}), ("PNG", "RGBA", {}), ("PNG", "1", {}),
              ("PNG", "P", {}), ("JPEG", "RGB", {}), ("JPEG", "L", {}),
              ("JPEG", "RGB", {"progressive": True}),
              ("JPEG", "RGB", {"exif": b"Exif\0\0" + b"x" * 5000}),  # a large APP1 first
              ("GIF", "P", {}), ("BMP", "RGB", {})]


@pytest.mark.parametrize("image_format, mode, save_args", REAL_CASES)
def test_real_files_match_pillow_and_the_decoder(rng, image_format, mode, save_args):
    for width, height in [(1, 1), (37, 11), (16, 300)]:
        encoded = pillow_bytes(rng, (width, height), image_format, mode, **save_args)
        size = read_image_size(encoded)
        assert (size.width, size.height, size.format, size.frames) == (
            width, height, image_format, 1)
        assert size.pixels == width * height
        assert graph_shape(encoded) == (height, width)
        decoded = tf.io.decode_image(encoded, expand_animations=False)
        assert tuple(decoded.shape[:2]) == (height, width)


def test_hand_built_png_headers_including_sizes_past_int32():
    for width, height in [(1, 1), (20000, 20000), (2**31 + 5, 3), (7, 2**32 - 1)]:
        header = png_header(width, height)
        assert read_image_size(header) == ImageSize(width, height, "PNG")
        assert graph_shape(header) == (height, width)


@pytest.mark.parametrize("sof", sorted(image_header._JPEG_SOF))
def test_hand_built_jpeg_headers_every_frame_marker(sof):
    header = jpeg_header(65535, 123, sof=sof, app_segments=5, fill_bytes=3)
    assert read_image_size(header) == ImageSize(65535, 123, "JPEG")
    if sof in (0xC0, 0xC1, 0xC2):  # the processes libjpeg decodes (it refuses the others)
        header = jpeg_header(65500, 123, sof=sof, app_segments=5, fill_bytes=3)  # its maximum
        assert graph_shape(header) == (123, 65500)


def test_jpeg_segments_that_look_like_frames_are_skipped():
    # DHT (C4), JPG (C8) and DAC (CC) sit in the SOF range; a reader taking them for a frame
    # would read the wrong size.
    out = b"\xff\xd8"
    for marker in (0xC4, 0xC8, 0xCC):
        out += bytes([0xFF, marker]) + struct.pack(">HBHH", 7, 8, 9999, 9999)
    out += jpeg_header(40, 30, app_segments=0)[2:]
    assert read_image_size(out) == ImageSize(40, 30, "JPEG")
    # A long chain of segments (APP markers, restart markers) is walked, not recursed.
    many = b"\xff\xd8" + (b"\xff\xe1\x00\x02" + b"\xff\xd0") * 20000 + jpeg_header(5, 6)[2:]
    assert read_image_size(many) == ImageSize(5, 6, "JPEG")


def test_gif_frames_and_bmp_headers(rng):
    size = read_image_size(gif_frames(40, 30, 5))
    assert (size.width, size.height, size.frames, size.pixels) == (40, 30, 5, 6000)
    frames = [Image.fromarray(rng.integers(0, 256, [9, 13, 3], dtype=np.uint8)) for _ in range(4)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    size = read_image_size(buffer.getvalue())
    assert (size.width, size.height, size.frames) == (13, 9, 4)
    assert tf.io.decode_gif(buffer.getvalue()).shape[0] == 4
    assert graph_shape(buffer.getvalue()) == (9, 13)

    assert read_image_size(bmp_header(300, 200)) == ImageSize(300, 200, "BMP")
    assert read_image_size(bmp_header(300, -200)) == ImageSize(300, 200, "BMP")  # top-down
    assert read_image_size(bmp_header(70, 50, old_header=True)) == ImageSize(70, 50, "BMP")
    for header, shape in [(bmp_header(300, -200), (200, 300)),
                          (bmp_header(70, 50, old_header=True), (50, 70))]:
        assert graph_shape(header) == shape


def test_the_20000_pixel_bomb_is_refused_by_default_before_decoding():
    bomb = png_bomb(20000, 20000)
    assert len(bomb) < 100_000  # a few KB that decode to 1.2 GB
    assert read_image_size(bomb) == ImageSize(20000, 20000, "PNG")
    with pytest.raises(ImageTooLargeError) as info:
        check_image_pixels(bomb, where="image_bytes[2]")
    message = str(info.value)
    for part in ("image_bytes[2]", "20000 x 20000", "400,000,000", f"{DEFAULT_MAX_IMAGE_PIXELS:,}",
                 "--max_image_pixels"):
        assert part in message
    assert info.value.size.pixels == 400_000_000
    assert info.value.max_pixels == DEFAULT_MAX_IMAGE_PIXELS

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def checked(encoded):
        return image_header.check_image_pixels_op(encoded, where="record 7")

    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"record 7: image of 20000 x 20000 pixels \(400000000 pixels\) is "
                             r"over the limit of 50,000,000 pixels \(--max_image_pixels="):
        checked(tf.constant(bomb))


def test_the_limit_is_inclusive_and_counts_gif_frames():
    header = png_header(100, 50)
    assert check_image_pixels(header, 5000).pixels == 5000
    with pytest.raises(ImageTooLargeError, match="5,001"):
        check_image_pixels(png_header(5001, 1), 5000)
    with pytest.raises(ImageTooLargeError, match="x 3 frames"):
        check_image_pixels(gif_frames(100, 20, 3), 5000)
    op = image_header.check_image_pixels_op
    assert op(tf.constant(header), 5000).numpy().tolist() == [50, 100]
    with pytest.raises(tf.errors.InvalidArgumentError, match="5001 x 1 pixels"):
        op(tf.constant(png_header(5001, 1)), 5000)
    for bad in (0, -1, True, "5", 2.5):
        with pytest.raises(ValueError, match="--max_image_pixels must be a positive integer"):
            image_header.check_max_image_pixels(bad)


def test_truncated_and_unknown_bytes_get_a_header_error(rng):
    jpeg = pillow_bytes(rng, (20, 10), "JPEG")
    png = pillow_bytes(rng, (20, 10), "PNG")
    sof = min(jpeg.find(bytes([0xFF, marker])) for marker in image_header._JPEG_SOF
              if jpeg.find(bytes([0xFF, marker])) > 0)
    for prefix in [jpeg[:n] for n in range(2, sof + 9)] + [png[:n] for n in range(8, 24)]:
        with pytest.raises(ImageHeaderError, match="truncated (JPEG|PNG) file"):
            read_image_size(prefix, where="x")
    short = [png[:n] for n in range(8, 24)] + [gif_frames(3, 3, 1)[:9], bmp_header(3, 3)[:20]]
    for prefix in short:
        with pytest.raises(tf.errors.InvalidArgumentError, match="img: truncated or damaged"):
            graph_shape(prefix, "img")
    for prefix in (jpeg[:2], jpeg[:sof], jpeg[:sof + 8], b"\xff\xd8" + b"\xff" * 200_000):
        with pytest.raises(tf.errors.InvalidArgumentError, match="img: truncated JPEG file"):
            graph_shape(prefix, "img")
    with pytest.raises(tf.errors.InvalidArgumentError):  # libjpeg's own error
        graph_shape(jpeg[:sof] + b"\xff\xda\x00\x08", "img")  # a scan before any frame
    for junk in (b"", b"hello world", b"\x00" * 40, b"<html>"):
        with pytest.raises(ImageHeaderError, match=r"image_bytes\[1\]: not a PNG, JPEG, GIF"):
            read_image_size(junk, where="image_bytes[1]")
        with pytest.raises(tf.errors.InvalidArgumentError, match="q: not a PNG, JPEG, GIF or BMP"):
            graph_shape(junk, "q")
    with pytest.raises(ImageHeaderError, match="first chunk is b'IDAT'"):
        read_image_size(png[:12] + b"IDAT" + png[16:])


def test_random_damage_gives_a_size_or_a_header_error_never_another_exception(rng):
    seeds = [pillow_bytes(rng, (30, 20), fmt) for fmt in ("JPEG", "PNG", "GIF", "BMP")]
    seeds += [jpeg_header(10, 10), gif_frames(5, 5, 3)]
    for _ in range(400):
        data = bytearray(seeds[rng.integers(len(seeds))])
        for position in rng.integers(0, len(data), size=rng.integers(1, 8)):
            data[position] = rng.integers(256)
        data = bytes(data[:rng.integers(1, len(data) + 1)])
        try:
            size = read_image_size(data)
        except ImageHeaderError:
            continue
        assert size.width >= 0 and size.height >= 0 and size.frames >= 1


def test_the_graph_and_python_readers_agree_on_damaged_jpegs(rng):
    """Where both read a size it is the same one: the Python walk and libjpeg take the first
    frame header. (libjpeg skips some garbage the Python reader refuses; refusing more is safe.)"""
    seeds = [pillow_bytes(rng, (30, 20), "JPEG"), pillow_bytes(rng, (300, 200), "JPEG",
                                                               progressive=True)]
    shape = tf.function(image_header.image_shape,
                        input_signature=[tf.TensorSpec([], tf.string)])
    compared = 0
    for _ in range(150):
        data = bytearray(seeds[rng.integers(len(seeds))])
        for position in rng.integers(2, 200, size=rng.integers(1, 4)):
            data[position % len(data)] = rng.integers(256)
        data = bytes(data[:rng.integers(2, len(data) + 1)])
        try:
            size = read_image_size(data)
            graph = tuple(shape(tf.constant(data)).numpy().tolist())
        except (ImageHeaderError, tf.errors.InvalidArgumentError):
            continue
        assert graph == (size.height, size.width)
        compared += 1
    assert compared > 20


def test_the_graph_version_runs_in_tf_data(rng):
    encoded = [pillow_bytes(rng, (w, h), fmt) for w, h, fmt in [(5, 7, "PNG"), (9, 4, "JPEG")]]
    dataset = tf.data.Dataset.from_tensor_slices(encoded + [png_bomb(3000, 2000)]).map(
        lambda item: image_header.check_image_pixels_op(item, 1_000_000, where="shard a.tfrecord"))
    iterator = iter(dataset)
    assert next(iterator).numpy().tolist() == [7, 5]
    assert next(iterator).numpy().tolist() == [4, 9]
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="shard a.tfrecord: image of 3000 x 2000"):
        next(iterator)

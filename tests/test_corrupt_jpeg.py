"""Corrupt JPEGs that libjpeg decodes around with only a warning on stderr (issue 13): the
converters refuse them naming the file and manifest line, or skip and count them.

Which corruptions warn (checked with TensorFlow's libjpeg-turbo): garbage inserted in the scan,
a scan cut short with the EOI marker kept, an RST marker inserted in a scan without restart
intervals, and most single flipped bytes in the scan (about 1 in 10 flips keeps the Huffman
stream in step and decodes silently to other pixels; that cannot be detected, so the flip below
is one that desynchronizes it).
"""

import io
import os

import numpy as np
import pytest
from PIL import Image

from imcl_tf import data
from tfrecords_tools import common, jpeg_check, manifest


def jpeg(progressive=False, seed=0):
    image = np.random.default_rng(seed).integers(0, 256, [32, 48, 3], dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90, progressive=progressive)
    return buffer.getvalue()


def scan_bounds(encoded):
    # The entropy-coded data: from after the (last) SOS header to the EOI marker.
    sos = encoded.rindex(b"\xff\xda")
    start = sos + 2 + int.from_bytes(encoded[sos + 2:sos + 4], "big")
    assert encoded.endswith(b"\xff\xd9")
    return start, len(encoded) - 2


def corruptions():
    valid = jpeg()
    start, end = scan_bounds(valid)
    middle = (start + end) // 2
    flipped = bytearray(valid)
    flipped[start + 25] ^= 0xFF
    garbage = np.random.default_rng(1).integers(0, 255, 64, dtype=np.uint8).tobytes()
    return {
        "flipped": (bytes(flipped), "Corrupt JPEG data"),
        "garbage": (valid[:middle] + garbage + valid[middle:], "Corrupt JPEG data"),
        "cut": (valid[:start + (end - start) // 3] + b"\xff\xd9", "Corrupt JPEG data"),
        "rst": (valid[:middle] + b"\xff\xd0" + valid[middle:], "Corrupt JPEG data"),
    }


@pytest.mark.parametrize("name", ["flipped", "garbage", "cut", "rst"])
def test_a_corrupt_jpeg_is_refused_naming_the_source(name):
    encoded, warning = corruptions()[name]
    assert encoded.startswith(b"\xff\xd8\xff") and encoded.endswith(b"\xff\xd9")
    with pytest.raises(common.ImageError) as caught:
        common.check_image(encoded, f"image file {name}.jpg (train.csv line 4)")
    message = str(caught.value)
    assert message.startswith(f"image file {name}.jpg (train.csv line 4): corrupt JPEG image")
    assert f"libjpeg: {warning}" in message and "--skip_corrupt" in message
    assert caught.value.kind == "corrupt"


@pytest.mark.parametrize("progressive", [False, True])
def test_a_valid_jpeg_passes_and_its_bytes_are_kept(progressive):
    encoded = jpeg(progressive=progressive)
    assert common.check_image(encoded, "ok.jpg") == (encoded, "jpeg")
    assert jpeg_check.decode_jpeg_warnings(encoded) == []


def test_other_stderr_output_is_written_back_and_fd_2_restored(tmp_path, capfd):
    # The pass-through of lines that are not corruption warnings, and the restored descriptor.
    assert jpeg_check._pass_on_the_rest(
        b"Warning: unknown JFIF revision number 3.01\nCorrupt JPEG data: bad Huffman code\n"
        b"some other line\n") == ["Corrupt JPEG data: bad Huffman code"]
    encoded, _ = corruptions()["garbage"]
    assert jpeg_check.decode_jpeg_warnings(encoded)[0].startswith("Corrupt JPEG data: ")
    os.write(2, b"after the decode\n")
    err = capfd.readouterr().err
    assert "Warning: unknown JFIF revision number 3.01\nsome other line\n" in err
    assert "after the decode" in err and "Corrupt JPEG data" not in err


def test_a_cut_jpeg_without_eoi_is_still_refused_as_truncated():
    valid = jpeg()
    start, end = scan_bounds(valid)
    with pytest.raises(common.ImageError) as caught:
        common.check_image(valid[:(start + end) // 2], "cut.jpg")
    assert caught.value.kind == "truncated" and str(caught.value).startswith("cut.jpg: ")


def write_inputs(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(jpeg(seed=2))
    (photos / "b.jpg").write_bytes(jpeg(progressive=True, seed=3))
    for name, (encoded, _) in corruptions().items():
        (photos / f"{name}.jpg").write_bytes(encoded)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "train.csv").write_text(
        "image,positives,negatives\na.jpg,cat,\nflipped.jpg,dog,\ngarbage.jpg,dog,\n"
        "cut.jpg,cat,\nrst.jpg,,cat\nb.jpg,,cat\n")
    return ["manifest", f"--manifest={tmp_path / 'train.csv'}", f"--images_dir={photos}",
            f"--classes={tmp_path / 'classes.txt'}", f"--output_dir={tmp_path / 'out'}",
            "--num_shards=1", "--num_workers=3", "--noshuffle"]


def test_the_converter_refuses_then_skips_and_counts_corrupt_jpegs(tmp_path):
    argv = write_inputs(tmp_path)
    with pytest.raises(common.ImageError) as caught:
        manifest.run(argv)
    message = str(caught.value)
    assert "flipped.jpg" in message and "train.csv line 3" in message
    assert "corrupt JPEG image" in message and caught.value.kind == "corrupt"
    assert not (tmp_path / "out" / data.DATASET_JSON).exists()

    assert manifest.run(argv + ["--skip_corrupt"]).num_examples == 2
    info = data.load_dataset_info(str(tmp_path / "out"))
    assert info.provenance["splits"]["train"]["skipped_by_kind"] == {"corrupt": 4}
    skipped = info.splits["train"].skipped
    assert sorted(os.path.basename(entry["source"].split(" (")[0]) for entry in skipped) == [
        "cut.jpg", "flipped.jpg", "garbage.jpg", "rst.jpg"]
    assert all(entry["reason"].startswith("corrupt JPEG image") for entry in skipped)

"""Hostile converter inputs (issue 13): decompression bombs are refused from the header, before
decoding, with the file, the size and --max_image_pixels named, and nothing half-written is left.
"""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from imcl_tf import data
from image_bombs import png_bomb, png_header
from tfrecords_tools import common, manifest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_png(seed=0):
    buffer = io.BytesIO()
    image = np.random.default_rng(seed).integers(0, 256, [8, 8, 3], dtype=np.uint8)
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_inputs(tmp_path, bomb):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.png").write_bytes(small_png(0))
    (photos / "b.png").write_bytes(small_png(1))
    (photos / "bomb.png").write_bytes(bomb)
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    (tmp_path / "train.csv").write_text("image,positives,negatives\na.png,cat,\n"
                                        "bomb.png,dog,\nb.png,,cat\n")
    return ["manifest", f"--manifest={tmp_path / 'train.csv'}", f"--images_dir={photos}",
            f"--classes={tmp_path / 'classes.txt'}", f"--output_dir={tmp_path / 'out'}",
            "--num_shards=2", "--num_workers=2"]


def test_a_png_bomb_is_refused_naming_file_size_and_flag_with_nothing_left(tmp_path):
    bomb = png_bomb(20000, 20000)
    assert len(bomb) < 100_000  # a few KB that decode to 1.2 GB
    argv = write_inputs(tmp_path, bomb)
    with pytest.raises(common.ImageError) as caught:
        manifest.run(argv)
    message = str(caught.value)
    assert "bomb.png" in message and "train.csv line 3" in message
    assert "20000 x 20000 pixels" in message and "400,000,000 pixels" in message
    assert "--max_image_pixels=50000000" in message
    assert caught.value.kind == "too_large"
    out = tmp_path / "out"
    assert not out.exists() or os.listdir(out) == []  # no .tmp shard, no dataset.json


def test_the_limit_is_a_flag_and_skip_corrupt_skips_a_bomb(tmp_path):
    argv = write_inputs(tmp_path, png_bomb(3000, 3000))
    with pytest.raises(common.ImageError, match="--max_image_pixels=1000000"):
        manifest.run(argv + ["--max_image_pixels=1000000"])
    split_info = manifest.run(argv + ["--max_image_pixels=1000000", "--skip_corrupt"])
    assert split_info.num_examples == 2
    info = data.load_dataset_info(str(tmp_path / "out"))
    assert info.provenance["splits"]["train"]["skipped_by_kind"] == {"too_large": 1}
    assert info.provenance["splits"]["train"]["flags"]["max_image_pixels"] == 1_000_000
    # Within the limit the same image is converted.
    assert manifest.run(argv + ["--max_image_pixels=9000000"]).num_examples == 3
    with pytest.raises(data.DataError, match="bad command line.*max_image_pixels"):
        manifest.run(argv + ["--max_image_pixels=0"])


def test_the_size_is_read_before_decoding(tmp_path):
    # A header that claims 60000 x 60000 with no image data: refused as too large (had it been
    # decoded, it would be refused as undecodable instead).
    with pytest.raises(common.ImageError, match="60000 x 60000") as caught:
        common.check_image(png_header(60000, 60000), "fake.png")
    assert caught.value.kind == "too_large"
    with pytest.raises(common.ImageError) as caught:
        common.check_image(small_png()[:20], "cut.png")  # cut inside the header
    assert caught.value.kind == "truncated"


@pytest.mark.slow
def test_the_converter_program_exits_with_one_clear_line(tmp_path):
    argv = write_inputs(tmp_path, png_bomb(20000, 20000))
    result = subprocess.run([sys.executable, "-m", "tfrecords_tools.manifest"] + argv[1:],
                            cwd=REPO_ROOT, capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                                 "PYTHONPATH": REPO_ROOT})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "bomb.png" in result.stderr and "--max_image_pixels" in result.stderr
    assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []

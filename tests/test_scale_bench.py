"""bench/scale_bench.py at a tiny size: every variant is timed, each peak measured in its own
process, and the report's ratios are the ratios of its own columns."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))


@pytest.mark.slow
def test_quick_scale_bench_reports_times_ratios_and_peaks(tmp_path):
    out = tmp_path / "scale.md"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "scale_bench.py"), "--quick",
         "--sizes=6,40,8", f"--out={out}"], cwd=ROOT, capture_output=True, text=True,
        timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    assert re.search(r"^- command: `python bench/scale_bench.py --quick", report, re.MULTILINE)
    assert "load average" in report and "- date: " in report
    rows = re.findall(r"^\| 6 \| 40 \| 8 \| (.+) \|$", report, flags=re.MULTILINE)
    assert len(rows) == 1
    logistic, imcl, floor, per_floor, per_logistic, peak_logistic, peak_imcl, imported = (
        float(x) for x in rows[0].split(" | "))
    assert min(logistic, imcl, floor) > 0
    # The time columns are rounded to 1 ms and the ratio to 0.01: at this size the floor is a few
    # ms, so the ratio of the rounded columns is only known to lie between these bounds.
    low = (imcl - 5e-4) / (floor + 5e-4) - 5e-3
    high = (imcl + 5e-4) / max(floor - 5e-4, 1e-9) + 5e-3
    assert low <= per_floor <= high, (per_floor, imcl, floor)
    # The ratio column is the median of per-round ratios, the time columns medians of times:
    # on a loaded machine the two differ, so only their agreement in size is checked.
    assert per_logistic == pytest.approx(imcl / logistic, rel=0.5, abs=0.1)
    # A real process peak: TensorFlow alone is hundreds of MB, a model more.
    assert 0.1 < imported <= peak_logistic and imported <= peak_imcl < 24


def test_scale_bench_rejects_bad_sizes(capsys):
    import scale_bench
    with pytest.raises(SystemExit):
        scale_bench.parse_args(["--sizes=6,40"])
    assert "three positive integers" in capsys.readouterr().err
    assert scale_bench.parse_args(["--sizes=6,40,8;7,50,9"]).sizes == [(6, 40, 8), (7, 50, 9)]

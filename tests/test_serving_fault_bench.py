"""bench/fault_serving.py --quick: the serving fault battery runs end to end, every fault is
survived, every bad input rejected clearly, no good request fails, and the server exits 0."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quick_fault_battery_survives_everything(tmp_path):
    out = tmp_path / "fault_serving.md"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "fault_serving.py"),
                           "--quick", f"--out={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout[-3000:], done.stderr[-3000:])
    text = done.stdout
    sent, failed = map(int, re.search(r"requests sent: (\d+), failed: (\d+)", text).groups())
    assert sent > 50 and failed == 0
    injected, survived = map(int, re.search(r"faults injected: (\d+), survived: (\d+)",
                                            text).groups())
    assert injected == survived == 5
    tried, rejected = map(int, re.search(r"bad inputs tried: (\d+), rejected clearly: (\d+)",
                                         text).groups())
    assert tried == rejected >= 20
    start, hostile = map(float, re.search(r"server RSS: (\d+) MB after start, peak (\d+) MB "
                                          r"during the hostile inputs", text).groups())
    assert hostile - start < 300  # one decoded 20000 x 20000 bomb alone would be 1200 MB
    assert "versions served: [1, 2]" in text and "exit status after SIGTERM: 0" in text
    report = out.read_text()
    assert report.startswith("# Serving fault battery") and "bad inputs tried" in report

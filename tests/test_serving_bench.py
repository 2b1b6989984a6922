"""bench/serving_bench.py at a tiny size: it starts its three servers, checks each one answers
like the in-process signature, measures, writes its report and shuts the servers down."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_short_serving_bench_reports_every_path_and_stops_its_servers(tmp_path):
    out = tmp_path / "serving.md"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "serving_bench.py"), "--requests=20",
         "--throughput_seconds=0.4", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    latency_rows = re.findall(r"^\| (1|32) \| ([^|]+) \| ([\d.]+) \| ([\d.]+) \| ([^|]*) \|$",
                              report, flags=re.MULTILINE)
    paths = ["in-process", "gRPC", "gRPC, --enable_batching", "bare gRPC servicer (reference)"]
    assert [(batch, path.strip()) for batch, path, *_ in latency_rows] == (
        [("1", path) for path in paths] + [("32", path) for path in paths])
    for batch, _, p50, p99, added in latency_rows:
        assert 0 < float(p50) <= float(p99)
    # "added" is each path's p50 minus in-process p50, as printed.
    batch1 = {path.strip(): (float(p50), added) for batch, path, p50, _, added in latency_rows
              if batch == "1"}
    for path in paths[1:]:
        assert float(batch1[path][1]) == pytest.approx(
            batch1[path][0] - batch1["in-process"][0], abs=0.011)
    assert re.search(r"Added p50 latency at batch 1 <= 2 ms \(default server\): [\d.]+ ms, "
                     r"(met|NOT met)\. The bare reference servicer adds -?[\d.]+ ms", report)
    assert re.search(r"Throughput at concurrency 8 >= 70% of in-process: \d+%", report)
    # The servers were terminated: none of the benchmark's server processes is left running.
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit()
                and "--bare_server=" in _command_line(pid)]


def _command_line(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # the process ended meanwhile
        return ""


def test_bare_server_flag_rejects_a_missing_version_dir(tmp_path):
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "serving_bench.py"),
         f"--bare_server={tmp_path / 'nothing'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2  # argparse's usage error, before TensorFlow loads anything
    assert f"--bare_server={tmp_path / 'nothing'}" in done.stderr
    assert "saved_model.pb" in done.stderr

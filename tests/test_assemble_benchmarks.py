"""bench/assemble_benchmarks.py: BENCHMARKS.md = its header + every results file, headings demoted."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import assemble_benchmarks  # noqa: E402


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_header_kept_sections_in_order_and_headings_demoted(tmp_path):
    _write(tmp_path / "BENCHMARKS.md", "# BENCHMARKS\n\nintro | table\n\n## Old section\n\nstale\n")
    for name in assemble_benchmarks.SECTIONS:
        _write(tmp_path / "bench" / "results" / f"{name}.md",
               f"# Title {name}\n\n## Sub {name}\n\n```\n# a shell comment\n```\n"
               f"![plot]({name}.png) [web](https://example.org/x)\n")
    text = assemble_benchmarks.assemble(str(tmp_path))
    assert text.startswith("# BENCHMARKS\n\nintro | table\n\n## Title quality\n")
    assert "stale" not in text
    positions = [text.index(f"## Title {name}\n") for name in assemble_benchmarks.SECTIONS]
    assert positions == sorted(positions)
    assert "### Sub omp" in text and "\n# a shell comment\n" in text
    assert "(from `bench/results/serving.md`)" in text
    assert "![plot](bench/results/omp.png)" in text and "[web](https://example.org/x)" in text


def test_missing_results_file_is_named(tmp_path):
    _write(tmp_path / "BENCHMARKS.md", "# BENCHMARKS\n")
    with pytest.raises(SystemExit, match="quality.md is missing"):
        assemble_benchmarks.assemble(str(tmp_path))

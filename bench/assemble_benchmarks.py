"""Rebuilds BENCHMARKS.md from the section files in bench/results/.

BENCHMARKS.md = its own hand-written header (everything before the first "## " heading: the
machine and the targets table) + one section per results file, in a fixed order, each file's
headings moved one level down. Run it after a benchmark rewrote its results file:

  python bench/assemble_benchmarks.py
"""

from __future__ import annotations

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("quality", "transfer_protocol", "transfer_fixed", "transfer_finetune",
            "compare_protocol", "compare_methods_transfer", "compare_methods_demo", "demo", "omp",
            "step", "scale", "scale_image", "input", "serving", "faults", "fault_serving")


def assemble(root: str = ROOT) -> str:
    path = os.path.join(root, "BENCHMARKS.md")
    with open(path) as f:
        current = f.read()
    match = re.search(r"^## ", current, flags=re.MULTILINE)
    header = (current[:match.start()] if match else current).rstrip("\n")
    parts = [header]
    for name in SECTIONS:
        section_path = os.path.join(root, "bench", "results", f"{name}.md")
        if not os.path.exists(section_path):
            raise SystemExit(f"assemble_benchmarks: {section_path} is missing; run the benchmark "
                             "that writes it, or drop it from SECTIONS.")
        with open(section_path) as f:
            text = f.read().strip("\n")
        lines = text.splitlines()
        if not lines or not lines[0].startswith("# "):
            raise SystemExit(f"assemble_benchmarks: {section_path} must start with a '# ' title.")
        title, body = lines[0][2:], "\n".join(lines[1:]).strip("\n")
        body = _demote_headings(body)
        # Links relative to bench/results/ (plots beside the results file) must still resolve
        # from the repository root.
        body = re.sub(r"\]\((?![a-z]+:|/|#)([^)\s]+)\)", r"](bench/results/\1)", body)
        parts.append(f"## {title}\n\n(from `bench/results/{name}.md`)\n\n{body}")
    return "\n\n".join(parts) + "\n"


def _demote_headings(text: str) -> str:
    """'#'-headings one level down, except inside fenced code blocks."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"^#{1,5} ", line):
            line = "#" + line
        out.append(line)
    return "\n".join(out)


def main() -> int:
    text = assemble()
    with open(os.path.join(ROOT, "BENCHMARKS.md"), "w") as f:
        f.write(text)
    print(f"wrote BENCHMARKS.md ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

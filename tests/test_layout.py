"""The package layout: the library never imports the tools, the servers or the benchmarks."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
ABOVE_THE_LIBRARY = ("tfrecords_tools", "serving", "bench")


def _imported_modules(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "imcl_tf").rglob("*.py")),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_library_does_not_import_what_sits_above_it(path):
    reaching_up = [name for name in _imported_modules(path)
                   if name.split(".")[0] in ABOVE_THE_LIBRARY]
    assert not reaching_up, f"{path.relative_to(ROOT)} imports {reaching_up}"


def test_the_check_sees_an_import_of_the_tools(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from tfrecords_tools import partial\n", encoding="utf-8")
    assert _imported_modules(module) == ["tfrecords_tools"]

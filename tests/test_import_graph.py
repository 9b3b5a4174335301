"""The modules of loralib import one another without a circle.

The graph is read from the source with ``ast``: every ``import`` / ``from ... import`` anywhere in a file counts,
inside functions too (a lazy import hides a circle from Python, not from this test), and so do the imports of the
package itself (``from loralib import X`` inside loralib is an edge to ``loralib/__init__.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "loralib"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def module_names() -> dict[str, Path]:
    names = {f"{PACKAGE}.{p.stem}": p for p in ROOT.glob("*.py") if p.stem != "__init__"}
    names[PACKAGE] = ROOT / "__init__.py"
    return names


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The loralib modules that ``module`` (the file ``path``) imports."""
    package = PACKAGE if module == PACKAGE else module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:  # `import loralib.x.y`: the module is loralib.x
            name = name.rpartition(".")[0]
        if name:
            found.add(name)

    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source != PACKAGE and not source.startswith(PACKAGE + "."):
                continue
            for alias in node.names:  # `from loralib import config` imports the submodule loralib.config
                candidate = f"{source}.{alias.name}"
                add(candidate if candidate in known else source)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_graph_reader_sees_every_kind_of_import(tmp_path):
    known = {PACKAGE, f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.c", f"{PACKAGE}.d", f"{PACKAGE}.e"}
    source = tmp_path / "x.py"
    source.write_text(
        "import os\nfrom .a import thing\nimport loralib.b as bee\n"
        "def f():\n    from . import c\n    from loralib import d, AdapterConfig\n"
        "class K:\n    def g(self):\n        from loralib.e import y\n"
    )
    assert imported_modules(f"{PACKAGE}.x", source, known) == known  # AdapterConfig: the package itself
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_loralib_has_no_import_circle():
    graph = import_graph()
    assert {"loralib.config", "loralib.files", "loralib.io", "loralib.peft_compat", "loralib.model"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)
    # the foundations import nothing from loralib
    assert graph["loralib.config"] == set() and graph["loralib.files"] == set()
    assert "loralib.io" not in graph["loralib.peft_compat"]  # io builds on peft_compat, not the other way round


def test_no_test_file_imports_another():
    """Shared test code lives in tests/helpers.py (and the toy problem in tests/ridge_toy.py), never in a test file;
    the scripts the tests generate as strings are checked too."""
    tests = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.glob("*.py")):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text, filename=str(path))):
            sources = []
            if isinstance(node, ast.ImportFrom):
                sources = [node.module or ""] if not node.level else ["tests." + (node.module or "")]
            elif isinstance(node, ast.Import):
                sources = [alias.name for alias in node.names]
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and path != Path(__file__).resolve() \
                    and "tests.test_" in node.value:  # a generated script's imports
                sources = ["tests.test_ (in a string)"]
            offenders += [f"{path.name}: {s}" for s in sources if s.startswith(("tests.test_", "test_"))]
    assert not offenders

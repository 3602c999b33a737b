"""The benchmarks' imports form a DAG: no cycles, nothing from tests/, no entry script imported.

Read from the source with ast (every import statement, those inside functions and `if TYPE_CHECKING:` too),
so nothing is imported and no benchmark runs. benchmarks/harness.py's docstring draws the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
ENTRY_SCRIPTS = {"gpu_processors", "gpu_server", "gpu_report", "relay"}  # run as programs, never imported


def imported_modules(path: Path) -> set[str]:
    """Every module `path` names in an import statement, anywhere in the file, as a dotted name."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative, from inside benchmarks/: from . import x, from .x import y
                base = f"benchmarks.{base}".rstrip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from benchmarks import gpu_cases`
    return names


def graph() -> dict[str, set[str]]:
    """benchmarks module -> the benchmarks modules it imports (by file stem)."""
    modules = {p.stem: p for p in BENCHMARKS.glob("*.py") if p.stem != "__init__"}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges[name] = {parts[1] for parts in (m.split(".") for m in imported_modules(path))
                       if len(parts) > 1 and parts[0] == "benchmarks" and parts[1] in modules} - {name}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt, [*path, nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_benchmarks_are_found():
    edges = graph()
    assert {"harness", "gpu_cases", "gpu_checks", "gpu_plain", "real_models"} | ENTRY_SCRIPTS <= set(edges)
    assert edges["gpu_cases"] >= {"harness", "gpu_checks", "gpu_plain"}  # the parser sees `from benchmarks import`


def test_no_import_cycles_among_benchmarks():
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()) or [])}"


def test_harness_is_at_the_bottom():
    assert graph()["harness"] == set()


def test_no_benchmark_imports_an_entry_script():
    importers = {name: deps & ENTRY_SCRIPTS for name, deps in graph().items() if deps & ENTRY_SCRIPTS}
    assert not importers, f"entry scripts imported: {importers}"


def test_no_benchmark_imports_tests():
    offenders = {p.name: sorted(m for m in imported_modules(p) if m == "tests" or m.startswith("tests."))
                 for p in BENCHMARKS.glob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_the_checks_see_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None

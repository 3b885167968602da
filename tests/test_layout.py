"""The architecture the layout promises: imports flow one way, kernels <- objectives <- recipes <-
search, with no cycle (imports inside functions count) and nothing in the product importing the
benchmarks."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> package, as pyproject.toml maps them; the order is the allowed direction of imports
PACKAGES = {"dynsearch": "dynsearch", "kernels": "dynsearch.kernels", "objectives": "dynsearch.objectives",
            "recipes": "dynsearch.recipes", "search": "dynsearch.search"}
RANK = {"kernels": 0, "objectives": 1, "recipes": 2, "search": 3}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports, anywhere in its file."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [f"{target}.{a.name}" for a in node.names] + [target]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        for t in candidates:
            if t.startswith("dynsearch.bench"):
                found.add(t)
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    assert len(modules) > 50, "the product's modules were not found"
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n in graph and n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def test_imports_flow_one_way_and_never_into_bench(graph):
    wrong = []
    for m, targets in graph.items():
        for t in targets:
            if t.startswith("dynsearch.bench"):
                wrong.append(f"{m} imports the benchmarks ({t})")
            elif _package(m) and _package(t) and RANK[_package(t)] > RANK[_package(m)]:
                wrong.append(f"{m} imports {t}")
            elif _package(t) and m.split(".")[1] in ("errors", "atomic", "system"):
                wrong.append(f"{m} (a base module) imports {t}")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_checks_see_a_cycle_and_a_wrong_direction():
    bad = {"dynsearch.kernels.a": {"dynsearch.search.b"}, "dynsearch.search.b": {"dynsearch.kernels.a"}}
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle(bad)
    with pytest.raises(AssertionError, match="dynsearch.kernels.a imports dynsearch.search.b"):
        test_imports_flow_one_way_and_never_into_bench(bad)

"""The layers' directions, read from every import statement (the AST, so imports inside functions count
too): modelcard ← engine ← pipeline ← fronts; export never imports service; the pipeline imports no
onnxruntime, starlette or bentoml; the fronts no onnxruntime and no engine submodule; no cycles.
settings.py and errors.py are leaves every layer may read."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGES = ["modelcard", "models", "export", "service", "bench", "loadtest", "batch"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module an import statement in `path` names (`from a.b import c` names a.b and a.b.c)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


GRAPH = {module_name(p): imports(p) for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def layer(module: str) -> str | None:
    for prefix in ("modelcard", "service.engine", "service.pipeline", "service.fronts", "export", "models"):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return None


def reaches(module: str, banned: tuple[str, ...]) -> list[str]:
    return sorted(n for n in GRAPH[module] if n in banned or n.startswith(tuple(b + "." for b in banned)))


ORDER = ["modelcard", "service.engine", "service.pipeline", "service.fronts"]


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if layer(m) in ORDER))
def test_no_layer_imports_a_later_one(module):
    later = tuple(ORDER[ORDER.index(layer(module)) + 1:])
    assert not reaches(module, later), f"{module} imports a later layer: {reaches(module, later)}"


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_who_may_import_what(module):
    if module.startswith("modelcard"):
        assert not reaches(module, ("service", "export", "models", "torch", "onnxruntime", "bentoml")), module
    if module.startswith("export"):
        assert not reaches(module, ("service",)), f"export imports the service: {GRAPH[module]}"
    if module.startswith("service"):
        assert not reaches(module, ("torch", "models", "export")), module
    if module.startswith("service.pipeline"):
        banned = ("onnxruntime", "starlette", "bentoml", "fastapi")
        assert not reaches(module, banned), f"{module}: {reaches(module, banned)}"
    if module.startswith("service.engine"):
        banned = ("starlette", "fastapi", "service.fronts", "service.pipeline")
        assert not reaches(module, banned), f"{module}: {reaches(module, banned)}"
    if module.startswith("service.fronts"):
        engine_parts = tuple(m for m in GRAPH if m.startswith("service.engine."))
        assert not reaches(module, ("onnxruntime", *engine_parts)), \
            f"{module}: {reaches(module, ('onnxruntime', *engine_parts))}"
    if module in ("service.settings", "service.errors"):
        assert not reaches(module, ("service.engine", "service.pipeline", "service.fronts")), module


def test_no_import_cycles():
    inside = {m: {n for n in names if n in GRAPH and n != m} for m, names in GRAPH.items()}
    seen, active, cycles = set(), [], []

    def visit(m: str) -> None:
        if m in active:
            cycles.append(active[active.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        active.append(m)
        for n in sorted(inside[m]):
            visit(n)
        active.pop()

    for m in sorted(inside):
        visit(m)
    # a package's __init__ importing its own submodules is how packages are built, not a cycle
    real = [c for c in cycles if not all(a.startswith(c[0]) or c[0].startswith(a) for a in c)]
    assert not real, real


def test_the_graph_is_read():
    """The test reads what it claims to: lazy imports inside functions count (engine.store's bentoml)."""
    assert "bentoml" in GRAPH["service.engine.store"]
    assert "service.engine.sessions" in GRAPH["service.engine"]

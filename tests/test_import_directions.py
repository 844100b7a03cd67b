"""The four packages import downwards only: experiments -> profiling -> runtime -> optimizer.

Every ``import`` / ``from ... import`` in every module (function-level ones included) is read from the source
with ``ast``; an import of a package above the importing one fails the test, and so does an import cycle
between modules of one package.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("optimizer", "runtime", "profiling", "experiments")  # each may import the ones before it


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of the project modules ``path`` imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            out.add(name)
            out |= {f"{name}.{a.name}" for a in node.names}
    return {n for n in out if n.split(".")[0] in LAYERS}


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))}


def test_imports_are_read_relative_and_lazy_ones_too() -> None:
    apply_imports = _imports(ROOT / "runtime" / "apply.py")
    assert {"runtime.plan_check", "optimizer.errors", "runtime.quant.gptq"} <= apply_imports  # relative, nested
    assert "runtime.corpora" in _imports(ROOT / "profiling" / "model_io.py")  # inside a function


def test_packages_import_downwards_only() -> None:
    wrong = []
    for name, path in _sources().items():
        rank = LAYERS.index(name.split(".")[0])
        for target in _imports(path):
            if LAYERS.index(target.split(".")[0]) > rank:
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycle_between_modules() -> None:
    sources = _sources()
    graph = {name: {t for t in _imports(path) if t in sources and t != name} for name, path in sources.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, stack + [node])):
                return cycle
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, " -> ".join(cycle[cycle.index(cycle[-1]):])

"""The package's layout: its import graph (every import, function-level ones included) has no cycle,
the adapters import nothing above them, and no file grows past the size limit."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lor2c_ds"
MAX_LINES = 600
# what lor2c_ds.adapters may import from the package: itself, the architecture registry and its leaf
# modules (the spec types, fused-projection slices)
ADAPTERS_MAY_IMPORT = ("lor2c_ds.adapters", "lor2c_ds.registry", "lor2c_ds.arch", "lor2c_ds.fused")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: Path) -> set[str]:
    """The lor2c_ds modules `path` imports, resolved to modules (a name imported from a package that is
    itself a module counts as that module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lor2c_ds"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "lor2c_ds":
                continue
            subs = {f"{base}.{a.name}" for a in node.names if is_module(f"{base}.{a.name}")}
            found |= subs or {base}
            if len(subs) < len(node.names):
                found.add(base)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_import_resolution_sees_function_level_and_relative_imports(tmp_path):
    edges = graph()
    assert "lor2c_ds.engine" in edges["lor2c_ds.reslora_training"]  # imported inside a method
    assert "lor2c_ds.adapters.config" in edges["lor2c_ds.config"]


def test_no_import_cycle_in_the_package():
    assert find_cycle(graph()) is None, f"import cycle: {' -> '.join(find_cycle(graph()))}"


def test_adapters_import_nothing_above_them():
    for name, deps in graph().items():
        if name.startswith("lor2c_ds.adapters"):
            above = sorted(d for d in deps if not d.startswith(ADAPTERS_MAY_IMPORT))
            assert not above, f"{name} imports {above}"


@pytest.mark.parametrize("folder", ["lor2c_ds", "launcher"])
def test_no_file_over_the_size_limit(folder):
    long = {str(p.relative_to(REPO)): n for p in (REPO / folder).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long

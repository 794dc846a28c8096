"""The import graph of the product, read with ast: no cycles, and arrows only run downward.

Every import counts, lazy ones (inside functions) and ``TYPE_CHECKING`` ones included.
An import of ``a.b.c`` is an edge to the module ``a.b.c`` only, not to the packages
``a`` and ``a.b`` whose ``__init__`` Python also runs: a package ``__init__`` here
re-exports for users and is never imported by the modules below it.
The allowed directions are the package map of ARCHITECTURE.md.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRODUCT = ("engine", "ipc")

# Modules every part of `engine` may use (below every subpackage).
SHARED = {
    "engine.backoff",
    "engine.batches",
    "engine.config",
    "engine.errors",
    "engine.exitcodes",
    "engine.limits",
    "engine.logs",
    "engine.procutil",
    "engine.protocol",
}
# What each group may import besides itself, `ipc` and SHARED (see ARCHITECTURE.md).
ALLOWED: dict[str, set[str]] = {
    "ipc": set(),
    "engine.shared": set(),
    "engine.worker": set(),
    "engine.client": set(),
    "engine.core": {"engine.worker"},
    "engine.broker": {"engine.core", "engine.worker"},
    "engine.service": {"engine.core", "engine.broker"},
    "engine.stress": {"engine", "engine.core", "engine.client"},
    # the package __init__: the public API (loaded lazily), and the cluster seam
    "engine": {"engine.core", "engine.broker"},
    "engine.cli": {
        "engine",
        "engine.core",
        "engine.service",
        "engine.client",
        "engine.stress",
        "engine.broker",
    },
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def product_modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for top in PRODUCT:
        for path in sorted((REPO / top).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports_of(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """Every module ``name`` imports (anywhere in the file), resolved against ``known``."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in known else base)
    return targets


def graph() -> dict[str, set[str]]:
    modules = product_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a self-import (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue  # outside the product: stdlib and third-party packages
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in edges.get(v, ()):
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def group_of(module: str) -> str:
    if module == "ipc" or module.startswith("ipc."):
        return "ipc"
    if module == "engine":
        return "engine"
    if module in SHARED or module == "engine.__main__":
        return "engine.shared" if module != "engine.__main__" else "engine.cli"
    parts = module.split(".")
    return ".".join(parts[:2])


def forbidden(edges: dict[str, set[str]]) -> list[str]:
    """Every import that runs against the package map, as 'a -> b (why)'."""
    problems = []
    for src, targets in sorted(edges.items()):
        src_group = group_of(src)
        for dst in sorted(targets):
            top = dst.split(".")[0]
            if top in ("bench", "tests"):
                problems.append(f"{src} -> {dst} (the product never imports {top})")
                continue
            if top not in PRODUCT:
                continue
            dst_group = group_of(dst)
            if src_group == "ipc" and dst_group != "ipc":
                problems.append(f"{src} -> {dst} (ipc never imports engine)")
            elif (
                dst_group not in ("ipc", "engine.shared", src_group)
                and dst_group not in ALLOWED[src_group]
            ):
                problems.append(f"{src} -> {dst} ({src_group} may not import {dst_group})")
    return problems


def test_every_product_module_is_in_a_known_group() -> None:
    unknown = sorted(m for m in graph() if group_of(m) not in ALLOWED)
    assert unknown == [], f"add these to the package map (ARCHITECTURE.md and ALLOWED): {unknown}"


def test_the_product_has_no_import_cycle() -> None:
    assert find_cycles(graph()) == []


def test_imports_only_run_downward() -> None:
    assert forbidden(graph()) == []


def test_the_checks_see_a_cycle_and_a_wrong_direction() -> None:
    """The same functions on a graph with the faults this test exists to catch."""
    edges = graph()
    edges["engine.cli.commands"].add("engine.cli.service")
    edges["engine.cli.service"].add("engine.cli.commands")  # a lazy import back
    assert ["engine.cli.commands", "engine.cli.service"] in find_cycles(edges)
    edges["ipc.ring"].add("engine.config")
    edges["engine.worker.sinks"].add("engine.service.http")
    edges["engine.core.engine"].add("bench.handlers")
    found = forbidden(edges)
    assert "ipc.ring -> engine.config (ipc never imports engine)" in found
    assert any(p.startswith("engine.worker.sinks -> engine.service.http") for p in found)
    assert any(p.startswith("engine.core.engine -> bench.handlers") for p in found)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import engine.core.engine\n", {"engine.core.engine"}),
        ("def f():\n    from engine.worker import sinks\n", {"engine.worker.sinks"}),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import ipc.ring\n", None),
    ],
)
def test_lazy_and_type_checking_imports_are_edges(
    tmp_path: Path, source: str, expected: set[str] | None
) -> None:
    path = tmp_path / "m.py"
    path.write_text(source)
    found = imports_of("engine.x.m", path, product_modules())
    if expected is None:
        assert "ipc.ring" in found
    else:
        assert expected <= found

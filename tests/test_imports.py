"""The package's import graph: no cycle anywhere, and dependencies point one way.

    config / registry / accounting / models / diffusion / samplers   (core: the network and the processes)
        <- data / train / eval / analysis / parallel / study / generate / convert / ...   (library)
            <- cli   (the `ditmoe` command; nothing else imports it)

The graph is read from the source with `ast`, so nothing is imported. Every `import` statement
counts, at module level or inside a function: a lazy import only defers when a module is loaded,
it still makes the importer depend on the imported module, so a cycle through a lazy import is a
cycle. An edge goes to the module named (`from .x import y` -> `x`, or `x.y` where `y` is a
module); importing `a.b` loads the package `a` first, but that implicit edge is not counted
(otherwise every module would form a cycle with any package `__init__` that re-exports it).
Imports done by name at run time (`importlib.import_module`) are not seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "ditmoe"

# Core modules: import nothing from the library layer or the CLI.
CORE = ("config", "registry", "accounting", "models", "diffusion", "samplers", "devices")
# What the core may not import (the library layer and the command line).
NOT_FROM_CORE = ("data", "train", "eval", "analysis", "parallel", "study", "generate", "convert", "export",
                 "pretrained", "weights_io", "plan", "run_report", "cli")
# Edges (importer, imported) allowed to close a cycle, each cut here with a reason. None: a cycle
# anywhere fails the test. (convert reads model folders through pretrained; pretrained and export
# read and write through weights_io, below both.)
KNOWN_CYCLE_EDGES: set[tuple[str, str]] = set()
# The network itself stays free of the training side, the parallel layouts and the kernels' wiring.
NOT_FROM_MODELS = ("train", "data", "eval", "cli", "kernels", "parallel")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
    """The absolute name of `from <level dots><module> import ...` written in `importer`."""
    if level == 0:
        return module or ""
    base = importer.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported package module: line}} over every module of the package."""
    modules = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                # `import ditmoe.a.b.c` where c is a function is not possible; a longest known prefix is
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and (target == PACKAGE or target.startswith(PACKAGE + ".")):
                    edges.setdefault(target, node.lineno)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, iters = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph.get(nxt, {}))))
    return None


def _describe(graph, cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def _in(module: str, groups: tuple[str, ...]) -> bool:
    return any(module == f"{PACKAGE}.{g}" or module.startswith(f"{PACKAGE}.{g}.") for g in groups)


def test_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    # cli/__init__ imports its subcommand modules; the `ditmoe train` handler imports the loop lazily.
    assert "ditmoe.cli.train" in graph["ditmoe.cli"]
    assert "ditmoe.train.loop" in graph["ditmoe.cli.train"]
    assert find_cycle({"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_no_import_cycle():
    graph = import_graph()
    for a, b in KNOWN_CYCLE_EDGES:
        assert b in graph[a], f"{a} no longer imports {b}: drop the edge from KNOWN_CYCLE_EDGES"
    cut = {a: {b: line for b, line in edges.items() if (a, b) not in KNOWN_CYCLE_EDGES} for a, edges in graph.items()}
    cycle = find_cycle(cut)
    assert cycle is None, f"import cycle: {_describe(graph, cycle)}"


def test_layers():
    graph = import_graph()
    problems = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            where = f"{module} line {line} imports {target}"
            if _in(target, ("cli",)) and not (_in(module, ("cli",)) or module == f"{PACKAGE}.__main__"):
                problems.append(f"{where}: only the command line imports ditmoe.cli")
            if _in(module, CORE) and _in(target, NOT_FROM_CORE):
                problems.append(f"{where}: the core ({', '.join(CORE)}) does not import the library layer or the CLI")
            if _in(module, ("models",)) and _in(target, NOT_FROM_MODELS):
                problems.append(f"{where}: models/ does not import {', '.join(NOT_FROM_MODELS)}")
    assert not problems, "\n".join(problems)

"""The library's import graph: no module imports a command module, and no import cycles, counting the imports
inside functions and under TYPE_CHECKING too (a cycle hidden in a function is still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Modules that only parse arguments and call the library.
COMMANDS = {"mot.cli", "mot.data_commands", "mot.grow_cli", "mot.generate.cli", "mot.interop.cli", "mot.serve.cli"}


def module_names() -> dict[str, Path]:
    names = {}
    for path in (ROOT / "mot").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the mot modules it imports anywhere in its file (`from a.b import c` counts a.b.c if that is a
    module, else a.b)."""
    names = module_names()

    def resolve(name: str) -> str | None:
        while name and name not in names:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in names.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mot":
                targets |= {resolve(f"{node.module}.{alias.name}") for alias in node.names}
            elif isinstance(node, ast.Import):
                targets |= {resolve(alias.name) for alias in node.names if alias.name.split(".")[0] == "mot"}
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_function_level_and_type_checking_imports():
    graph = import_graph()
    assert set(graph) >= COMMANDS
    assert "mot.generate.page" in graph["mot.generate.demo_eval"]  # imported inside a function
    assert "mot.objectives.latents" in graph["mot.generate.diffusion"]  # under TYPE_CHECKING
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_library_module_imports_a_command_module():
    graph = import_graph()
    offenders = {m: sorted(deps & COMMANDS) for m, deps in graph.items() if m not in COMMANDS and deps & COMMANDS}
    assert not offenders, f"library modules importing command modules: {offenders}"


def test_no_import_cycles():
    assert cycles(import_graph()) == []

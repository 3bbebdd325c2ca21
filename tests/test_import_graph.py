"""The package's import graph has no cycle (issue #20), counting imports
inside functions too: a late import hides a cycle from the interpreter, not
from a reader."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mixattn"


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in SRC.glob("*.py")} - {"__init__"}
    graph = {}
    for name in modules:
        deps = set()
        for node in ast.walk(ast.parse((SRC / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("mixattn."):
                    deps.add(node.module.split(".")[1])
                elif node.module == "mixattn":
                    deps.update(a.name for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("mixattn."))
        graph[name] = (deps & modules) - {name}
    return graph


def _cycle(graph):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    graph = _graph()
    assert {"plan", "model", "mpt", "train", "cli"} <= graph.keys()
    assert "plan" in graph["mpt"]  # the graph sees real edges
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None

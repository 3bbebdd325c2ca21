"""The package's import graph has no cycle (issue #20), counting imports
inside functions too: a late import hides a cycle from the interpreter, not
from a reader."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "mixattn"


def _graph() -> dict[str, set[str]]:
    """Module (dotted below mixattn: ``plan``, ``training.recipe``) -> the
    package modules it imports."""
    files = {".".join(p.relative_to(SRC).with_suffix("").parts): p for p in SRC.rglob("*.py")}
    files = {(name[: -len(".__init__")] if name.endswith(".__init__") else name): p for name, p in files.items()}
    files.pop("__init__", None)
    modules = set(files)

    def target(dotted: str) -> str | None:  # the package module a dotted name is, or lies in
        parts = dotted.split(".")
        while parts and ".".join(parts) not in modules:
            parts.pop()
        return ".".join(parts) or None

    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and (node.module == "mixattn" or node.module.startswith("mixattn.")):
                base = node.module[len("mixattn."):] if node.module != "mixattn" else ""
                for a in node.names:  # `from mixattn.training import recipe` imports a module
                    deps.add(target(f"{base}.{a.name}".lstrip(".")) or target(base))
            elif isinstance(node, ast.Import):
                deps.update(target(a.name[len("mixattn."):]) for a in node.names if a.name.startswith("mixattn."))
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
    assert {"plan", "model", "mpt", "cli", "training.recipe", "training.trainer"} <= graph.keys()
    assert "plan" in graph["mpt"]  # the graph sees real edges
    assert {"training.recipe", "training.parallelize"} <= graph["training.trainer"]
    assert graph["config"] == set()  # config is the bottom: every other module may use it
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None

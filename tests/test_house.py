"""The package's shape, held by tests: imports point down (the math never imports the app or the process group),
no import circles, and no function longer than a screen. Read from the source with ``ast``: nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tinybn"
LOWER = ("tinybn.autograd", "tinybn.backend", "tinybn.ops", "tinybn.functional", "tinybn.nn", "tinybn.optim",
         "tinybn.random", "tinybn.gradcheck", "tinybn.communicator")
UPPER = ("tinybn.app", "tinybn.distributed")
LONGEST = 60


def _module_name(path: Path) -> str:
    parts = ["tinybn", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The tinybn modules ``path`` imports, at its top or inside a function."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[:len(base) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)   # "from . import loop" names a module
    return {module for module in found if module.split(".")[0] == "tinybn"}


def _graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    names = {_module_name(path) for path in paths}
    return {_module_name(path): {m for m in _imports(path) if m in names} - {_module_name(path)} for path in paths}


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the modules along it, or None."""
    state = {}

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return trail[trail.index(target):] + [target]
            if target not in state:
                found = visit(target, trail + [target])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_no_import_circles():
    graph = _graph()
    # a package's __init__ gathers its modules: its arrows into itself are not circles
    graph = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    assert _circle(graph) is None, " -> ".join(_circle(graph))


def test_the_math_and_the_layers_never_import_the_app_or_the_process_group():
    upward = [f"{module} -> {target}" for module, targets in _graph().items() if module.startswith(LOWER)
              for target in targets if target.startswith(UPPER)]
    assert not upward, upward


def test_the_graph_reader_sees_a_circle_and_an_upward_arrow():
    """The two tests above would pass on a reader that sees nothing: it must see the arrows that exist."""
    graph = _graph()
    assert "tinybn.app.loop" in graph["tinybn.app.train"] and "tinybn.autograd" in graph["tinybn.functional.batchnorm"]
    assert _circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > LONGEST:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long

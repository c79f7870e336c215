"""The shape of the codebase: imports go one way, no module grows past 800 lines.

The import graph is read from the source (``ast``), counting imports inside functions, so a
cycle cannot hide behind a function-local import. Layers, lowest first:

    core -> kernels -> ops -> distributed / nn / integrations -> cli

A module may import its own layer (within its package) and the layers below it.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "vlmkernels"
MAX_LINES = 800
LAYERS = {
    "core": 0,
    "kernels": 1,
    "ops": 2,
    "distributed": 3,
    "nn": 3,
    "integrations": 3,
    "cli": 4,
    "__main__": 4,
    "__init__": 5,
}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """vlmkernels modules ``name`` imports, anywhere in its source."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _layer(name: str) -> int:
    parts = name.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    return LAYERS.get(top, -1)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                # a package and its own submodules: __init__ re-exports, not a cycle of layers
                if not (node.startswith(nxt + ".") and nxt in graph and node in graph[nxt]):
                    continue
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(nxt) is None:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_imports_go_one_way():
    """core -> kernels -> ops -> distributed / nn / integrations -> cli; siblings at the
    same layer (distributed, nn, integrations) do not import each other's packages except
    nn -> distributed (the modules' process-group entry)."""
    bad = []
    for name, targets in _graph().items():
        if name == "vlmkernels":
            continue
        for target in targets:
            if target == "vlmkernels":
                bad.append(f"{name} imports the top-level package")
                continue
            mine, theirs = _layer(name), _layer(target)
            same_top = name.split(".")[1] == target.split(".")[1]
            if theirs > mine or (theirs == mine and not same_top and theirs == 3):
                if (name.split(".")[1], target.split(".")[1]) != ("nn", "distributed"):
                    bad.append(f"{name} -> {target}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_families_do_not_import_each_other():
    """An op family builds on core and kernels only: what two families share belongs there
    (a family that imports another cannot be added or removed on its own)."""
    bad = []
    for name, targets in _graph().items():
        parts = name.split(".")
        if parts[1:2] != ["ops"] or len(parts) < 3:
            continue
        for target in targets:
            theirs = target.split(".")
            if theirs[1:2] == ["ops"] and len(theirs) >= 3 and theirs[2] != parts[2]:
                bad.append(f"{name} -> {target}")
    assert not bad, "a family imports another:\n" + "\n".join(sorted(bad))


def test_every_module_has_a_layer():
    unknown = [n for n in _modules() if n != "vlmkernels" and _layer(n) < 0]
    assert not unknown, f"modules outside the layers {sorted(LAYERS)}: {unknown}"


def test_no_module_over_800_lines():
    long = {
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"

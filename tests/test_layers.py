"""The package's layers: each part says in its docstring what it may import, and does.

A part is a subpackage of `pyserver` or a module at its top. Its docstring (the
package's `__init__.py`, or the module's own) has a sentence "May import: ..."
naming the parts it may import (`pyserver.errors, pyserver.store`), or "nothing
of pyserver", or "any of pyserver" (optionally "but pyserver.x, ..."). Every
import counts, those inside functions too. The declared rules must leave no
cycle between parts, so neither can the imports.

Below the parts, no two modules may import each other either, directly or round
a circle: the configuration once imported the discovery client, which imported
the launcher to read its state file. A cluster's state now has one module,
`pyserver.cluster.state`, the only one that names the state file, and the
configuration imports neither the cluster, discovery nor the processes.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pyserver"
RULE = re.compile(r"May import:\s*(.+?)(?:\.\s*$|\.\s*\n|\n\s*\n)", re.S | re.M)


def _parts() -> dict[str, Path]:
    """Each part's name and the file whose docstring holds its rule."""
    parts = {path.name: path / "__init__.py" for path in PACKAGE.iterdir() if path.is_dir()}
    parts = {name: init for name, init in parts.items() if init.exists()}
    for module in PACKAGE.glob("*.py"):
        if module.name != "__init__.py":
            parts[module.stem] = module
    return parts


PARTS = _parts()


def _rule(name: str) -> set[str] | None:
    """The parts `name` may import; None for "any of pyserver" (see `_forbidden`)."""
    docstring = ast.get_docstring(ast.parse(PARTS[name].read_text())) or ""
    match = RULE.search(docstring + "\n")
    assert match, f"pyserver.{name}: its docstring says nothing of what it may import"
    text = " ".join(match.group(1).split())
    if text.startswith("any of pyserver"):
        return None
    if text.startswith("nothing of pyserver"):
        return set()
    return _names(name, text)


def _forbidden(name: str) -> set[str]:
    """The parts an "any of pyserver but ..." part may still not import."""
    docstring = ast.get_docstring(ast.parse(PARTS[name].read_text())) or ""
    match = RULE.search(docstring + "\n")
    assert match
    text = " ".join(match.group(1).split())
    _, but, rest = text.partition("any of pyserver but ")
    return _names(name, rest) if but else set()


def _names(name: str, text: str) -> set[str]:
    """The parts named in `text` (`pyserver.x`); the words between them do not count."""
    allowed = set(re.findall(r"\bpyserver\.(\w+)", text))
    assert allowed, f"pyserver.{name}: its rule names no part: {text!r}"
    missing = allowed - set(PARTS)
    assert not missing, f"pyserver.{name}: may import parts that do not exist: {missing}"
    return allowed


def _imports(name: str) -> dict[str, list[str]]:
    """The parts `name` imports, each with where (file:line)."""
    path = PARTS[name]
    files = path.parent.rglob("*.py") if path.name == "__init__.py" else [path]
    found: dict[str, list[str]] = {}
    for file in files:
        module = ".".join(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = module.rsplit(".", 1)[0] if file.name != "__init__.py" else module[:-9]
        for node in ast.walk(ast.parse(file.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against the importing package
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets = (
                    [f"pyserver.{alias.name}" for alias in node.names]
                    if base == "pyserver"
                    else [base]
                )
            for target in targets:
                if target.startswith("pyserver."):
                    part = target.split(".")[1]
                    if part != name:
                        where = f"{file.relative_to(PACKAGE.parent)}:{node.lineno}"
                        found.setdefault(part, []).append(where)
    return found


@pytest.mark.parametrize("name", sorted(PARTS))
def test_each_part_imports_only_what_its_docstring_allows(name: str) -> None:
    allowed = _rule(name)
    imported = _imports(name)
    if allowed is None:
        unexpected = {part: where for part, where in imported.items() if part in _forbidden(name)}
    else:
        unexpected = {part: where for part, where in imported.items() if part not in allowed}
    assert not unexpected, (
        f"pyserver.{name} imports parts its docstring does not allow: {unexpected}"
    )


def test_the_declared_layers_have_no_cycle() -> None:
    """Depth-first search over the rules ("any of pyserver" parts: what they import)."""
    edges = {
        name: (rule if (rule := _rule(name)) is not None else set(_imports(name))) for name in PARTS
    }
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for nxt in sorted(edges[name]):
            if state.get(nxt) == "open":
                cycle = [*path[path.index(nxt) :], nxt] if nxt in path else [name, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[name] = "done"

    for name in sorted(PARTS):
        if name not in state:
            visit(name, [name])


def test_imports_inside_functions_count() -> None:
    """A lazy import is an import: `pyserver admin create-tables` imports the HBase store in
    its function body, and the reader sees it."""
    tree = ast.parse(PARTS["admin"].read_text())
    lazy = [
        node.lineno
        for function in ast.walk(tree)
        if isinstance(function, ast.AsyncFunctionDef | ast.FunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.ImportFrom) and node.module == "pyserver.store.hbase"
    ]
    assert lazy, "the example lazy import is gone: pick another"
    assert f"pyserver/admin.py:{lazy[0]}" in _imports("admin")["store"]


def _module_imports() -> dict[str, set[str]]:
    """Each module of pyserver and the modules of pyserver it imports (a `from package
    import name` counts as importing the package and, if it is one, the module `name`)."""
    modules: dict[str, Path] = {}
    for file in PACKAGE.rglob("*.py"):
        name = ".".join(file.relative_to(PACKAGE.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = file
    graph: dict[str, set[str]] = {}
    for name, file in modules.items():
        package = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{alias.name}" for alias in node.names)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def test_no_import_circle_between_modules() -> None:
    """Tarjan's strongly connected components over every module's imports: none may hold
    two modules (config -> discovery.client -> launcher -> ... -> config was one)."""
    graph = _module_imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(graph[module]):
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            connect(module)
    assert not circles, f"modules importing each other round a circle: {circles}"


def test_the_configuration_knows_nothing_of_a_clusters_state() -> None:
    """The lowest module imports none of the cluster, discovery or the processes (the
    state of a running cluster is read above it, in pyserver.cluster.state)."""
    graph = _module_imports()
    reached = {target.split(".")[1] for target in graph["pyserver.config"]}
    assert not reached & {"cluster", "discovery", "processes"}, graph["pyserver.config"]
    assert "pyserver.processes.launcher" not in {
        target
        for module, targets in graph.items()
        if module.startswith("pyserver.discovery")
        for target in targets
    }


def test_only_the_state_module_names_the_state_file() -> None:
    """Everyone reads and writes `cluster.json` through pyserver.cluster.state."""
    from pyserver.cluster.state import STATE_FILE

    naming = [
        f"{file.relative_to(PACKAGE.parent)}:{node.lineno}"
        for file in PACKAGE.rglob("*.py")
        if file != PACKAGE / "cluster" / "state.py"
        for node in ast.walk(ast.parse(file.read_text()))
        if isinstance(node, ast.Constant) and node.value == STATE_FILE
    ]
    assert not naming, f"modules naming the cluster's state file themselves: {naming}"

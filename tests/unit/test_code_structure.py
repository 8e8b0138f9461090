"""The package's shape, read with ast: no import cycle among the modules of tasks/, and no long function."""

import ast
from pathlib import Path

TASKS = Path(__file__).parents[2] / "tasks"
PACKAGE = "tasks"
LONGEST = 50  # lines, from the `def` line to the last line of the body


def module_name(path: Path) -> str:
    parts = path.relative_to(TASKS.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(TASKS.rglob("*.py"))}


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of the package that NAME (at PATH) imports anywhere in it (functions included, `if
    TYPE_CHECKING:` blocks left out), relative imports resolved; `from .pkg import module` counts as importing
    that module."""
    found = {target for target in imported_names(name, path) if target in known and target != name}
    return {target for target in found if target != PACKAGE}


def imported_names(name: str, path: Path) -> set[str]:
    """What NAME (at PATH) imports as `imported` reads it: each module, and each name `from` one (`module.name`)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(inner) for node in ast.walk(tree) if isinstance(node, ast.If) and is_type_checking(node.test)
                   for statement in node.body for inner in ast.walk(statement)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [origin, *(f"{origin}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= set(targets)
    return found


def is_type_checking(test: ast.expr) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): imports there never run, so they make no cycle."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component that has one (Tarjan), each as the path that closes it."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(set(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [cycle_in(graph, component) for component in components]


def cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A path within COMPONENT from its first module back to it."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        node = frontier.pop(0)
        for other in sorted(graph[node] & component):
            if other == start:
                return [*paths[node], start]
            if other not in paths:
                paths[other] = [*paths[node], other]
                frontier.append(other)
    raise AssertionError(f"no cycle in {component}")


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, known) for name, path in known.items()}


def test_the_graph_reader_resolves_relative_imports_and_finds_a_cycle():
    known = modules()
    assert "tasks.paths" in imported("tasks.host.programs", known["tasks.host.programs"], known)
    assert "tasks.control.caches" in imported("tasks.report", known["tasks.report"], known)
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert "tasks.control.env_store" not in imported("tasks.host.transfer", known["tasks.host.transfer"], known)


def test_no_import_cycle_among_the_modules_of_tasks():
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" -> ".join(cycle) for cycle in found)


def test_no_function_under_tasks_is_longer_than_50_lines():
    long = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > LONGEST:
                    long.append(f"{path.relative_to(TASKS.parent)}:{node.lineno} {node.name} ({length} lines)")
    assert long == [], f"functions longer than {LONGEST} lines: " + ", ".join(long)


# What the control side knows for the whole fleet reaches the host side in the fleet context
# (tasks/control/fleet_context.py, made once in deploy.py and handed down), never from the modules that make it.
HANDED_DOWN = {"tasks.control.env_build.env_source", "tasks.control.env_build.base_image",
               "tasks.control.compose_project.resolved_config"}


def test_host_modules_get_the_env_the_base_image_and_the_resolved_project_from_the_fleet_context():
    known = modules()
    reached = {name: sorted(imported_names(name, path) & HANDED_DOWN) for name, path in known.items()
               if name.startswith("tasks.host.")}
    assert {name: found for name, found in reached.items() if found} == {}
    assert "tasks.control.compose_project" not in imported("tasks.host.ml_env", known["tasks.host.ml_env"], known)
    assert [name for name, path in known.items() if name.startswith("tasks.host.")
            and "tasks.control.env_build" in imported(name, path, known)] == []
    assert [name for name, path in known.items() if name.startswith("tasks.host.")
            and "tasks.control.fleet_context" in imported(name, path, known)] == []  # it comes as an argument

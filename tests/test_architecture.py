"""The layout docs/architecture.md describes, held by the code: the rooms import one another in
one direction only, no two modules import each other (at the top or inside a function), and no
module grows past what a reader takes in at once.

Read from the source with ``ast``: nothing is imported, so these checks take a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pipeline_helpers import PROJECT_ROOT

PACKAGE = PROJECT_ROOT / "covidqu"
#: The commands, one package each (``python -m covidqu.<command>``).
COMMANDS = ("train", "eval", "predict", "analyze", "export", "report")
#: Each room and the rooms it must never import. ``data`` and ``models`` meet only in the
#: config and the batch contract (``covidqu.constants``); ``scoring`` turns predictions into
#: figures without knowing what made them; ``runtime`` runs any command without knowing which.
FORBIDDEN = {
    "data": ("models", "scoring", "runtime", *COMMANDS),
    "models": ("data", "runtime", *COMMANDS),
    "scoring": ("data", "models", "runtime", *COMMANDS),
    "runtime": COMMANDS,
}
#: The longest module a reader should have to hold in mind; past it, a module says at its top
#: why it must be one file (a line starting with this marker).
MAX_LINES = 450
ONE_FILE_MARKER = "# One file:"


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """The covidqu modules ``path`` imports anywhere in it (``from pkg import mod`` counts as
    an import of ``pkg.mod`` where that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("covidqu"))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if not node.module.startswith("covidqu"):
                continue
            found.add(node.module)
            found.update(
                f"{node.module}.{a.name}"
                for a in node.names
                if f"{node.module}.{a.name}" in MODULES
            )
    return {name for name in found if name in MODULES}


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def room(name: str) -> str:
    """``covidqu.data.layout`` -> ``data``; ``covidqu.constants`` -> ``constants``."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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


def test_the_graph_sees_the_imports() -> None:
    # the probe itself: top-level, lazy (inside a function) and package-relative forms
    assert "covidqu.runtime.cli" in GRAPH["covidqu.train"]
    assert "covidqu.train.run" in GRAPH["covidqu.train"]  # imported inside main()
    assert "covidqu.data.synth" in GRAPH["covidqu.data.__main__"]  # from covidqu.data import synth


def test_no_import_cycles() -> None:
    """No module imports another that imports it back, directly or through others: each room
    can be read, and changed, from its dependencies up."""
    assert cycles(GRAPH) == []


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {k: set(v) for k, v in GRAPH.items()}
    graph["covidqu.runtime.cli"].add("covidqu.train")  # train -> runtime.cli -> train
    assert any("covidqu.train" in c and "covidqu.runtime.cli" in c for c in cycles(graph))


@pytest.mark.parametrize("source", sorted(FORBIDDEN))
def test_rooms_import_in_one_direction(source: str) -> None:
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if room(name) == source
        for target in targets
        if room(target) in FORBIDDEN[source]
    )
    assert wrong == []


def test_a_command_imports_no_other_command() -> None:
    """What two commands share lives in ``runtime`` (or below), never in one of them."""
    wrong = sorted(
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if room(name) in COMMANDS
        for target in targets
        if room(target) in COMMANDS and room(target) != room(name)
    )
    assert wrong == []


def test_modules_stay_short() -> None:
    long = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        head = lines[:10]
        if len(lines) > MAX_LINES and not any(ln.startswith(ONE_FILE_MARKER) for ln in head):
            long.append(f"{name}: {len(lines)} lines")
    assert long == [], f"over {MAX_LINES} lines without a '{ONE_FILE_MARKER} <why>' line at the top"


def test_every_command_has_its_room() -> None:
    """``python -m covidqu.<command>`` runs the package's ``__main__``; its ``__init__`` is the
    entry point (light: ``--help`` imports no torch) and its checks sit beside it."""
    for command in COMMANDS:
        assert f"covidqu.{command}.__main__" in MODULES, command
        entry = GRAPH[f"covidqu.{command}"]
        assert "covidqu.runtime.cli" in entry or command == "report", (command, entry)
    for command in ("train", "eval", "predict", "analyze", "export"):  # up-front checks
        assert f"covidqu.{command}.checks" in MODULES, command

"""The layers hold: every import of every module against the README's package table (lazy
imports and TYPE_CHECKING ones too: they are dependencies all the same), no import cycle
between modules, and every fedkit error in the one tree drawn in device_runtime.errors."""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import device_runtime.errors

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("toolkit", "exporters", "device_runtime", "android_harness")
# The table's one exception, worded in its cell: ExecuTorch's Python runtime bindings take torch
# tensors, so the ExecuTorch engine imports both, inside a function, when it opens a bundle.
LAZY_ONLY = {"device_runtime.engines.executorch": {"torch", "executorch"}}


def allowed_imports() -> dict[str, set[str] | None]:
    """package → the top-level modules it may import (None: anything), from README's table."""
    rows = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `")]
    table = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        package = cells[0].strip("`/")
        if package in PACKAGES and len(cells) == 3:
            lazy_prose = cells[2].split(";")[0]  # what follows ';' is prose about the lazy exception
            table[package] = None if cells[2] == "anything" else set(re.findall(r"`(\w+)`", lazy_prose))
    assert set(table) == set(PACKAGES), f"README's package table lists {sorted(table)}"
    return table


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def imports(path: Path) -> Iterator[tuple[str, bool]]:
    """(imported name, inside a function) for every import statement of the file."""
    tree = ast.parse(path.read_text())
    in_function = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for inner in ast.walk(node)
        if isinstance(inner, (ast.Import, ast.ImportFrom))
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in in_function
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import; fedkit imports by absolute name"
            assert node.module is not None
            yield node.module, id(node) in in_function
            for alias in node.names:  # `from toolkit import errors` imports the module toolkit.errors
                if f"{node.module}.{alias.name}" in MODULES:
                    yield f"{node.module}.{alias.name}", id(node) in in_function


def owner(name: str) -> str | None:
    """The fedkit module an imported name lives in (None: not fedkit's)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


@pytest.mark.parametrize("package", [p for p in PACKAGES if p != "toolkit"])
def test_every_import_is_one_the_package_table_allows(package):
    allowed = allowed_imports()[package]
    assert allowed is not None
    wrong = []
    for module, path in MODULES.items():
        if module.split(".")[0] != package:
            continue
        for name, lazy in imports(path):
            top = name.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__" or top in allowed:
                continue
            if lazy and top in LAZY_ONLY.get(module, ()):
                continue
            wrong.append(f"{module} imports {name}{' (lazily)' if lazy else ''}")
    assert not wrong, f"{package}/ may import only {sorted(allowed)} and the standard library:\n" + "\n".join(wrong)


def test_toolkit_is_the_only_package_that_may_import_anything():
    assert allowed_imports()["toolkit"] is None
    # and nothing below it imports it back: the table names no package's way up
    assert all("toolkit" not in (allowed or set()) for allowed in allowed_imports().values())


def test_the_check_sees_imports_it_should_refuse(tmp_path):
    # The check must see an import inside a function, a from-import of a module and a TYPE_CHECKING one.
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
        "def f():\n    from toolkit import errors\n"
    )
    found = set(imports(source))
    assert ("torch", False) in found and ("toolkit.errors", True) in found


def test_no_import_cycle_between_modules():
    graph = {m: {o for name, _ in imports(p) if (o := owner(name)) and o != m} for m, p in MODULES.items()}
    cycles = strongly_connected(graph)
    assert not cycles, f"modules importing each other (through any path): {cycles}"


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """The components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def drawn_tree() -> dict[str, str]:
    """error → its parent, as drawn in device_runtime.errors' docstring."""
    parents: dict[str, str] = {}
    at_depth = {0: "FedkitError"}
    for line in (device_runtime.errors.__doc__ or "").splitlines():
        match = re.match(r"^(\s*(?:│\s*)*)[├└]── (\w+)", line)
        if match:
            depth = len(match.group(1)) // 4 - 1  # the docstring indents by four, and so does each level
            parents[match.group(2)] = at_depth[depth]
            at_depth[depth + 1] = match.group(2)
    return parents


def defined_errors() -> dict[str, tuple[str, str]]:
    """error class → (its base, its module) for every exception class fedkit defines."""
    classes = {}
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
                classes[node.name] = (bases[0] if bases else "", module)
    errors = {"Exception": ("", "")}
    grew = True
    while grew:  # everything that derives from Exception, through any depth
        grew = False
        for name, (base, module) in classes.items():
            if name not in errors and base in errors:
                errors[name] = (base, module)
                grew = True
    del errors["Exception"]
    return errors


def test_every_fedkit_error_is_in_the_one_tree_with_its_parent():
    tree = drawn_tree()
    errors = {
        name: base for name, (base, _) in defined_errors().items() if name not in {"FedkitError", "InternalError"}
    }
    assert errors == tree, "device_runtime.errors' docstring must draw every error under its base class"
    assert defined_errors()["InternalError"][0] == "Exception"  # the one outside the tree, on purpose


def test_every_error_is_defined_once():
    names = []
    for path in MODULES.values():
        names += [
            n.name
            for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.ClassDef) and n.name.endswith("Error")
        ]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)

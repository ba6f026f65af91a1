"""The package's layout: which subpackage may import which, and how large a file or class may grow.

Read from the source with :mod:`ast` (nothing is imported): imports under ``if TYPE_CHECKING:``
are for annotations only and do not count; imports inside functions (lazy ones) do.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_ssr"

#: The subpackages (or top-level modules) each part of the package may import from, besides itself.
#: Lower layers first: the engine's core knows nothing of Lightning front ends, loggers or streams.
ALLOWED: dict[str, set[str]] = {
    "_lazy": set(),  # the lazy-export helper: a leaf every package's __init__ may use
    "core": set(),
    "data": {"core"},
    "norm": {"core"},
    "partial_batches": {"core"},
    "callback": {"core", "norm", "partial_batches"},
    "avalanche": {"core", "norm", "callback", "partial_batches"},
    "loggers": {"core", "norm", "callback", "partial_batches"},
    "continual": {"core", "norm", "callback", "partial_batches", "data", "loggers"},
    "(root)": {"core", "norm", "callback", "partial_batches", "avalanche", "continual", "data", "loggers"},
    "bench": {"(root)", "core", "norm", "callback", "partial_batches", "avalanche", "continual", "data", "loggers"},
    "cli": {"(root)", "core", "norm", "callback", "partial_batches", "avalanche", "continual", "data", "loggers", "bench"},
}
MAX_FILE_LINES = 500
MAX_CLASS_LINES = 300


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        out.append((".".join(("lightning_ssr", *parts)), path))
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "(root)"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every ``lightning_ssr`` module imported at run time (relative imports resolved)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "lightning_ssr")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            if name.split(".")[0] == "lightning_ssr":
                found.add(name)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


MODULES = _modules()


def test_every_part_of_the_package_has_a_layer() -> None:
    assert {_part(m) for m, _ in MODULES} <= set(ALLOWED)


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_no_module_imports_from_a_layer_above_it(module: str, path: Path) -> None:
    part = _part(module)
    tree = ast.parse(path.read_text())
    imported = _runtime_imports(tree, module, path.name == "__init__.py")
    above = sorted(i for i in imported if _part(i) not in (part, "_lazy") and _part(i) not in ALLOWED[part])
    assert not above, f"{module} ({part}) imports {above}; {part} may import only {sorted(ALLOWED[part])}"


def test_the_engine_parts_do_not_import_the_engine() -> None:
    """``SSREngine`` composes the parts; a part never reaches back into the engine."""
    for module, path in MODULES:
        if _part(module) != "core" or module in ("lightning_ssr.core", "lightning_ssr.core.engine"):
            continue
        imported = _runtime_imports(ast.parse(path.read_text()), module, path.name == "__init__.py")
        assert "lightning_ssr.core.engine" not in imported, module


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_files_and_classes_stay_readable(module: str, path: Path) -> None:
    text = path.read_text()
    assert text.count("\n") <= MAX_FILE_LINES, f"{path.name}: {text.count(chr(10))} lines > {MAX_FILE_LINES}"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            size = node.end_lineno - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"{module}.{node.name}: {size} lines > {MAX_CLASS_LINES}"


def test_the_layering_check_catches_an_upward_import() -> None:
    """The check itself can fail: a core module importing the callback is found."""
    tree = ast.parse("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from lightning_ssr.continual import StreamResult\n"
                     "def f():\n    from ..callback import SynapticScaling\n")
    imported = _runtime_imports(tree, "lightning_ssr.core.engine", is_package=False)
    assert imported == {"lightning_ssr.callback"}

"""The house stays legible: no module imports itself through others, and every folder says what it holds.

The layering itself (which room may import which) is import-linter's job (`lint-imports`, contracts in
pyproject.toml); this checks what a layers contract cannot see: cycles between modules of one room.
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]


def _back_edges(graph) -> list[str]:
    """Every direct import `a -> b` that is part of a cycle: one whose target imports its source back, through
    any chain of modules (grimp's own reachability: an independent check of what lint-imports reports)."""
    return sorted(
        f"{importer} -> {imported}"
        for importer in graph.modules
        for imported in graph.find_modules_directly_imported_by(importer)
        if graph.chain_exists(importer=imported, imported=importer)
    )


def test_no_module_imports_itself_through_others():
    # grimp counts the imports under `if TYPE_CHECKING:` too, as the project's rule does; no cache on disk
    graph = grimp.build_graph("unilip", cache_dir=None)
    assert len(graph.modules) > 100  # the whole package was found, not an empty shell
    cycles = _back_edges(graph)
    assert not cycles, "import cycles (each line an import that closes one):\n" + "\n".join(cycles)


def test_a_cycle_is_found_when_there_is_one(tmp_path, monkeypatch):
    """The check itself: a package whose modules import each other (one only under TYPE_CHECKING) is caught."""
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from cyclic import b\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from cyclic import c\n")
    (package / "c.py").write_text("import cyclic.a\n")
    (package / "d.py").write_text("import cyclic.a\n")  # imports into the cycle, is not part of it
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("cyclic", cache_dir=None)
    assert _back_edges(graph) == ["cyclic.a -> cyclic.b", "cyclic.b -> cyclic.c", "cyclic.c -> cyclic.a"]


def test_every_folder_opens_with_what_it_holds():
    """Each package's __init__ starts with a docstring (what the folder holds and what it may import)."""
    silent = [
        str(init.relative_to(REPO))
        for init in sorted((REPO / "unilip").rglob("__init__.py"))
        if not ast.get_docstring(ast.parse(init.read_text()))
    ]
    assert not silent, f"packages without a docstring: {silent}"

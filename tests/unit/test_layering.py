"""The layering rule, beyond what import-linter checks (`lint-imports`, setup.cfg):

- no first-party import inside a function, where it would hide a cycle instead of removing
  it; the two places that import on use, on purpose, are the Airflow task bodies in `dags/`
  (Airflow parses DAG files often and advises it) and the command bodies of `infra/cli.py`
  (so `lambdalake --help` and each command load only the layer they run);
- a layer uses another package only through its public surface: the modules its
  `__init__.py` names in `__all__`.

The import graph is grimp's, the library import-linter builds on.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("lakehouse", "batch", "speed", "serving", "infra")
FIRST_PARTY = {*PACKAGES, "dags"}
IMPORT_ON_USE = ("dags/", "infra/cli.py")


def _function_level_imports(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import):
                modules = [alias.name for alias in inner.names]
            elif isinstance(inner, ast.ImportFrom) and inner.level == 0 and inner.module:
                modules = [inner.module]
            else:
                continue
            found += [f"{path.relative_to(root)}:{inner.lineno} {m}" for m in modules
                      if m.split(".")[0] in FIRST_PARTY]
    return found


def test_no_first_party_import_inside_a_function() -> None:
    sources = [p for folder in FIRST_PARTY for p in sorted((ROOT / folder).rglob("*.py"))]
    assert len(sources) > 50
    hidden = [found for path in sources if not str(path.relative_to(ROOT)).startswith(IMPORT_ON_USE)
              for found in _function_level_imports(path)]
    assert hidden == []


def test_the_check_sees_a_function_level_import(tmp_path: Path) -> None:
    source = tmp_path / "module.py"
    source.write_text("import os\n\ndef f():\n    import json\n    from batch import jobs\n    return jobs\n")
    assert _function_level_imports(source, tmp_path) == ["module.py:5 batch"]


def _public(package: str) -> set[str]:
    names = getattr(importlib.import_module(package), "__all__", None)
    assert names, f"{package}/__init__.py declares no __all__"
    return {f"{package}.{name}" for name in names}


def test_every_package_declares_its_public_modules_and_they_exist() -> None:
    for package in PACKAGES:
        for module in _public(package):
            assert (ROOT / (module.replace(".", "/") + ".py")).exists() or \
                (ROOT / module.replace(".", "/") / "__init__.py").exists(), module


def test_packages_use_each_other_only_through_their_public_modules() -> None:
    """The DAGs (a namespace package, importers only) are held to the same surfaces."""
    graph = grimp.build_graph(*PACKAGES, "dags", include_external_packages=False)
    public = {package: _public(package) for package in PACKAGES}
    assert any(m.startswith("dags.") for m in graph.modules)
    private_uses = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            theirs = imported.split(".")[0]
            if theirs == importer.split(".")[0] or imported == theirs:
                continue
            if not any(imported == m or imported.startswith(m + ".") for m in public[theirs]):
                private_uses.append(f"{importer} -> {imported}")
    assert private_uses == []

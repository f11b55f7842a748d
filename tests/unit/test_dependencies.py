"""Runtime dependencies: pyproject's list is exactly what the package imports (and loads by name)."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "imaging_gateway"

# Distributions the package needs without an import statement: another library loads
# them by name. Each with where that happens.
LOADED_BY_NAME = {
    "aiosqlite": "SQLAlchemy's driver for sqlite+aiosqlite URLs (index/sql.py)",
    "pylibjpeg": "pydicom's pixel data plugin interface (dicom/transcode.py)",
    "pylibjpeg-libjpeg": "pydicom's JPEG / JPEG-LS decoder plugin",
    "pylibjpeg-openjpeg": "pydicom's JPEG 2000 / HTJ2K plugin",
}


def normalize(name: str) -> str:
    """PEP 503 form of a distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return {normalize(r.name): r for r in reqs}


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def third_party_imports(tree: ast.AST) -> set[str]:
    """Top-level modules a module imports at run time (anywhere, also inside functions),
    outside the standard library and the package; imports only for type checking do not
    count: they need nothing installed."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child):
                continue
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            found.update(n.split(".")[0] for n in names)
            visit(child)

    visit(tree)
    return {m for m in found if m not in sys.stdlib_module_names and m != "imaging_gateway"}


def imported_modules() -> dict[str, set[str]]:
    """Third-party top-level modules the package imports -> files importing them."""
    found: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for module in third_party_imports(ast.parse(path.read_text(), str(path))):
            found.setdefault(module, set()).add(str(path.relative_to(ROOT)))
    return found


def imported_distributions() -> dict[str, set[str]]:
    """Distributions providing the imported modules -> files importing them."""
    providers = importlib.metadata.packages_distributions()
    out: dict[str, set[str]] = {}
    for module, files in imported_modules().items():
        dists = providers.get(module)
        assert dists, f"{module} (imported by {sorted(files)}) is installed by no distribution"
        assert len(dists) == 1, f"{module} is provided by several distributions: {dists}"
        out.setdefault(normalize(dists[0]), set()).update(files)
    return out


def test_runtime_dependencies_are_what_the_package_imports() -> None:
    imported = imported_distributions()
    wanted = set(imported) | set(LOADED_BY_NAME)
    have = set(declared())
    undeclared = {d: sorted(imported[d]) for d in sorted(wanted - have)}
    assert not undeclared, f"imported but not in [project] dependencies: {undeclared}"
    unused = sorted(have - wanted)
    assert not unused, (
        f"declared but never imported by imaging_gateway/ (move to [dev], or to "
        f"LOADED_BY_NAME with where it is loaded): {unused}"
    )


def test_the_walk_sees_function_level_imports_and_skips_type_checking_ones() -> None:
    source = (
        "import typing, json\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import asyncpg\n"
        "def f():\n    import botocore.auth as a\n    from yarl import URL\n"
        "from imaging_gateway.errors import NotFound\n"
        "from . import sibling\n"
    )
    assert third_party_imports(ast.parse(source)) == {"botocore", "yarl"}


def test_no_exact_pin_without_a_reason() -> None:
    # An exact pin (==) needs a comment saying why right above it in pyproject.toml.
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    for n, line in enumerate(lines):
        if re.match(r'\s*"[^"]+==[^"]+",?\s*$', line):
            assert lines[n - 1].lstrip().startswith("#"), f"exact pin without a reason: {line}"


def test_boto3_is_a_dev_dependency_compatible_with_botocore() -> None:
    # The package signs with botocore only; boto3 (tests, benches) must accept the same
    # botocore, or pip backtracks through boto3 releases for minutes.
    assert "boto3" not in declared()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev = {normalize(Requirement(r).name) for r in project["optional-dependencies"]["dev"]}
    assert "boto3" in dev
    boto3 = importlib.metadata.distribution("boto3")
    needs = [Requirement(r) for r in boto3.requires or [] if r.startswith("botocore")]
    installed = importlib.metadata.version("botocore")
    assert needs and all(r.specifier.contains(installed) for r in needs)
    assert declared()["botocore"].specifier.contains(installed)

"""The layering contract (import-linter, run by tests/run) covers the whole gateway.

import-linter checks only the modules a contract names: a new subpackage of service/ left out of the
layers could import anything. So every subpackage and top-level module of service/ must be named,
and installed (a package missing from setuptools' list is missing from the wheel).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def gateway_modules() -> set[str]:
    """runbell.service.<name> of each subpackage and top-level module in service/."""
    names = set()
    for entry in (ROOT / "service").iterdir():
        if entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
        elif entry.suffix == ".py" and entry.name != "__init__.py":
            names.add(entry.stem)
    return {f"runbell.service.{name}" for name in names}


def contracts(kind: str) -> list[dict[str, Any]]:
    return [c for c in PYPROJECT["tool"]["importlinter"]["contracts"] if c["type"] == kind]


def test_the_layers_name_every_part_of_the_gateway() -> None:
    (layers,) = contracts("layers")
    named = {module.strip() for layer in layers["layers"] for module in layer.split("|")}
    assert gateway_modules() - named == set(), "service/ has parts the layering contract does not name"
    assert {"runbell.listeners", "runbell.bus"} <= named
    assert named - gateway_modules() - {"runbell.listeners", "runbell.bus"} == set(), "the layers name modules that do not exist"


def test_the_hook_side_may_not_import_the_gateway() -> None:
    forbidden = {frozenset(c["source_modules"]): set(c["forbidden_modules"]) for c in contracts("forbidden")}
    assert "runbell.service" in forbidden[frozenset({"runbell.listeners", "runbell.bus"})]
    assert {"redis", "runbell.listeners"} <= forbidden[frozenset({"runbell.bus"})]


def test_every_subpackage_of_the_gateway_is_installed() -> None:
    packages = set(PYPROJECT["tool"]["setuptools"]["packages"])
    subpackages = {name for name in gateway_modules() if (ROOT / "service" / name.rsplit(".", 1)[1]).is_dir()}
    assert subpackages - packages == set(), "missing from [tool.setuptools] packages: not in the wheel"

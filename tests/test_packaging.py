"""pyproject.toml declares what the package imports: a fresh install (CI's ``scripts/setup.sh``) must not depend on
a package that only happens to come with another one."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"prometheus_client": "prometheus-client", "yaml": "pyyaml"}
# imported only where the code checks for it first (``find_spec`` / a clear error): an extra, not a dependency
OPTIONAL = {"hqq"}


def _imported_modules() -> set[str]:
    names = set()
    for path in (ROOT / "hf_adaptive").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"hf_adaptive"}


def _declared(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower().replace("_", "-") for r in requirements}


def test_every_third_party_import_is_declared():
    """Guards against an import that works here only because another package brought it (``packaging`` did)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    required = _declared(project["dependencies"])
    extras = _declared([r for reqs in project["optional-dependencies"].values() for r in reqs])
    for module in sorted(_imported_modules()):
        dist = DISTRIBUTIONS.get(module, module).lower().replace("_", "-")
        if module in OPTIONAL:
            assert dist in extras and dist not in required, f"{dist}: optional in code, so an extra, not a dependency"
        else:
            assert dist in required, f"hf_adaptive imports {module!r}; declare {dist!r} in pyproject dependencies"

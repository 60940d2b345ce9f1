"""The README and docs name only things that exist (imports in their Python blocks resolve)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
IMPORT = re.compile(r"^\s*from (corelens[\w.]*) import ([\w, ()]+)", re.M)
ATTR = re.compile(r"\bcorelens\.([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*)")


def _blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_imports_exist(doc):
    for block in _blocks(doc.read_text()):
        for module, names in IMPORT.findall(block):
            mod = importlib.import_module(module)
            for name in re.split(r"[,\s()]+", names):
                if name and not hasattr(mod, name):
                    importlib.import_module(f"{module}.{name}")  # a submodule, or ImportError


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_documented_corelens_attributes_exist(doc):
    import corelens

    for dotted in set(ATTR.findall(doc.read_text())):
        obj = corelens
        for part in dotted.split("."):
            if not hasattr(obj, part):
                try:
                    obj = importlib.import_module(f"{obj.__name__}.{part}")
                    continue
                except (ImportError, AttributeError):
                    pass
            assert hasattr(obj, part), f"{doc.name}: corelens.{dotted} does not exist"
            obj = getattr(obj, part)


def test_api_reference_is_current():
    """docs/api.md is generated from the docstrings; regenerate with python docs/gen_api.py."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_api.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_every_public_name_is_documented():
    import corelens

    api = (ROOT / "docs" / "api.md").read_text()
    missing = [n for n in corelens.__all__ if f"`corelens.{n}`" not in api]
    assert not missing, f"docs/api.md lacks {missing}"
    undocumented = [n for n in corelens.__all__
                    if not (getattr(corelens, n).__doc__ or "").strip()]
    assert not undocumented, f"public names without a docstring: {undocumented}"

"""``import corelens`` is light: the public names load on first use, every one resolves."""

from __future__ import annotations

import importlib
import subprocess
import sys

import corelens

HEAVY = ("transformer_lens", "matplotlib", "circuitsvis", "datasets", "pandas", "PIL")


def test_import_loads_no_heavy_dependency():
    code = ("import sys, corelens; print(' '.join(sorted({m.split('.')[0] for m in sys.modules"
            f" if m.split('.')[0] in {HEAVY!r}}})))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.split()
    assert out == []


def test_every_public_name_resolves():
    assert len(corelens.__all__) == len(set(corelens.__all__))
    for name in corelens.__all__:
        assert getattr(corelens, name) is not None, name
    assert set(corelens.__all__) <= set(dir(corelens))
    assert corelens.HookedMLLM.__module__ == "corelens.core.model"
    # the public submodules, wherever they live in the tree
    assert corelens.ram.__name__ == "corelens.scores.ram"
    assert corelens.patching.__name__ == "corelens.interventions.patching"
    importlib.import_module("corelens.core.evaluate")  # a submodule named like its function
    assert corelens.evaluate is sys.modules["corelens.core.evaluate"].evaluate


def test_unknown_name_is_an_attribute_error():
    try:
        corelens.HookedTransformer  # noqa: B018
    except AttributeError as e:
        assert "HookedTransformer" in str(e)
    else:
        raise AssertionError("corelens.HookedTransformer resolved")


def test_every_module_imports_first_in_a_fresh_interpreter():
    """No module relies on another having been imported before it (an import cycle that only
    resolves in one order fails here)."""
    import pkgutil

    names = [m.name for m in pkgutil.walk_packages(corelens.__path__, "corelens.")
             if ".zoo.models" not in m.name and not m.name.endswith("__main__")]
    code = ("import importlib, sys\nbad = []\nfor n in sys.argv[1:]:\n"
            "    for m in [k for k in sys.modules if k.startswith('corelens')]:\n"
            "        del sys.modules[m]\n"
            "    try:\n        importlib.import_module(n)\n"
            "    except Exception as e:\n        bad.append(f'{n}: {e!r}')\n"
            "print('\\n'.join(bad))")
    out = subprocess.run([sys.executable, "-c", code, *names], check=True,
                         capture_output=True, text=True).stdout.strip()
    assert len(names) > 30 and out == ""

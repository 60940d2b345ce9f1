"""``import corelens`` is light: the public names load on first use, every one resolves."""

from __future__ import annotations

import subprocess
import sys

import corelens

HEAVY = ("transformer_lens", "matplotlib", "circuitsvis", "datasets", "pandas", "jaxtyping")


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
    assert corelens.HookedMLLM.__module__ == "corelens.model"
    assert corelens.ram.__name__ == "corelens.ram"


def test_unknown_name_is_an_attribute_error():
    try:
        corelens.HookedTransformer  # noqa: B018
    except AttributeError as e:
        assert "HookedTransformer" in str(e)
    else:
        raise AssertionError("corelens.HookedTransformer resolved")

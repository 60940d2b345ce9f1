"""Offline models: tiny random models for tests (``corelens.zoo.tiny.build_tiny``) and the
trained toy MLLMs that ship with corelens (``names()``, ``load(name)``, ``examples(name, n,
seed)``).

Each shipped model lives in ``corelens/zoo/models/<name>/``: the HF checkpoint (safetensors),
its processor and tokenizer, ``task.json`` (the ``SceneTask`` it was trained on) and
``train_log.json`` (recipe, seed, time, accuracy). ``corelens zoo train`` reproduces them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from corelens.core.model import HookedMLLM
from corelens.errors import InputError
from corelens.zoo.scenes import SceneTask, make_examples

MODELS_DIR = Path(__file__).parent / "models"


def names() -> list[str]:
    """The shipped toy models."""
    if not MODELS_DIR.is_dir():
        return []
    return sorted(p.name for p in MODELS_DIR.iterdir()
                  if (p / "config.json").exists() and (p / "task.json").exists())


def path(name: str) -> Path:
    """The folder of shipped model ``name``."""
    folder = MODELS_DIR / name
    if name not in names():
        raise InputError(f"no shipped toy model {name!r}; shipped: {names()}")
    return folder


def task(name: str) -> Any:
    """The ``SceneTask`` that model ``name`` was trained on."""
    return SceneTask.load(path(name) / "task.json")


def load(name: str, device: Any = None, **kw: Any) -> Any:
    """Load shipped model ``name`` as a ``HookedMLLM`` (offline, from the package folder)."""
    return HookedMLLM.from_pretrained(str(path(name)), device=device, **kw)


def examples(name: str, n: int, seed: int = 0) -> list[Any]:
    """``n`` fresh examples of model ``name``'s task. Held out: training streams draw from a
    reserved seed range that this generator refuses (``scenes.check_held_out``), and sets of
    different seeds are disjoint, so score on one seed and evaluate on another."""
    return make_examples(task(name), n, seed=seed)


__all__ = ["MODELS_DIR", "examples", "load", "names", "path", "task"]

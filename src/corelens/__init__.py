"""corelens: TransformerLens for multimodal LLMs.

Load an MLLM with every TransformerLens hook (``HookedMLLM``), prepare grounded inputs with the
position of every vision token (``MultimodalBatch``, ``VisionLayout``), and run it through an
attention backend that stays memory-efficient unless you hook the attention pattern.

The public names below load on first use (PEP 562): ``import corelens`` stays light, and
TransformerLens (which brings datasets, pandas and torch.distributed along) is imported with the
first name that needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from corelens.errors import CorelensError, InputError, LayoutError, UnknownFamilyError

# bound eagerly: ``evaluate`` is also the name of its module, and importing that module later
# (from anywhere) would rebind ``corelens.evaluate`` to the module
from corelens.evaluate import EvalResult, evaluate

__version__ = "0.1.0"

_SUBMODULES = ("accel", "attribution", "patching", "ram", "views")
_EXPORTS = {
    "AblationCurve": "corelens.ablation",
    "ablate": "corelens.ablation",
    "ablation_curve": "corelens.ablation",
    "text_to_image_knockout": "corelens.ablation",
    "AttentionBackend": "corelens.attention",
    "AttentionInputs": "corelens.attention",
    "MultimodalBatch": "corelens.batch",
    "Evidence": "corelens.examples",
    "GroundedExample": "corelens.examples",
    "Video": "corelens.examples",
    "FAMILIES": "corelens.families",
    "family_for_config": "corelens.families",
    "get_family": "corelens.families",
    "HeadScores": "corelens.head_scores",
    "ImageLayout": "corelens.layout",
    "TokenInfo": "corelens.layout",
    "ViewGeometry": "corelens.layout",
    "VisionLayout": "corelens.layout",
    "load_jsonl": "corelens.loaders",
    "load_refcoco": "corelens.loaders",
    "save_jsonl": "corelens.loaders",
    "HookedMLLM": "corelens.model",
}

__all__ = [
    "AblationCurve",
    "AttentionBackend",
    "AttentionInputs",
    "CorelensError",
    "EvalResult",
    "Evidence",
    "FAMILIES",
    "GroundedExample",
    "HeadScores",
    "HookedMLLM",
    "ImageLayout",
    "InputError",
    "LayoutError",
    "MultimodalBatch",
    "TokenInfo",
    "UnknownFamilyError",
    "Video",
    "ViewGeometry",
    "VisionLayout",
    "ablate",
    "ablation_curve",
    "accel",
    "attribution",
    "evaluate",
    "family_for_config",
    "get_family",
    "load_jsonl",
    "load_refcoco",
    "patching",
    "ram",
    "save_jsonl",
    "text_to_image_knockout",
    "views",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"corelens.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'corelens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from corelens import accel, attribution, patching, ram, views  # noqa: F401
    from corelens.ablation import (  # noqa: F401
        AblationCurve,
        ablate,
        ablation_curve,
        text_to_image_knockout,
    )
    from corelens.attention import AttentionBackend, AttentionInputs  # noqa: F401
    from corelens.batch import MultimodalBatch  # noqa: F401
    from corelens.examples import Evidence, GroundedExample, Video  # noqa: F401
    from corelens.families import FAMILIES, family_for_config, get_family  # noqa: F401
    from corelens.head_scores import HeadScores  # noqa: F401
    from corelens.layout import ImageLayout, TokenInfo, ViewGeometry, VisionLayout  # noqa: F401
    from corelens.loaders import load_jsonl, load_refcoco, save_jsonl  # noqa: F401
    from corelens.model import HookedMLLM  # noqa: F401

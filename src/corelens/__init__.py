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

__version__ = "0.1.0"

# the public submodules, wherever they live in the package tree
_SUBMODULES = {
    "accel": "corelens.accel",
    "attribution": "corelens.interventions.attribution",
    "patching": "corelens.interventions.patching",
    "ram": "corelens.scores.ram",
    "saes": "corelens.saes",
    "views": "corelens.views",
}
_EXPORTS = {
    "AblationCurve": "corelens.interventions.ablation",
    "ablate": "corelens.interventions.ablation",
    "ablation_curve": "corelens.interventions.ablation",
    "text_to_image_knockout": "corelens.interventions.ablation",
    "patch_pairs": "corelens.interventions.runs",
    "FaithfulnessCurve": "corelens.interventions.circuit",
    "acdc": "corelens.interventions.circuit",
    "edge_patching": "corelens.interventions.circuit",
    "faithfulness_curve": "corelens.interventions.circuit",
    "circuit_benchmark": "corelens.interventions.discovery",
    "AttentionBackend": "corelens.core.attention",
    "AttentionInputs": "corelens.core.attention",
    "EvalResult": "corelens.core.evaluate",
    "evaluate": "corelens.core.evaluate",
    "MultimodalBatch": "corelens.data.batch",
    "Evidence": "corelens.data.examples",
    "GroundedExample": "corelens.data.examples",
    "Video": "corelens.data.examples",
    "FAMILIES": "corelens.families",
    "family_for_config": "corelens.families",
    "get_family": "corelens.families",
    "HeadScores": "corelens.scores.head_scores",
    "flow_ram": "corelens.scores.flow",
    "ImageLayout": "corelens.data.layout",
    "TokenInfo": "corelens.data.layout",
    "ViewGeometry": "corelens.data.layout",
    "VisionLayout": "corelens.data.layout",
    "load_jsonl": "corelens.data.loaders",
    "load_refcoco": "corelens.data.loaders",
    "save_jsonl": "corelens.data.loaders",
    "HookedMLLM": "corelens.core.model",
}

__all__ = [
    "AblationCurve",
    "AttentionBackend",
    "AttentionInputs",
    "CorelensError",
    "EvalResult",
    "Evidence",
    "FAMILIES",
    "FaithfulnessCurve",
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
    "acdc",
    "attribution",
    "circuit_benchmark",
    "edge_patching",
    "evaluate",
    "faithfulness_curve",
    "family_for_config",
    "flow_ram",
    "get_family",
    "load_jsonl",
    "load_refcoco",
    "patch_pairs",
    "patching",
    "ram",
    "saes",
    "save_jsonl",
    "text_to_image_knockout",
    "views",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(_SUBMODULES[name])
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'corelens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # the same names, eagerly, for type checkers and IDEs
    from corelens import (  # noqa: F401
        accel,
        saes,  # noqa: F401
        views,
    )
    from corelens.core.attention import AttentionBackend, AttentionInputs  # noqa: F401
    from corelens.core.evaluate import EvalResult, evaluate  # noqa: F401
    from corelens.core.model import HookedMLLM  # noqa: F401
    from corelens.data.batch import MultimodalBatch  # noqa: F401
    from corelens.data.examples import Evidence, GroundedExample, Video  # noqa: F401
    from corelens.data.layout import ImageLayout, TokenInfo, ViewGeometry, VisionLayout  # noqa: F401
    from corelens.data.loaders import load_jsonl, load_refcoco, save_jsonl  # noqa: F401
    from corelens.families import FAMILIES, family_for_config, get_family  # noqa: F401
    from corelens.interventions import attribution, patching  # noqa: F401
    from corelens.interventions.ablation import (  # noqa: F401
        AblationCurve,
        ablate,
        ablation_curve,
        text_to_image_knockout,
    )
    from corelens.interventions.circuit import (  # noqa: F401
        FaithfulnessCurve,
        acdc,
        edge_patching,
        faithfulness_curve,
    )
    from corelens.interventions.discovery import circuit_benchmark  # noqa: F401
    from corelens.interventions.runs import patch_pairs  # noqa: F401
    from corelens.scores import ram  # noqa: F401
    from corelens.scores.flow import flow_ram  # noqa: F401
    from corelens.scores.head_scores import HeadScores  # noqa: F401

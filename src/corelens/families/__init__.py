"""The registry of supported MLLM families: adding one touches its module and this list."""

from __future__ import annotations

from typing import Any

from corelens.errors import UnknownFamilyError
from corelens.families.base import Family
from corelens.families.gemma3 import Gemma3
from corelens.families.idefics3 import Idefics3, SmolVLM
from corelens.families.internvl import InternVL
from corelens.families.llava import Llava
from corelens.families.llava_next import LlavaNext
from corelens.families.onevision import LlavaOnevision
from corelens.families.qwen_vl import Qwen2_5_VL, Qwen2_VL, Qwen3_VL

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (Llava(), LlavaNext(), LlavaOnevision(), Qwen2_VL(), Qwen2_5_VL(), Qwen3_VL(),
              Gemma3(), Idefics3(), SmolVLM(), InternVL())
}


def family_for_config(hf_config: Any) -> Family:
    """The family of an HF config, by ``architectures`` then ``model_type``."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    for fam in FAMILIES.values():
        if any(a in fam.hf_architectures for a in archs):
            return fam
    mtype = getattr(hf_config, "model_type", None)
    for fam in FAMILIES.values():
        if mtype in fam.model_types:
            return fam
    supported = sorted(a for f in FAMILIES.values() for a in f.hf_architectures)
    raise UnknownFamilyError(
        f"corelens does not support this model family (architectures={archs or None}, "
        f"model_type={mtype!r}). Supported HF classes: {', '.join(supported)}. "
        "Add a module under corelens/families/ and register it in corelens/families/__init__.py."
    )


def get_family(name: str) -> Family:
    """The registered family called ``name`` (``corelens families`` lists them)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnknownFamilyError(
            f"unknown family {name!r}; known: {', '.join(sorted(FAMILIES))}"
        ) from None


__all__ = ["FAMILIES", "Family", "family_for_config", "get_family"]

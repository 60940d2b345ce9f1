"""Tiny random models of every family, with offline processors, for tests and the demo."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from corelens.families import Family, get_family
from corelens.families.gemma3 import Gemma3
from corelens.families.idefics3 import Idefics3, SmolVLM
from corelens.families.internvl import InternVL
from corelens.families.llava import Llava
from corelens.families.llava_next import LlavaNext
from corelens.families.onevision import LlavaOnevision
from corelens.families.qwen_vl import Qwen2_5_VL, Qwen2_VL, Qwen3_VL
from corelens.zoo.tiny import gemma3, idefics3, internvl, llava, llava_next, onevision, qwen_vl


@dataclass(frozen=True)
class TinyBuilder:
    """How to build a family's tiny model: ``build(folder, seed, patch_local)`` saves the model
    and its processor; ``image_sizes`` (w, h) exercise the family's geometry in tests."""

    build: Callable[[str | Path, int, bool], None]
    image_sizes: list[tuple[int, int]]


# keyed by the family class itself (looked up by exact type): adding a family adds a line here
BUILDERS: dict[type[Family], TinyBuilder] = {
    Llava: TinyBuilder(llava.build, llava.IMAGE_SIZES),
    LlavaNext: TinyBuilder(llava_next.build, llava_next.IMAGE_SIZES),
    LlavaOnevision: TinyBuilder(onevision.build, onevision.IMAGE_SIZES),
    Qwen2_VL: TinyBuilder(qwen_vl.build_qwen2_vl, qwen_vl.IMAGE_SIZES),
    Qwen2_5_VL: TinyBuilder(qwen_vl.build_qwen2_5_vl, qwen_vl.IMAGE_SIZES),
    Qwen3_VL: TinyBuilder(qwen_vl.build_qwen3_vl, qwen_vl.IMAGE_SIZES),
    Gemma3: TinyBuilder(gemma3.build, gemma3.IMAGE_SIZES),
    Idefics3: TinyBuilder(idefics3.build_idefics3, idefics3.IMAGE_SIZES),
    SmolVLM: TinyBuilder(idefics3.build_smolvlm, idefics3.IMAGE_SIZES),
    InternVL: TinyBuilder(internvl.build, internvl.IMAGE_SIZES),
}


def builder(family: Family | str) -> TinyBuilder:
    """The tiny-model builder of ``family`` (a ``Family`` or a registered family name)."""
    fam = get_family(family) if isinstance(family, str) else family
    try:
        return BUILDERS[type(fam)]
    except KeyError:
        raise ValueError(f"no tiny model for family {fam.name!r} ({type(fam).__name__}); add a "
                         "builder in corelens/zoo/tiny/ and register it in "
                         "corelens/zoo/tiny/__init__.py") from None


def build_tiny(family: Family | str, folder: str | Path, seed: int = 0,
               patch_local: bool = False) -> None:
    """Save a tiny random model of ``family`` and an offline-built processor to ``folder``.

    ``patch_local=True``: the vision tower does not mix patches (each LM vision token depends
    only on its own pixels), which the layout tests need."""
    builder(family).build(folder, seed, patch_local)


def tiny_image_sizes(family: Family | str) -> list[tuple[int, int]]:
    """Image sizes (w, h) that exercise ``family``'s geometry in tests."""
    return list(builder(family).image_sizes)


__all__ = ["BUILDERS", "TinyBuilder", "build_tiny", "builder", "tiny_image_sizes"]

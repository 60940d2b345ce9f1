"""Resolution settings: the image-processor knobs users turn to cap how many vision tokens an
image becomes (Qwen-VL's ``min_pixels`` / ``max_pixels``, Idefics3 / SmolVLM's ``size`` /
``max_image_size`` / ``do_image_splitting``, InternVL's ``max_patches``, LLaVA-NeXT /
OneVision's ``image_grid_pinpoints``, ...).

A setting is any keyword the image (or video) processor's own ``valid_kwargs`` declares; it is
applied the way HF applies it, by rebuilding the processor from its dict with the setting added
(``type(ip).from_dict``), so backward-compatible spellings (Qwen's ``max_pixels`` ->
``size["longest_edge"]``) mean what they mean in HF. Settings the model reads as well
(``Family.config_settings``, e.g. the anyres pinpoints the forward uses to unpack tiles) are
written to the model config too, so they can only be set for the model, not for one call.

The layout never re-predicts a resize from these settings: it reads each image's geometry off
the processor's outputs (``image_grid_thw``, tile counts, ``image_sizes``) and checks it.
"""

from __future__ import annotations

import copy
import difflib
import functools
import typing
from typing import Any, Mapping

from corelens.errors import InputError
from corelens.families.base import Family

# keywords every HF image processor takes that are plumbing, not resolution or pixels
_PLUMBING = frozenset({"return_tensors", "device", "data_format", "input_data_format",
                       "disable_grouping"})
_PARTS = ("image_processor", "video_processor")


def settings_of(part: Any) -> frozenset[str]:
    """The keywords the HF image / video processor ``part`` accepts as settings."""
    kinds = getattr(type(part), "valid_kwargs", None)
    return frozenset() if kinds is None else _declared(kinds)


@functools.lru_cache(maxsize=None)
def _declared(kinds: type) -> frozenset[str]:
    """The settings a ``valid_kwargs`` class declares (a class's annotations do not change:
    resolved once per class, not on every ``prepare``)."""
    try:
        names = typing.get_type_hints(kinds)
    except Exception:  # an annotation HF's module cannot resolve at runtime
        names = getattr(kinds, "__annotations__", {})
    return frozenset(names) - _PLUMBING


def known_settings(processor: Any) -> frozenset[str]:
    """Every setting ``processor``'s image and video processors accept."""
    out: frozenset[str] = frozenset()
    for name in _PARTS:
        part = getattr(processor, name, None)
        if part is not None:
            out |= settings_of(part)
    return out


def split_settings(processor: Any, kw: Mapping[str, Any]) -> tuple[dict[str, Any],
                                                                   dict[str, Any]]:
    """``kw`` -> (processor settings, the rest)."""
    known = known_settings(processor)
    return ({k: v for k, v in kw.items() if k in known},
            {k: v for k, v in kw.items() if k not in known})


def unknown_setting(family: Family, processor: Any, names: Any, where: str) -> InputError:
    """The error for keywords that are not settings of this processor: names them, the close
    matches, and every setting that changes the resolution."""
    known = sorted(known_settings(processor))
    parts = ", ".join(type(getattr(processor, p)).__name__ for p in _PARTS
                      if getattr(processor, p, None) is not None)
    hints = []
    for name in names:
        close = difflib.get_close_matches(name, known, n=3)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(map(repr, close))}?)"
                                    if close else ""))
    return InputError(
        f"{where}: {', '.join(hints)} is not a setting of {family.name}'s processor ({parts}). "
        f"Its settings: {', '.join(known)}. " + (
            f"The ones that set the resolution: {', '.join(family.resolution_settings)}"
            if family.resolution_settings else
            f"{family.name} resizes every image to its vision tower's fixed size"))


def unexpected_keywords(err: TypeError, names: Any) -> list[str] | None:
    """The keywords among ``names`` that a ``TypeError`` ("... got an unexpected keyword
    argument 'x'") names; None if it is another ``TypeError``."""
    if "unexpected keyword argument" not in str(err):
        return None
    return [k for k in names if f"'{k}'" in str(err)]


def _rebuilt(part: Any, settings: Mapping[str, Any]) -> Any:
    """``part`` rebuilt by HF from its dict plus ``settings`` (HF's own meaning of each)."""
    own = {k: v for k, v in settings.items() if k in settings_of(part)}
    if not own:
        return part
    state = part.to_dict()
    for k in own:  # a setting given anew replaces what it overrides in HF's constructor
        state.pop(k, None)
    return type(part).from_dict({**state, **own})


def with_settings(family: Family, processor: Any, settings: Mapping[str, Any],
                  hf_config: Any = None, where: str = "prepare") -> Any:
    """A shallow copy of ``processor`` whose image / video processors carry ``settings``
    (``processor`` itself is untouched). ``hf_config``: also write the settings the model
    reads (``family.config_settings``) to it; without it those are refused."""
    if not settings:
        return processor
    settings = dict(settings)
    unknown = [k for k in settings if k not in known_settings(processor)]
    if unknown:
        raise unknown_setting(family, processor, unknown, where)
    coupled = [k for k in settings if k in family.config_settings]
    if coupled and hf_config is None:
        raise InputError(
            f"{where}: {', '.join(map(repr, coupled))} is read by the {family.name} model too "
            f"(config.{coupled[0]}: the forward unpacks the tiles with it), so it cannot change "
            "for one call. Set it for the model: model.set_resolution("
            f"{coupled[0]}=...) or HookedMLLM.from_pretrained(..., {coupled[0]}=...)")
    out = copy.copy(processor)
    for name in _PARTS:
        part = getattr(processor, name, None)
        if part is not None:
            setattr(out, name, _rebuilt(part, settings))
    for k in coupled:
        for cfg in (hf_config, getattr(hf_config, "text_config", None)):
            if cfg is not None and hasattr(cfg, k):
                setattr(cfg, k, copy.deepcopy(settings[k]))
    return out

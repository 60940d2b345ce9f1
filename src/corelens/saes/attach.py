"""Splice SAEs into a ``HookedMLLM`` by hook name, with SAELens's ``HookedSAETransformer``
semantics (``sae_lens/analysis/hooked_sae_transformer.py``): ``add_sae``, ``reset_saes``, the
``saes`` context, ``run_with_saes``, ``run_with_cache_with_saes``, ``run_with_hooks_with_saes``.

Any hook point works, in the decoder (``blocks.L.hook_resid_post``, ``blocks.L.attn.hook_z``
with ``reshape_activations="hook_z"``, ...) and in the vision tower / projector
(``vision_encoder.encoder_layers.L.hook_resid_post``, ``vision_projector.hook_out``).

How: SAELens swaps the model's ``HookPoint`` module for the SAE. corelens leaves the modules as
they are and adds a permanent forward hook at the hook point, first in line, that returns the
SAE's output in place of the activation. ``model.reset_hooks()`` keeps it; ``reset_saes``
removes it (so does ``reset_hooks(including_permanent=True)``: call ``reset_saes`` after it).
Every hook on that point -- a cache, an edit -- therefore sees what flows on (SAELens:
``hook_sae_output``); the activation before the SAE is ``hook_sae_input``. The SAE's own hook
points join the model's ``hook_dict`` as ``<hook_name>.hook_sae_acts_post`` and so on, as
SAELens's ``setup()`` makes them, so ``run_with_hooks``, ``hooks``, ``add_hook`` and
``run_with_cache`` (with ``positions=``) reach them while the SAE is attached.
"""

from __future__ import annotations

import difflib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from torch import Tensor

from corelens import compat
from corelens.errors import InputError
from corelens.saes.sae import SAE

SAEs = SAE | Sequence[SAE]


@dataclass
class _Splice:
    sae: SAE
    point: Any  # the model's HookPoint
    handle: Any  # TransformerLens's LensHandle of the splicing hook
    names: tuple[str, ...]  # the SAE hook names added to the model's hook table


def attached_saes(model: Any) -> dict[str, SAE]:
    """Hook name -> the SAE spliced in there (SAELens's ``model.acts_to_saes``)."""
    return {name: s.sae for name, s in _splices(model).items()}


def add_sae(model: Any, sae: SAE, use_error_term: bool | None = None) -> None:
    """Splice ``sae`` into ``model`` at ``sae.cfg.metadata.hook_name`` until ``reset_saes``.

    It replaces an SAE already at that hook point. ``use_error_term`` (when given) sets the
    SAE's for as long as it is attached: True keeps the model's forward unchanged (the SAE adds
    its own error back) while hooks on its features change it.
    """
    name = sae.cfg.metadata.hook_name
    if not name:
        raise InputError("this SAE names no hook point: set sae.cfg.metadata.hook_name to one "
                         "of model.hook_dict's names (e.g. 'blocks.1.hook_resid_post')")
    hook_dict = model.hook_dict
    if name not in hook_dict:
        near = difflib.get_close_matches(name, list(hook_dict), n=3)
        raise InputError(f"the model has no hook point {name!r} (the SAE's "
                         "cfg.metadata.hook_name)" + (f"; did you mean {near}?" if near else
                                                      "; see model.hook_dict"))
    if use_error_term is not None:
        if not hasattr(sae, "_original_use_error_term"):
            sae._original_use_error_term = sae.use_error_term
        sae.use_error_term = use_error_term
    splices = _splices(model)
    point = hook_dict[name]
    for other in [n for n, s in splices.items() if n == name or s.point is point]:
        _unsplice(model, splices.pop(other))  # one SAE per hook point, as SAELens
    splices[name] = _splice(model, name, point, sae)


def reset_saes(model: Any, act_names: str | Sequence[str] | None = None,
               prev_saes: Sequence[SAE | None] | None = None) -> None:
    """Remove the SAEs at ``act_names`` (all: None), restoring each one's ``use_error_term``;
    with ``prev_saes``, put those back at the same names instead (None: none there)."""
    splices = _splices(model)
    if act_names is None:
        names = list(splices)
    else:
        names = [act_names] if isinstance(act_names, str) else list(act_names)
    prev = list(prev_saes) if prev_saes else [None] * len(names)
    if len(prev) != len(names):
        raise ValueError("act_names and prev_saes must have the same length")
    for name, prev_sae in zip(names, prev):
        if name not in splices:
            warnings.warn(f"no SAE is attached at {name!r}; nothing to reset", stacklevel=2)
            continue
        current = splices.pop(name)
        if hasattr(current.sae, "_original_use_error_term"):
            current.sae.use_error_term = current.sae._original_use_error_term
            del current.sae._original_use_error_term
        _unsplice(model, current)
        if prev_sae is not None:
            splices[name] = _splice(model, name, model.hook_dict[name], prev_sae)


@contextmanager
def saes(model: Any, saes: SAEs = (), reset_saes_end: bool = True,
         use_error_term: bool | None = None) -> Iterator[Any]:
    """SAELens's ``model.saes(...)``: ``saes`` attached within the block; at its end they are
    removed and the SAEs they replaced come back (``reset_saes_end``)."""
    sae_list = [saes] if isinstance(saes, SAE) else list(saes)
    names: list[str] = []
    prev: list[SAE | None] = []
    try:
        for sae in sae_list:
            before = attached_saes(model).get(sae.cfg.metadata.hook_name)
            add_sae(model, sae, use_error_term=use_error_term)
            names.append(sae.cfg.metadata.hook_name)
            prev.append(before)
        yield model
    finally:
        if reset_saes_end:  # last in, first out: two SAEs at one name restore the first's
            attached = attached_saes(model)
            for name, before in reversed(list(zip(names, prev))):
                if name in attached:
                    reset_saes(model, [name], [before])


def run_with_saes(model: Any, inp: Any, saes: SAEs = (), reset_saes_end: bool = True,
                  use_error_term: bool | None = None, **kw: Any) -> Any:
    """``model(inp, **kw)`` with ``saes`` attached for this call only."""
    with _saes(model, saes, reset_saes_end, use_error_term):
        return model(inp, **kw)


def run_with_cache_with_saes(model: Any, inp: Any, saes: SAEs = (), names_filter: Any = None,
                             reset_saes_end: bool = True, use_error_term: bool | None = None,
                             **kw: Any) -> tuple[Tensor, Any]:
    """``model.run_with_cache(inp, names_filter, **kw)`` (``positions=`` included) with
    ``saes`` attached for this call: the cache holds the SAEs' hook points too, e.g.
    ``cache["blocks.1.hook_resid_post.hook_sae_acts_post"]`` (feature activations)."""
    with _saes(model, saes, reset_saes_end, use_error_term):
        return model.run_with_cache(inp, names_filter=names_filter, **kw)


def run_with_hooks_with_saes(model: Any, inp: Any, saes: SAEs = (),
                             fwd_hooks: Sequence[tuple[Any, Callable]] = (),
                             bwd_hooks: Sequence[tuple[Any, Callable]] = (),
                             reset_saes_end: bool = True, use_error_term: bool | None = None,
                             **kw: Any) -> Any:
    """``model.run_with_hooks(inp, fwd_hooks, bwd_hooks, **kw)`` with ``saes`` attached for
    this call (hooks may name the SAEs' hook points)."""
    with _saes(model, saes, reset_saes_end, use_error_term):
        return model.run_with_hooks(inp, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, **kw)


_saes = saes  # the context under a name the ``saes`` parameters do not shadow


# --- the splice ----------------------------------------------------------------------------------
def _splices(model: Any) -> dict[str, _Splice]:
    found = getattr(model, "_corelens_sae_splices", None)
    if found is None:
        found = {}
        model._corelens_sae_splices = found
    return found


def _splice(model: Any, name: str, point: Any, sae: SAE) -> _Splice:
    handle = point.add_hook(_splicing_hook(name, sae), is_permanent=True, prepend=True)
    table = {f"{name}.{short}": hp for short, hp in sae.hook_dict.items()}
    for full, hp in table.items():
        hp.name = full  # the name TransformerLens's alias map and hook.name report
    _hook_table(model).update(table)
    return _Splice(sae, point, handle, tuple(table))


def _unsplice(model: Any, splice: _Splice) -> None:
    splice.handle.hook.remove()
    for handles in (splice.point.fwd_hooks, splice.point.bwd_hooks):
        handles[:] = [h for h in handles if h is not splice.handle]
    table = _hook_table(model)
    for full in splice.names:
        table.pop(full, None)
    for short, hp in splice.sae.hook_dict.items():
        hp.name = short


def _splicing_hook(name: str, sae: SAE) -> Callable[..., Tensor]:
    def splice(act: Any, hook: Any) -> Tensor:
        if not isinstance(act, Tensor):
            raise InputError(f"the activation at {name!r} is a {type(act).__name__}, not a "
                             "tensor: an SAE cannot be spliced there")
        hook_z = sae.cfg.reshape_activations == "hook_z"
        width = act.shape[-2] * act.shape[-1] if hook_z and act.ndim >= 2 else act.shape[-1]
        if width != sae.cfg.d_in:
            raise InputError(f"the SAE at {name!r} reads d_in={sae.cfg.d_in}, but the "
                             f"activation there is {tuple(act.shape)} (width {width}"
                             + (", heads flattened" if hook_z else "") + "): this SAE was "
                             "trained on another hook point or model")
        out = sae(act.to(sae.device))
        return out.to(device=act.device, dtype=act.dtype)
    return splice


def _hook_table(model: Any) -> dict[str, Any]:
    """The bridge's hook-name table, which ``hook_dict`` copies (SAELens's ``setup()`` plays
    this part; TransformerLens 4.3 has no public way to add a name to it)."""
    return compat.hook_registry(model.bridge)

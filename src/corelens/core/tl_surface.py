"""The TransformerLens names ``HookedMLLM`` takes from its bridge unchanged.

One table per kind (docs/tl_surface.md lists every TL name and what corelens does with it):
weights and modules are read through to the ``TransformerBridge`` (the same tensors, the same
modules: corelens owns the attention forward, not the weights), and so are the hook-management
and token helpers that need no image. What differs on an MLLM -- running the model, caching,
token strings of a batch, hook names -- is written out in ``HookedMLLM`` itself.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

# attributes read from the bridge: weights ([layer, head, ...] as TransformerLens stacks them),
# the decoder's modules, the module table
BRIDGE_ATTRIBUTES = (
    "mod_dict", "blocks", "embed", "ln_final", "unembed",
    "W_E", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
    "W_in", "W_out", "b_in", "b_out", "QK", "OV", "all_head_labels",
)
# a bias the checkpoint does not have reads as zeros of TransformerLens's shape (as
# HookedTransformer's did; TL 4's bridge raises instead)
BIAS_SHAPES = {"b_Q": ("n_layers", "n_heads", "d_head"), "b_K": ("n_layers", "n_heads", "d_head"),
               "b_V": ("n_layers", "n_heads", "d_head"), "b_O": ("n_layers", "d_model"),
               "b_in": ("n_layers", "d_mlp"), "b_out": ("n_layers", "d_model")}
# methods called on the bridge: hook management and token helpers that need no image
BRIDGE_METHODS = (
    "hook_points", "reset_hooks", "remove_all_hook_fns", "to_string", "to_single_token",
    "tokens_to_residual_directions", "get_token_position", "enable_compatibility_mode",
)


def _attribute(name: str) -> property:
    def get(self: Any) -> Any:
        try:
            return getattr(self.bridge, name)
        except AttributeError:
            if name not in BIAS_SHAPES:
                raise
            w = self.bridge.W_E
            shape = tuple(int(getattr(self.cfg, dim)) for dim in BIAS_SHAPES[name])
            return torch.zeros(shape, dtype=w.dtype, device=w.device)
    get.__doc__ = f"TransformerLens's ``{name}``, read from the bridge."
    return property(get)


def _method(name: str) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kw: Any) -> Any:
        return getattr(self.bridge, name)(*args, **kw)
    call.__name__ = name
    call.__doc__ = f"TransformerLens's ``{name}``, called on the bridge."
    return call


def read_through_bridge(cls: type) -> type:
    """Give ``cls`` (which has ``self.bridge``) every name of the two tables."""
    for name in BRIDGE_ATTRIBUTES:
        setattr(cls, name, _attribute(name))
    for name in BRIDGE_METHODS:
        setattr(cls, name, _method(name))
    return cls


class NamedHook:
    """The hook point a hook fires on, seen under the name the hook was added with: TL aliases
    (``blocks.0.hook_resid_post``) share a point with the bridge's name (``blocks.0.hook_out``),
    whose ``.name`` the point carries."""

    def __init__(self, point: Any, name: str) -> None:
        self._point, self.name = point, name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._point, attr)


def with_name(fn: Callable, name: str) -> Callable:
    def hook(act: Any, hook: Any, **kw: Any) -> Any:
        return fn(act, hook=NamedHook(hook, name), **kw)
    return hook

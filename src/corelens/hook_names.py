"""Hook names: the one place that spells ``blocks.L....`` (TransformerLens's ``get_act_name`` for
the hook points corelens reads and edits on a ``TransformerBridge``)."""

from __future__ import annotations

from typing import Any, Callable

ATTENTION_ACTS = ("z", "q", "k", "v", "pattern", "result", "attn_scores", "rot_q", "rot_k")
# inputs of a block's sub-components, as the bridge names them
COMPONENT_INPUTS = {"mlp_in": "mlp.hook_in", "ln1_in": "ln1.hook_in", "ln2_in": "ln2.hook_in"}


def act_name(name: str, layer: int) -> str:
    """The hook name of activation ``name`` in ``layer``: attention activations
    (``ATTENTION_ACTS``) -> ``blocks.L.attn.hook_<name>``; ``mlp_in`` / ``ln1_in`` / ``ln2_in``
    -> ``blocks.L.mlp.hook_in`` / ``blocks.L.ln1.hook_in`` / ...; the others (``resid_pre``,
    ``resid_mid``, ``resid_post``, ``attn_out``, ``mlp_out``) -> ``blocks.L.hook_<name>``."""
    if name in ATTENTION_ACTS:
        return f"blocks.{layer}.attn.hook_{name}"
    if name in COMPONENT_INPUTS:
        return f"blocks.{layer}.{COMPONENT_INPUTS[name]}"
    return f"blocks.{layer}.hook_{name}"


EMBED = "blocks.0.hook_resid_pre"  # the decoder's input embeddings (text and vision)
FINAL_NORM_IN = "ln_final.hook_in"


# --- decoder vs vision tower ---------------------------------------------------------------------
# A suffix filter such as ``lambda n: n.endswith("hook_z")`` also catches the vision tower's
# layers (``vision_encoder.encoder_layers.0.attn.hook_z``): these helpers keep one side.
VISION_PREFIXES = ("vision_encoder.", "vision_projector.")


def is_vision_hook(name: str) -> bool:
    """A hook of the vision tower or the projector (batched by image, not by sequence)."""
    return name.startswith(VISION_PREFIXES)


def is_decoder_hook(name: str) -> bool:
    """A hook of the language model: embeddings, ``blocks.L...``, final norm, unembedding."""
    return not is_vision_hook(name)


def _matcher(names_filter: Any) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name.endswith(names_filter)
    if callable(names_filter):
        return names_filter
    wanted = set(names_filter)
    return lambda name: name in wanted


def decoder_hooks(names_filter: Any = None) -> Callable[[str], bool]:
    """A ``names_filter`` keeping decoder hooks that match ``names_filter`` (None: all; a string:
    a suffix such as ``"hook_z"``; a list of names; or a predicate)."""
    match = _matcher(names_filter)
    return lambda name: is_decoder_hook(name) and match(name)


def vision_hooks(names_filter: Any = None) -> Callable[[str], bool]:
    """``decoder_hooks``'s counterpart for the vision tower and the projector."""
    match = _matcher(names_filter)
    return lambda name: is_vision_hook(name) and match(name)

"""Hook names: the one place that spells ``blocks.L....`` (TransformerLens's ``get_act_name`` for
the hook points corelens reads and edits on a ``TransformerBridge``)."""

from __future__ import annotations

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

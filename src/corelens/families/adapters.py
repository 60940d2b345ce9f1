"""The TransformerLens adapters corelens adds, in one place, registered explicitly.

TransformerLens 4.3 has no adapter for two supported HF classes:

- ``InternVLForConditionalGeneration``: its decoder side is TransformerLens's LLaVA adapter
  unchanged (the module paths ``model.language_model`` / ``lm_head`` are the same, and the
  optional ``q_norm``/``k_norm`` cover InternVL3.5's Qwen3 decoder); the vision side wraps
  ``model.vision_tower`` (InternViT: ``embeddings``, ``encoder.layer[i]`` with
  ``attention.{q,k,v}_proj`` / ``projection_layer``, ``mlp.fc1/fc2``, ``layernorm``) and
  ``model.multi_modal_projector``.
- ``Qwen2VLForConditionalGeneration``: laid out as Qwen2.5-VL (``model.visual`` blocks with
  ``norm1``/``norm2``/``attn.qkv``/``attn.proj``, ``model.visual.merger``, a Qwen2 decoder with
  q/k/v biases at ``model.language_model``), except that its vision MLP is a plain ``fc1`` ->
  act -> ``fc2`` (Qwen2.5-VL's is gated) and its vision width is ``embed_dim`` (``hidden_size``
  is the LM width the merger projects to).

``register_adapters()`` adds them to TransformerLens's ``ArchitectureAdapterFactory`` (once);
``HookedMLLM`` calls it before it builds a bridge. Importing this module registers nothing.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformer_lens.model_bridge.generalized_components import (
    LinearBridge,
    VisionProjectionBridge,
)
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.generalized_components.mlp import MLPBridge
from transformer_lens.model_bridge.generalized_components.siglip_vision_encoder import (
    SiglipVisionEncoderBridge,
    SiglipVisionEncoderLayerBridge,
)
from transformer_lens.model_bridge.generalized_components.vision_encoder import (
    vision_attention_config,
)
from transformer_lens.model_bridge.supported_architectures.llava import LlavaArchitectureAdapter
from transformer_lens.model_bridge.supported_architectures.qwen2_5_vl import (
    Qwen2_5_VLArchitectureAdapter,
)

from corelens import compat


# --- InternVL -----------------------------------------------------------------------------------
class InternVLVisionLayerBridge(SiglipVisionEncoderLayerBridge):
    """One InternViT layer: ``layernorm_before`` -> ``attention`` (x lambda_1) -> residual ->
    ``layernorm_after`` -> ``mlp`` (x lambda_2) -> residual. Its forward takes no mask."""

    def __init__(self, name: str, config: Optional[Any] = None) -> None:
        super().__init__(name, config, submodules={
            "ln1": GeneralizedComponent(name="layernorm_before"),
            "attn": AttentionBridge(
                name="attention", config=vision_attention_config(config),
                submodules={"q": LinearBridge(name="q_proj"), "k": LinearBridge(name="k_proj"),
                            "v": LinearBridge(name="v_proj"),
                            "o": LinearBridge(name="projection_layer")}),
            "ln2": GeneralizedComponent(name="layernorm_after"),
            "mlp": MLPBridge(name="mlp", config=config,
                             submodules={"in": LinearBridge(name="fc1"),
                                         "out": LinearBridge(name="fc2")}),
        })

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.original_component is None:
            raise RuntimeError(f"Original component not set for {self.name}.")
        out = self.original_component(self.hook_in(hidden_states), *args, **kwargs)
        if isinstance(out, tuple):
            return (self.hook_out(out[0]),) + out[1:]
        return self.hook_out(out)


class InternVLVisionEncoderBridge(SiglipVisionEncoderBridge):
    """The InternViT tower (``InternVLVisionModel``): embeddings (CLS + patches + positions),
    ``encoder.layer``, final ``layernorm`` (an identity under mean pooling)."""

    def __init__(self, name: str, config: Optional[Any] = None) -> None:
        super().__init__(name, config, submodules={
            "embeddings": GeneralizedComponent(name="embeddings"),
            "encoder_layers": InternVLVisionLayerBridge(name="encoder.layer", config=config),
            "post_layernorm": GeneralizedComponent(name="layernorm"),
        })


class InternVLArchitectureAdapter(LlavaArchitectureAdapter):
    """``InternVLForConditionalGeneration``: LLaVA's module layout with an InternViT tower."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.component_mapping["vision_encoder"] = InternVLVisionEncoderBridge(
            name="model.vision_tower", config=self.cfg)
        self.component_mapping["vision_projector"] = VisionProjectionBridge(
            name="model.multi_modal_projector")


# --- Qwen2-VL -----------------------------------------------------------------------------------
class Qwen2VLArchitectureAdapter(Qwen2_5_VLArchitectureAdapter):
    """Qwen2-VL: Qwen2.5-VL's mapping with a non-gated ``fc1``/``fc2`` vision MLP."""

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        vision_cfg = getattr(cfg, "vision_config", None)
        if getattr(vision_cfg, "embed_dim", None) is not None:
            self.cfg.vision_hidden_size = vision_cfg.embed_dim
        blocks = self.component_mapping["vision_encoder"].submodules["blocks"]
        blocks.submodules["mlp"] = GeneralizedComponent(
            name="mlp", submodules={"in": LinearBridge(name="fc1"),
                                    "out": LinearBridge(name="fc2")})


# HF class name -> the adapter corelens registers for it
ADAPTERS: dict[str, type] = {
    "InternVLForConditionalGeneration": InternVLArchitectureAdapter,
    "Qwen2VLForConditionalGeneration": Qwen2VLArchitectureAdapter,
}


def register_adapters() -> None:
    """Register every adapter of ``ADAPTERS`` with TransformerLens (idempotent)."""
    for name, adapter in ADAPTERS.items():
        compat.register_tl_adapter(name, adapter)

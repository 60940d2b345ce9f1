"""InternVL (``InternVLForConditionalGeneration``: InternVL3 / InternVL3.5 as in transformers):
InternViT tower, pixel-shuffle + MLP projector, Qwen2 / Qwen3 (or Llama) decoder.

Geometry of one image (``GotOcr2ImageProcessor`` with ``crop_to_patches``, then
``InternVLModel.get_image_features``):

1. dynamic tiling: ``get_optimal_tiled_canvas`` picks the grid of ``cols x rows`` tiles (between
   ``min_patches`` and ``max_patches`` tiles) whose aspect ratio is closest to the image's; the
   image is squashed to ``cols * T x rows * T`` (``T`` = the processor's ``size``) and cut into
   tiles, row-major; when there is more than one tile, the whole image squashed to ``T x T`` is
   appended as the *thumbnail*. Without ``crop_to_patches`` (or ``max_patches <= 1``) the image is
   squashed to ``T x T`` alone;
2. the tower cuts ``T / patch`` patches per side, the CLS feature is dropped
   (``vision_feature_select_strategy="default"``), and the pixel shuffle (``downsample_ratio``
   0.5) folds each 2 x 2 block of patches into one LM token, row-major: ``n = T * ratio / patch``
   tokens per side, each a ``patch / ratio`` square of its tile.

The processor writes ``<img>`` + ``<IMG_CONTEXT>`` x (``image_seq_length`` x tiles) + ``</img>``
per image: the delimiters are text tokens, only ``<IMG_CONTEXT>`` positions get features, in the
order above. Each token's box is its block of patches in its tile (or thumbnail), mapped back
through crop and resize to ORIGINAL image pixels.

TransformerLens 4.3 has no InternVL adapter: ``InternVLArchitectureAdapter`` below is registered
with ``ArchitectureAdapterFactory.register_adapter`` when this module is imported (the family
registry imports it). Its decoder side is TransformerLens's LLaVA adapter unchanged (the module
paths ``model.language_model`` / ``lm_head`` are the same, and the optional ``q_norm``/``k_norm``
cover InternVL3.5's Qwen3 decoder); the vision side wraps ``model.vision_tower`` (InternViT:
``embeddings``, ``encoder.layer[i]`` with ``attention.{q,k,v}_proj`` / ``projection_layer``,
``mlp.fc1/fc2``, ``layernorm``) and ``model.multi_modal_projector``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
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

from corelens import compat
from corelens.families.base import Family
from corelens.families.geometry import Affine, size_dict
from corelens.layout import FeatureRows, ViewGeometry

ARCHITECTURE = "InternVLForConditionalGeneration"

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif c['type'] == 'video' %}<video>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Tiny-model settings: 32-px tiles of 4-px patches, shuffled 2 x 2 -> 4 x 4 LM tokens of 8 px per
# tile; up to 6 tiles (+ thumbnail).
TINY_TILE, TINY_PATCH, TINY_MAX_TILES = 32, 4, 6
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}


# --- the TransformerLens adapter --------------------------------------------------------------
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


ArchitectureAdapterFactory.register_adapter(ARCHITECTURE, InternVLArchitectureAdapter)


# --- the family -------------------------------------------------------------------------------
def _side(v: Any) -> int:
    """A config's image/patch size as one int (they may be ``[h, w]`` lists, square here)."""
    if isinstance(v, (list, tuple)):
        if len(set(int(x) for x in v)) != 1:
            raise ValueError(f"internvl: non-square size {v} is not supported")
        return int(v[0])
    return int(v)


class InternVL(Family):
    name = "internvl"
    hf_architectures = (ARCHITECTURE,)
    model_types = ("internvl",)

    def bridge_architecture(self, hf_config: Any) -> str:
        return ARCHITECTURE  # registered above

    # --- processor arithmetic -----------------------------------------------------------------
    @staticmethod
    def _image_kwargs(processor: Any) -> dict[str, Any]:
        """The image-processor settings the processor call really uses (its class defaults,
        e.g. ``crop_to_patches=True``, override the image processor's own attributes)."""
        ip = processor.image_processor
        out = {k: getattr(ip, k, None) for k in ("size", "crop_to_patches", "min_patches",
                                                   "max_patches", "do_resize")}
        merged = compat.processor_images_kwargs(processor) or {}
        out.update({k: v for k, v in merged.items() if k in out})
        return out

    def views(self, processor: Any, size: tuple[int, int]) -> list[tuple[str, Affine]]:
        """(name, original -> view pixels) of every tile of an image, in feature order."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            get_optimal_tiled_canvas,
        )

        kw = self._image_kwargs(processor)
        s = size_dict(kw["size"])
        th, tw = int(s["height"]), int(s["width"])
        w, h = size
        a = Affine.identity(size)
        lo, hi = int(kw.get("min_patches") or 1), int(kw.get("max_patches") or 1)
        if not kw.get("crop_to_patches") or hi <= 1:
            return [("image", a.resize((tw, th)))]
        cols, rows = get_optimal_tiled_canvas((h, w), (th, tw), lo, hi)
        canvas = a.resize((tw * cols, th * rows))
        out = [(f"tile r{i // cols + 1}c{i % cols + 1}",
                canvas.crop((i % cols) * tw, (i // cols) * th, (tw, th)))
               for i in range(cols * rows)]
        if len(out) != 1:
            out.append(("thumbnail", a.resize((tw, th))))
        return out

    # --- the layout ----------------------------------------------------------------------------
    def image_token_string(self, processor: Any) -> str:
        return str(processor.image_token)

    def feature_rows(self, hf_config, processor, inputs, image, size):
        vc = hf_config.vision_config
        tile, patch = _side(vc.image_size), _side(vc.patch_size)
        ratio = float(hf_config.downsample_ratio)
        where = f"{self.name}: image {image} (size {size[0]}x{size[1]})"
        if hf_config.vision_feature_select_strategy != "default":
            raise ValueError(f"{where}: vision_feature_select_strategy="
                             f"{hf_config.vision_feature_select_strategy!r} keeps the CLS feature "
                             "and HF cannot pixel-shuffle it either")
        cell = round(patch / ratio)
        n = tile // cell  # LM tokens per tile side
        seq = int(getattr(processor, "image_seq_length", n * n))
        if seq != n * n:
            raise ValueError(f"{where}: the processor writes {seq} image tokens per tile but the "
                             f"model merges {n}x{n} = {n * n}; their image_seq_length differs")
        pixels = inputs.get("pixel_values")
        if pixels is not None and tuple(pixels.shape[-2:]) != (tile, tile):
            raise ValueError(f"{where}: processed tiles are {tuple(pixels.shape[-2:])} (h, w) but "
                             f"the tower takes {tile} px; corelens does not understand this "
                             "processor")
        parts = []
        for name, a in self.views(processor, size):
            if a.size != (tile, tile):
                raise ValueError(f"{where}: the processor makes {a.size} (w, h) tiles but the "
                                 f"tower takes {tile} px")
            s, o = a.inverse()
            parts.append(FeatureRows.grid(ViewGeometry.from_affine(name, n, n, (cell, cell), s, o,
                                                                   size)))
        return FeatureRows.concat(parts)

    # --- tiny models -------------------------------------------------------------------------
    def tiny_image_sizes(self) -> list[tuple[int, int]]:
        # tile grid (cols x rows, by aspect ratio, <= 6 tiles) and LM tokens (16 per tile):
        # (80, 50): 3 x 2 + thumbnail = 112; (90, 28): 3 x 1 + thumbnail = 64;
        # (40, 70): 1 x 2 + thumbnail = 48; (30, 30): 1 x 1, no thumbnail = 16.
        return [(80, 50), (90, 28), (40, 70), (30, 30)]

    def build_tiny(self, folder: str | Path, seed: int = 0, patch_local: bool = False) -> None:
        """A Qwen3 decoder (InternVL3.5's; q_norm / k_norm). ``patch_local``: every vision
        layer's attention output projection is zeroed, so each patch (and after the pixel
        shuffle each LM token) depends only on its own pixels."""
        from transformers import (
            InternVLConfig,
            InternVLForConditionalGeneration,
            InternVLProcessor,
            InternVLVisionConfig,
            PreTrainedTokenizerFast,
            Qwen3Config,
        )
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            GotOcr2ImageProcessorPil,
        )
        from transformers.models.internvl.video_processing_internvl import (
            InternVLVideoProcessor,
        )

        from corelens.zoo.tokenizer import build_tokenizer

        build_tokenizer(folder, add_bos=False, extra_special=["<img>", "</img>", "<IMG_CONTEXT>"])
        tok = PreTrainedTokenizerFast.from_pretrained(folder, **IMAGE_TOKENS)
        tok.save_pretrained(folder)
        tok = PreTrainedTokenizerFast.from_pretrained(folder)
        vc = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, image_size=[TINY_TILE, TINY_TILE],
                                  patch_size=[TINY_PATCH, TINY_PATCH])
        tc = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         vocab_size=len(tok), max_position_embeddings=1024,
                         pad_token_id=tok.pad_token_id, bos_token_id=None,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
        cfg = InternVLConfig(vision_config=vc.to_dict(), text_config=tc.to_dict(),
                             image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
                             image_seq_length=(TINY_TILE // (2 * TINY_PATCH)) ** 2,
                             downsample_ratio=0.5, projector_hidden_act="gelu",
                             vision_feature_layer=-1, vision_feature_select_strategy="default")
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(cfg).eval()
        if patch_local:
            with torch.no_grad():
                for layer in model.model.vision_tower.encoder.layer:
                    layer.attention.projection_layer.weight.zero_()
                    layer.attention.projection_layer.bias.zero_()
        square = {"height": TINY_TILE, "width": TINY_TILE}
        ip = GotOcr2ImageProcessorPil(size=square, crop_to_patches=True, min_patches=1,
                                      max_patches=TINY_MAX_TILES)
        vp = InternVLVideoProcessor(size=square)
        proc = InternVLProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                                 image_seq_length=cfg.image_seq_length,
                                 chat_template=CHAT_TEMPLATE)
        model.save_pretrained(folder)
        proc.save_pretrained(folder)

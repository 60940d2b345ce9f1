"""The tiny random Idefics3 and SmolVLM models (``corelens.families.idefics3``) for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from corelens.zoo.tiny.llava import SIMPLE_CHAT_TEMPLATE
from corelens.zoo.tokenizer import build_tokenizer

# 32-px tiles of 4-px patches, shuffled 2x2 -> 4 x 4 LM tokens of 8 px per view; images resized
# to a longest edge of 96 -> up to 3 x 3 tiles.
TINY_TILE, TINY_PATCH, TINY_SCALE, TINY_LONGEST = 32, 4, 2, 96
MARKER_TOKENS = (["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
                 + [f"<row_{r + 1}_col_{c + 1}>" for r in range(6) for c in range(6)])

# resized (longest edge 96), fitted to 32-px tiles, views and LM tokens (16 per view):
# (80, 50) -> 96x60 -> 96x64: 2 x 3 tiles + global = 112 tokens;
# (90, 28) -> 96x30 -> 96x32: 1 x 3 tiles + global = 64;
# (40, 70) -> 54x96 -> 64x96: 3 x 2 tiles + global = 112;
# (100, 100) -> 96x96: 3 x 3 tiles + global = 160. (Small images are upscaled to the
# longest edge too, but a 4x upscale's resampling kernel spans more than the
# painted-region test's half-token margin, so the tiny sizes stay near scale 1.)
IMAGE_SIZES = [(80, 50), (90, 28), (40, 70), (100, 100)]

IMAGE_SEQ_LEN = (TINY_TILE // TINY_PATCH // TINY_SCALE) ** 2


def _image_processor_kwargs() -> dict[str, Any]:
    return dict(size={"longest_edge": TINY_LONGEST},
                max_image_size={"longest_edge": TINY_TILE}, do_image_splitting=True)


def _build(folder: str | Path, seed: int, patch_local: bool, classes: tuple[Any, Any, Any],
           processor: Callable[[Any], Any]) -> None:
    """``classes``: (model config class, vision config class, model class).

    ``patch_local``: every vision layer's attention output projection is zeroed, so each patch
    (and after the pixel shuffle each LM token) depends only on its own pixels."""
    from transformers import LlamaConfig

    cfg_cls, vision_cls, model_cls = classes
    tok = build_tokenizer(folder, extra_special=MARKER_TOKENS)
    vc = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=2, image_size=TINY_TILE, patch_size=TINY_PATCH)
    tc = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     vocab_size=len(tok), max_position_embeddings=1024,
                     pad_token_id=tok.pad_token_id)
    cfg = cfg_cls(vision_config=vc.to_dict(), text_config=tc.to_dict(),
                  scale_factor=TINY_SCALE, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    if patch_local:
        with torch.no_grad():
            for layer in model.model.vision_model.encoder.layers:
                layer.self_attn.out_proj.weight.zero_()
                layer.self_attn.out_proj.bias.zero_()
    model.save_pretrained(folder)
    processor(tok).save_pretrained(folder)


def build_idefics3(folder: str | Path, seed: int = 0, patch_local: bool = False) -> None:
    """Save a tiny random Idefics3 and its offline processor to ``folder``."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig

    _build(folder, seed, patch_local,
           (Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration),
           idefics3_processor)


def build_smolvlm(folder: str | Path, seed: int = 0, patch_local: bool = False) -> None:
    """Save a tiny random SmolVLM and its offline processor to ``folder``."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMVisionConfig

    _build(folder, seed, patch_local,
           (SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration),
           smolvlm_processor)


def idefics3_processor(tok: Any) -> Any:
    """The tiny Idefics3's offline processor around tokenizer ``tok``."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import (
        Idefics3ImageProcessorPil,
    )

    ip = Idefics3ImageProcessorPil(**_image_processor_kwargs())
    return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=IMAGE_SEQ_LEN,
                             chat_template=SIMPLE_CHAT_TEMPLATE)


def smolvlm_processor(tok: Any) -> Any:
    """The tiny SmolVLM's offline processor (images and videos) around tokenizer ``tok``."""
    from transformers import SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import (
        SmolVLMImageProcessorPil,
    )
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor

    ip = SmolVLMImageProcessorPil(**_image_processor_kwargs())
    vp = SmolVLMVideoProcessor(size={"longest_edge": TINY_LONGEST},
                               max_image_size={"longest_edge": TINY_TILE})
    return SmolVLMProcessor(image_processor=ip, tokenizer=tok, video_processor=vp,
                            image_seq_len=IMAGE_SEQ_LEN, chat_template=SIMPLE_CHAT_TEMPLATE)

"""The tiny random InternVL model (``corelens.families.internvl``) for tests."""

from __future__ import annotations

from pathlib import Path

import torch

from corelens.zoo.tokenizer import build_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif c['type'] == 'video' %}<video>\n"
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# 32-px tiles of 4-px patches, shuffled 2 x 2 -> 4 x 4 LM tokens of 8 px per tile; up to 6 tiles
# (+ thumbnail).
TINY_TILE, TINY_PATCH, TINY_MAX_TILES = 32, 4, 6
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}

# tile grid (cols x rows, by aspect ratio, <= 6 tiles) and LM tokens (16 per tile):
# (80, 50): 3 x 2 + thumbnail = 112; (90, 28): 3 x 1 + thumbnail = 64;
# (40, 70): 1 x 2 + thumbnail = 48; (30, 30): 1 x 1, no thumbnail = 16.
IMAGE_SIZES = [(80, 50), (90, 28), (40, 70), (30, 30)]


def build(folder: str | Path, seed: int = 0, patch_local: bool = False) -> None:
    """Save a tiny random InternVL with a Qwen3 decoder (InternVL3.5's; q_norm / k_norm) and
    its offline processor to ``folder``.

    ``patch_local``: every vision layer's attention output projection is zeroed, so each patch
    (and after the pixel shuffle each LM token) depends only on its own pixels."""
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

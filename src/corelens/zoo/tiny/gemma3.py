"""The tiny random Gemma 3 model (``corelens.families.gemma3``) for tests."""

from __future__ import annotations

from pathlib import Path

import torch

from corelens.zoo.tiny.llava import SIMPLE_CHAT_TEMPLATE
from corelens.zoo.tokenizer import build_tokenizer

BOI, EOI, SOFT = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
CHAT_TEMPLATE = SIMPLE_CHAT_TEMPLATE.replace("<image>", BOI)

# a 32-px SigLIP with 4-px patches (8 x 8), pooled 2 x 2 -> 4 x 4 tokens
TINY_IMAGE, TINY_PATCH, TINY_TOKENS = 32, 4, 16

# every image is squashed to 32 x 32 (4 x 4 tokens): the sizes vary the per-axis scale
# (down, up, very wide, small); the parity batch pads through its prompts' lengths
IMAGE_SIZES = [(80, 50), (40, 70), (90, 28), (30, 20)]


def build(folder: str | Path, seed: int = 0, patch_local: bool = False) -> None:
    """Save a tiny random Gemma 3 and its offline processor to ``folder``.

    ``patch_local``: the vision layers' attention output projections are zeroed, so each
    patch (and each pooled LM token) depends only on its own pixels and position."""
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        PreTrainedTokenizerFast,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import (
        Gemma3ImageProcessorPil,
    )

    build_tokenizer(folder, extra_special=[BOI, EOI, SOFT])
    # Gemma3Processor reads boi/eoi/image tokens off the tokenizer: name them, save again
    tok = PreTrainedTokenizerFast.from_pretrained(folder, model_specific_special_tokens={
        "boi_token": BOI, "eoi_token": EOI, "image_token": SOFT})
    tok.save_pretrained(folder)
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, image_size=TINY_IMAGE,
                            patch_size=TINY_PATCH, vision_use_head=False)
    # window 6 < an image's 16 tokens: sliding layers cut into the bidirectional blocks
    tc = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          query_pre_attn_scalar=24, sliding_window=6,
                          layer_types=["sliding_attention", "full_attention"],
                          vocab_size=len(tok), max_position_embeddings=512,
                          pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                          eos_token_id=tok.eos_token_id)
    cfg = Gemma3Config(vision_config=vc, text_config=tc, mm_tokens_per_image=TINY_TOKENS,
                       boi_token_index=tok.convert_tokens_to_ids(BOI),
                       eoi_token_index=tok.convert_tokens_to_ids(EOI),
                       image_token_index=tok.convert_tokens_to_ids(SOFT))
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # HF initialises the projection to zero (the image would be ignored)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.1)
        if patch_local:
            for layer in model.model.vision_tower.encoder.layers:
                layer.self_attn.out_proj.weight.zero_()
                layer.self_attn.out_proj.bias.zero_()
    ip = Gemma3ImageProcessorPil(size={"height": TINY_IMAGE, "width": TINY_IMAGE},
                                 do_pan_and_scan=False)
    proc = Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=TINY_TOKENS,
                           chat_template=CHAT_TEMPLATE)
    model.save_pretrained(folder)
    proc.save_pretrained(folder)

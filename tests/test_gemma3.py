"""Gemma 3 specifics: token_type_ids reach the model and make image blocks bidirectional,
intersected with the sliding window on sliding layers."""

from __future__ import annotations

import pytest
import torch
from conftest import noise_image

from corelens.families import FAMILIES


def test_token_type_ids_bidirectional_image_blocks(tiny_folder, tiny_model):
    from transformers import AutoConfig

    model = tiny_model("gemma3")
    folder = tiny_folder("gemma3")
    ref = FAMILIES["gemma3"].hf_class(AutoConfig.from_pretrained(folder)).from_pretrained(folder)
    (w0, h0), (w1, h1) = FAMILIES["gemma3"].tiny_image_sizes()[:2]
    imgs = [[noise_image(w0, h0, 0), noise_image(w1, h1, 1)], [noise_image(w1, h1, 2)]]
    batch = model.prepare(imgs, ["compare <image> with <image> ?", "what is the color ?"],
                          answers=["red", "blue"])
    tid = model.family.image_token_id(model.hf_model.config, model.processor)
    types = batch.inputs["token_type_ids"]
    assert torch.equal(types.bool(), batch.input_ids == tid)

    # HF's own logits depend on token_type_ids, and corelens matches HF with them
    real = batch.attention_mask.bool()
    with torch.no_grad():
        with_types = ref.eval()(**batch.inputs).logits
        without = ref(**{k: v for k, v in batch.inputs.items() if k != "token_type_ids"}).logits
        got = model(batch)
    assert (with_types - without)[real].abs().max() > 1e-3
    assert (got - with_types)[real].abs().max() < 1e-4

    cfg = model.hf_model.config.text_config
    window = cfg.sliding_window
    sliding = cfg.layer_types.index("sliding_attention")
    full = cfg.layer_types.index("full_attention")
    names = [f"blocks.{sliding}.attn.hook_pattern", f"blocks.{full}.attn.hook_pattern"]
    _, cache = model.run_with_cache(batch, names_filter=lambda n: n in names)
    a_slide, a_full = (cache[n][0] for n in names)  # example 0: [head, T, T]
    first, second = (img.vision_positions for img in batch.layout.images[0])
    p0, p1 = int(first[0]), int(first[-1])
    assert p1 - p0 >= window  # the block is longer than the window
    for a in (a_slide, a_full):
        assert (a[:, p0, p1] > 0).all()  # a block's first token sees its last (bidirectional)
        assert (a[:, p0 - 1, p0] == 0).all()  # text before the block does not see it
        assert (a[:, p1, p1 + 1] == 0).all()  # nor does the block see the text after it
        assert (a[:, first][:, :, second] == 0).all()  # nor the next image's block
        assert (a[:, second][:, :, first] > 0).any()  # the later image sees the earlier one
    assert (a_full[:, p1, p0] > 0).all()
    assert (a_slide[:, p1, p0] == 0).all()  # beyond the window, backwards
    assert (a_slide[:, p1, p1 - window + 1] > 0).all()


def test_real_geometry_grid_tiles_the_image(tmp_path):
    """The gemma-3 settings (896 px SigLIP, 14-px patches, 256 tokens = 16 x 16 pooled 4 x 4):
    config and processor only, no weights. Boxes tile the original image; pan-and-scan raises."""
    from transformers import Gemma3Config, Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from corelens.families.gemma3 import BOI, EOI, SOFT
    from corelens.zoo.tokenizer import build_tokenizer

    build_tokenizer(tmp_path, extra_special=[BOI, EOI, SOFT])
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path, model_specific_special_tokens={
        "boi_token": BOI, "eoi_token": EOI, "image_token": SOFT})
    cfg = Gemma3Config(vision_config={"model_type": "siglip_vision_model", "image_size": 896,
                                      "patch_size": 14, "vision_use_head": False},
                       image_token_index=tok.convert_tokens_to_ids(SOFT))
    proc = Gemma3Processor(image_processor=Gemma3ImageProcessorPil(
        size={"height": 896, "width": 896}), tokenizer=tok, image_seq_length=256)
    fam = FAMILIES["gemma3"]
    for w, h in [(640, 480), (500, 1400)]:
        inputs = proc(text=[f"{BOI} describe"], images=[[noise_image(w, h, 0)]],
                      return_tensors="pt")
        rows = fam.feature_rows(cfg, proc, inputs, 0, (w, h))
        assert len(rows) == 256 == int((inputs["input_ids"] == cfg.image_token_id).sum())
        b = rows.views[0].boxes.double()
        assert (rows.views[0].rows, rows.views[0].cols) == (16, 16)
        assert b[0, 0].tolist() == [0, 0, w / 16, h / 16] and b[-1, -1, 2:].tolist() == [w, h]
    proc.image_processor.do_pan_and_scan = True
    with pytest.raises(ValueError, match="pan-and-scan"):
        fam.feature_rows(cfg, proc, inputs, 0, (w, h))

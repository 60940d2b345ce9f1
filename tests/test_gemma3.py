"""Gemma 3 specifics: token_type_ids reach the model and make image blocks bidirectional,
intersected with the sliding window on sliding layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_matches_hf, hf_reference, noise_image
from PIL import Image

from corelens.families import FAMILIES
from corelens.zoo.tiny import tiny_image_sizes


def test_token_type_ids_bidirectional_image_blocks(tiny_folder, tiny_model):

    model = tiny_model("gemma3")
    folder = tiny_folder("gemma3")
    ref = hf_reference("gemma3", folder)
    (w0, h0), (w1, h1) = tiny_image_sizes("gemma3")[:2]
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
    config and processor only, no weights. Boxes tile the original image; with pan-and-scan
    (HF's defaults: crops of >= 256 px, at most 4, from an aspect ratio of 1.2) a 500x1400 page
    adds 3 crops of 467 px (the last 466), each a 16 x 16 grid tiling its crop."""
    from transformers import Gemma3Config, Gemma3Processor, PreTrainedTokenizerFast
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    from corelens.zoo.tiny.gemma3 import BOI, EOI, SOFT
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
    proc.images_kwargs = {**proc.images_kwargs, "do_pan_and_scan": True}  # what the call uses
    inputs = proc(text=[f"{BOI} describe"], images=[[noise_image(w, h, 0)]], return_tensors="pt")
    rows = fam.feature_rows(cfg, proc, inputs, 0, (w, h))
    assert len(inputs["pixel_values"]) == 4
    assert len(rows) == 4 * 256 == int((inputs["input_ids"] == cfg.image_token_id).sum())
    assert [v.name for v in rows.views] == ["image", "crop0", "crop1", "crop2"]
    for k, (top, bottom) in enumerate([(0, 467), (467, 934), (934, 1400)]):
        b = rows.views[k + 1].boxes.double()
        assert b[0, 0].tolist() == pytest.approx([0, top, w / 16, top + (bottom - top) / 16])
        assert b[-1, -1, 2:].tolist() == pytest.approx([w, bottom])


# ------------------------------------------------------------------------- pan-and-scan

PAS = dict(do_pan_and_scan=True, pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=4,
           pan_and_scan_min_ratio_to_activate=1.2)
# 80x30: landscape 2.67 -> 3 crops of 27 px (the last 26); 30x70: portrait 2.33 -> 2 crops of
# 35 px; 40x40: square, ratio 1 < 1.2 -> no crops; 90x28: 3.2 -> 3 crops of 30 px
PAS_SIZES = [(80, 30), (30, 70), (40, 40), (90, 28)]


@pytest.fixture(scope="module")
def pas_model(tiny_folder):
    """The tiny Gemma 3 (patch-local tower too) with a pan-and-scan processor."""
    from transformers import AutoProcessor

    from corelens import HookedMLLM

    def make(patch_local=False):
        folder = tiny_folder("gemma3", patch_local)
        return HookedMLLM.from_hf(hf_reference("gemma3", folder),
                                  AutoProcessor.from_pretrained(folder, **PAS))

    return make


def test_pan_and_scan_crops_follow_hf():
    from types import SimpleNamespace

    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    fam = FAMILIES["gemma3"]
    from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor

    for ip in (Gemma3ImageProcessorPil(**PAS), Gemma3ImageProcessor(**PAS)):  # both backends
        proc = SimpleNamespace(image_processor=ip, images_kwargs={})
        assert fam.pan_and_scan_crops(proc, (80, 30)) == [(0, 0, 27, 30), (27, 0, 27, 30),
                                                          (54, 0, 26, 30)]
        assert fam.pan_and_scan_crops(proc, (30, 70)) == [(0, 0, 30, 35), (0, 35, 30, 35)]
        assert fam.pan_and_scan_crops(proc, (40, 40)) == []
    off = SimpleNamespace(image_processor=Gemma3ImageProcessorPil(do_pan_and_scan=False))
    assert fam.pan_and_scan_crops(off, (80, 30)) == []


def test_pan_and_scan_parity_and_token_counts(pas_model, tiny_folder):

    model = pas_model()
    folder = tiny_folder("gemma3")
    ref = hf_reference("gemma3", folder)
    imgs = [[noise_image(w, h, i)] for i, (w, h) in enumerate(PAS_SIZES[:3])]
    batch = model.prepare(imgs, ["what is it ?", "what color is the square at left ?", "q ?"],
                          answers=["red", "blue green", "a"])
    assert batch.attention_mask.min() == 0
    assert len(batch.inputs["pixel_values"]) == (1 + 3) + (1 + 2) + 1
    tid = model.family.image_token_id(model.hf_model.config, model.processor)
    for e, n_views in enumerate([4, 3, 1]):
        (img,) = batch.layout.images[e]
        assert [v.name for v in img.views] == ["image"] + [f"crop{k}" for k in range(n_views - 1)]
        slots = (batch.input_ids[e] == tid).nonzero().flatten().cpu()
        assert torch.equal(slots, img.positions) and len(slots) == 16 * n_views
    assert_matches_hf(model, ref, batch)


def _ramp(w, h):
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0] = np.round((np.arange(w) + 0.5) / w * 255)[None, :]
    img[..., 1] = np.round((np.arange(h) + 0.5) / h * 255)[:, None]
    return Image.fromarray(img)


@pytest.mark.parametrize("size", PAS_SIZES)
def test_pan_and_scan_geometry_against_processor_pixels(size, pas_model):
    """A ramp image: each token's pixels (base and crops, from the processor's own
    pixel_values, pooled as the projector pools) are centred on its box."""
    import torch.nn.functional as F

    model = pas_model()
    w, h = size
    batch = model.prepare([[_ramp(w, h)]], ["q ?"])
    (img,) = batch.layout.images[0]
    ip = model.processor.image_processor
    pv = batch.inputs["pixel_values"].double().cpu()
    raw = (pv * torch.tensor(ip.image_std).view(1, 3, 1, 1)
           + torch.tensor(ip.image_mean).view(1, 3, 1, 1)) * 255
    cells = F.avg_pool2d(raw, 8)  # 4-px patches, pooled 2 x 2: 8-px cells, 4 x 4 per view
    pix = cells.permute(0, 2, 3, 1).reshape(-1, 3)
    assert len(pix) == len(img.vision_positions) == 16 * len(img.views)
    boxes = img.boxes.double()
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    err_x = ((pix[:, 0] * w / 255 - cx).abs() / bw).max()
    err_y = ((pix[:, 1] * h / 255 - cy).abs() / bh).max()
    assert err_x < 0.12 and err_y < 0.12, (float(err_x), float(err_y))


def test_pan_and_scan_painted_region_changes_exactly_its_tokens(pas_model):
    """Paint a block: every token (base image and crops) whose box lies >= half in it moves,
    every token whose box, grown by half its size, misses it stays put."""
    from conftest import flat_image

    from corelens.data.layout import box_overlap_fraction

    model = pas_model(patch_local=True)
    for w, h in PAS_SIZES:
        base = flat_image(w, h)
        painted = base.copy()
        region = torch.tensor([w * 0.3, h * 0.3, w * 0.55, h * 0.6]).round()
        painted.paste((250, 20, 20), tuple(int(v) for v in region.tolist()))
        outs = []
        for im in (base, painted):
            batch = model.prepare([[im]], ["describe the image"])
            _, cache = model.run_with_cache(batch, names_filter="blocks.0.hook_resid_pre")
            pos = batch.layout.vision_positions(0)
            outs.append(cache["blocks.0.hook_resid_pre"][0, pos.to(model.device)])
        change = (outs[1] - outs[0]).norm(dim=-1).cpu()
        change = change / change.max()
        boxes = batch.layout.images[0][0].boxes
        half = torch.stack([(boxes[:, 2] - boxes[:, 0]) / 2, (boxes[:, 3] - boxes[:, 1]) / 2], 1)
        grown = boxes + torch.cat([-half, half], 1)
        inside = box_overlap_fraction(boxes, region) >= 0.5
        far = torch.tensor([float(box_overlap_fraction(g[None], region)[0]) == 0
                            for g in grown])
        assert inside.sum() >= 1 and (change[inside] > 0.3).all(), ((w, h), change[inside])
        assert (change[far] < 0.05).all(), ((w, h), change[far].max())
        evidence = batch.layout.positions_in_box(0, region.tolist())
        views = batch.layout.images[0][0].rows.view[batch.layout.images[0][0].vision_mask]
        hit_views = {int(views[i]) for i, p in enumerate(pos.tolist()) if p in
                     set(evidence.tolist())}
        n_views = len(batch.layout.images[0][0].views)
        # R_e is exactly the moved set, and it reaches into the crops too
        assert set(evidence.tolist()) == set(pos[inside].tolist())
        assert 0 in hit_views and (n_views == 1 or len(hit_views) >= 2), ((w, h), hit_views)

"""LLaVA-NeXT geometry against HF's own ``LlavaNextModel.pack_image_features``, pixel by pixel.

The same coordinate-coded oracle as ``test_onevision_layout.py``: red / green ramps of the
original x / y, blue marks the image (the canvas padding is 0). Each tile token carries the
centre of its pixels; HF unpads, orders and inserts the newlines; corelens's rows must put a
newline exactly where HF did and give every token wholly inside the image a box centred on it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_onevision_layout import NEWLINE, ramp_image

from corelens.data.layout import KIND_NEWLINE
from corelens.families import FAMILIES
from corelens.zoo.tiny import tiny_image_sizes

FAM = FAMILIES["llava_next"]


def hf_packed(cfg, proc, inputs, image: int) -> torch.Tensor:
    from transformers.models.llava_next.modeling_llava_next import (
        LlavaNextModel,
        image_size_to_num_patches,
    )

    ip = proc.image_processor
    vc = cfg.vision_config
    side, patch = vc.image_size // vc.patch_size, vc.patch_size
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    n_tiles = image_size_to_num_patches(inputs["image_sizes"][image], cfg.image_grid_pinpoints,
                                        vc.image_size)
    raw = (inputs["pixel_values"][image, :n_tiles].double() * std + mean) * 255
    cells = F.avg_pool2d(raw[..., : side * patch, : side * patch], patch)
    feats = cells.permute(0, 2, 3, 1).reshape(n_tiles, side * side, 3)
    packed, _ = LlavaNextModel.pack_image_features(
        SimpleNamespace(config=cfg), [feats], inputs["image_sizes"][image:image + 1],
        cfg.vision_feature_select_strategy,
        image_newline=torch.full((3,), NEWLINE, dtype=torch.float64))
    return packed[0]


def check_against_hf(cfg, proc, inputs, image: int, size: tuple[int, int]) -> int:
    w, h = size
    rows = FAM.feature_rows(cfg, proc, inputs, image, size)
    packed = hf_packed(cfg, proc, inputs, image)
    assert len(rows) == packed.shape[0], (size, len(rows), packed.shape[0])
    assert torch.equal(packed[:, 0] <= NEWLINE / 2, rows.kind == KIND_NEWLINE), size
    boxes = rows.boxes().double()
    check = (rows.kind != KIND_NEWLINE) & (packed[:, 2] / 255 >= 0.995)
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    err_x = ((packed[:, 0] * w / 255 - cx).abs() / bw)[check]
    err_y = ((packed[:, 1] * h / 255 - cy).abs() / bh)[check]
    assert err_x.max() < 0.1 and err_y.max() < 0.1, (size, float(err_x.max()),
                                                    float(err_y.max()))
    assert {int(v) for v in rows.view[check].tolist()} == {0, 1}  # base and anyres checked
    return len(rows)


def _encode(proc, images):
    text = [f"{proc.image_token} describe" for _ in images]
    return proc(text=text, images=images, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    from transformers import AutoConfig, AutoProcessor

    folder = tiny_folder("llava_next")
    return (AutoConfig.from_pretrained(folder, local_files_only=True),
            AutoProcessor.from_pretrained(folder, local_files_only=True))


@pytest.mark.parametrize("size", tiny_image_sizes(FAM) + [(32, 32), (50, 50), (33, 100),
                                                          (200, 120), (17, 23), (31, 97)])
def test_tiny_rows_match_hf_packing(tiny, size):
    cfg, proc = tiny
    inputs = _encode(proc, [ramp_image(*size)])
    n = check_against_hf(cfg, proc, inputs, 0, size)
    assert n == int((inputs["input_ids"] == cfg.image_token_id).sum())


def test_tiny_sizes_cover_the_geometry(tiny):
    """Unpadding rows, unpadding cols and none; never shrunk (no anyres_max in LLaVA-NeXT)."""
    cfg, proc = tiny
    grids = {}
    for size in tiny_image_sizes(FAM):
        rows = FAM.feature_rows(cfg, proc, _encode(proc, [ramp_image(*size)]), 0, size)
        assert [v.name for v in rows.views] == ["base", "anyres"]
        grids[size] = (rows.views[1].rows, rows.views[1].cols)
    assert grids == {(80, 50): (6, 8), (40, 70): (8, 4), (90, 28): (4, 12), (60, 32): (4, 8)}


def test_multi_image_example_still_tiles_and_batches(tiny):
    """Unlike OneVision, every image of a multi-image example is tiled; tile counts differ."""
    cfg, proc = tiny
    sizes = [(80, 50), (90, 28), (60, 32)]
    text = [" ".join([proc.image_token] * 2) + " describe", f"{proc.image_token} describe"]
    inputs = proc(text=text, images=[[ramp_image(*s) for s in sizes[:2]], [ramp_image(*sizes[2])]],
                  return_tensors="pt", padding=True)
    assert inputs["pixel_values"].shape[1] == 5
    counts = [check_against_hf(cfg, proc, inputs, i, s) for i, s in enumerate(sizes)]
    ids = inputs["input_ids"]
    assert counts[0] + counts[1] == int((ids[0] == cfg.image_token_id).sum())
    assert counts[2] == int((ids[1] == cfg.image_token_id).sum())


@pytest.mark.parametrize("size", [(640, 480), (500, 1400), (2000, 1500)])
def test_real_geometry_rows_match_hf_packing(size, tmp_path):
    """The llava-v1.6 settings (336 px CLIP tiles of 24 x 24 14-px patches, its pinpoints,
    shortest-edge resize + centre crop per tile): config and processor only, no weights."""
    from transformers import LlavaNextConfig, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    from corelens.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer(tmp_path)
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    cfg = LlavaNextConfig(image_token_index=tok.convert_tokens_to_ids("<image>"),
                          image_grid_pinpoints=pinpoints)
    assert (cfg.vision_config.image_size, cfg.vision_config.patch_size) == (336, 14)
    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 336},
                                    crop_size={"height": 336, "width": 336},
                                    image_grid_pinpoints=pinpoints)
    proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default",
                              num_additional_image_tokens=1)
    inputs = _encode(proc, [ramp_image(*size)])
    n = check_against_hf(cfg, proc, inputs, 0, size)
    assert n == int((inputs["input_ids"] == cfg.image_token_id).sum())

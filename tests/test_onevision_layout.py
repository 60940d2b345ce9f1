"""LLaVA-OneVision geometry against HF itself, pixel by pixel.

The oracle: an image whose red / green channels are ramps of the original x / y coordinate and
whose blue channel marks the image (the canvas padding is 0). The processor's tiles are averaged
over each vision patch, so each tile token carries the original (x, y) of its pixels' centre;
HF's own ``pack_image_features`` then unpads, (bilinearly) shrinks and orders them and inserts
the newlines. Every feature row corelens predicts must be a newline exactly where HF put one,
and every vision token that lies wholly inside the image must carry the centre of its box.
A bilinearly shrunk token carries the centre of the share of the grid it stands for (bilinear
interpolation of a linear ramp is the ramp at the sample point), so the check covers the
``anyres_max`` downsampling too.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from corelens.data.layout import KIND_NEWLINE
from corelens.families import FAMILIES
from corelens.zoo.tiny import tiny_image_sizes

FAM = FAMILIES["llava_onevision"]
NEWLINE = -1.0e4


def ramp_image(w: int, h: int) -> Image.Image:
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0] = np.round((np.arange(w) + 0.5) / w * 255)[None, :]
    img[..., 1] = np.round((np.arange(h) + 0.5) / h * 255)[:, None]
    img[..., 2] = 255
    return Image.fromarray(img)


def hf_packed(cfg, proc, inputs, image: int) -> torch.Tensor:
    """HF's packed rows for ``image``: per row the mean raw (r, g, b) of its pixels."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        LlavaOnevisionModel,
        image_size_to_num_patches,
    )

    ip = proc.image_processor
    vc = cfg.vision_config
    side, patch = vc.image_size // vc.patch_size, vc.patch_size
    mean = torch.tensor(ip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std).view(1, 3, 1, 1)
    pv = inputs["pixel_values"][image].double()
    counts = inputs["batch_num_images"].tolist()
    alone = [n == 1 for n in counts for _ in range(n)][image]
    n_tiles = image_size_to_num_patches(inputs["image_sizes"][image], cfg.image_grid_pinpoints,
                                        vc.image_size) if alone else 1
    raw = (pv[:n_tiles] * std + mean) * 255
    cells = F.avg_pool2d(raw[..., : side * patch, : side * patch], patch)
    feats = cells.permute(0, 2, 3, 1).reshape(n_tiles, side * side, 3)
    me = SimpleNamespace(config=cfg)
    packed, _ = LlavaOnevisionModel.pack_image_features(
        me, [feats], inputs["image_sizes"][image:image + 1],
        image_newline=torch.full((3,), NEWLINE, dtype=torch.float64),
        vision_aspect_ratio=cfg.vision_aspect_ratio)
    return packed[0], alone


def check_against_hf(cfg, proc, inputs, image: int, size: tuple[int, int],
                     tol: float = 0.1) -> dict[str, int]:
    """``tol``: the largest distance between a token's box centre and its pixels' centre, in
    token sizes (8-bit ramps quantise to w / 255 px; a one-token error is 1.0)."""
    w, h = size
    rows = FAM.feature_rows(cfg, proc, inputs, image, size)
    packed, alone = hf_packed(cfg, proc, inputs, image)
    assert len(rows) == packed.shape[0], (size, len(rows), packed.shape[0])
    hf_newline = packed[:, 0] <= NEWLINE / 2
    assert torch.equal(hf_newline, rows.kind == KIND_NEWLINE), size
    bg = 0.0 if alone else float(int(proc.image_processor.image_mean[2] * 255))
    inside = (packed[:, 2] - bg) / (255 - bg)
    boxes = rows.boxes().double()
    vision = rows.kind != KIND_NEWLINE
    check = vision & (inside >= 0.995)
    x = packed[:, 0] * w / 255  # pixel i holds (i + 0.5) * 255 / w
    y = packed[:, 1] * h / 255
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    err_x = ((x - cx).abs() / bw)[check]
    err_y = ((y - cy).abs() / bh)[check]
    assert err_x.max() < tol and err_y.max() < tol, (size, float(err_x.max()), float(err_y.max()))
    # every view has tokens checked: the base one and the anyres one
    checked_views = {int(v) for v in rows.view[check].tolist()}
    assert checked_views == set(range(len(rows.views))), (size, checked_views)
    # tokens partly in the padding overlap the image (their box is not empty)
    assert ((bw > 0) & (bh > 0))[vision & (inside > 0.05)].all(), size
    return {"rows": len(rows), "checked": int(check.sum())}


@pytest.fixture(scope="module")
def tiny(tiny_folder):
    from transformers import AutoConfig, AutoProcessor

    folder = tiny_folder("llava_onevision")
    return (AutoConfig.from_pretrained(folder, local_files_only=True),
            AutoProcessor.from_pretrained(folder, local_files_only=True))


def _encode(proc, images, n_per_sample=None):
    tok = proc.image_token
    if n_per_sample is None:
        text = [f"{tok} describe" for _ in images]
    else:
        text = [" ".join([tok] * n_per_sample) + " describe"]
        images = [images]
    return proc(text=text, images=images, return_tensors="pt", padding=True)


TINY_EXTRA = [(32, 32), (50, 50), (33, 100), (200, 120), (17, 23), (31, 97)]


@pytest.mark.parametrize("size", tiny_image_sizes(FAM) + TINY_EXTRA)
@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_tiny_rows_match_hf_packing(tiny, size, backend):
    cfg, proc = tiny
    if backend == "pil":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )
        proc = type(proc)(image_processor=LlavaOnevisionImageProcessorPil(
            **proc.image_processor.to_dict()), tokenizer=proc.tokenizer,
            video_processor=proc.video_processor, num_image_tokens=proc.num_image_tokens,
            vision_feature_select_strategy=proc.vision_feature_select_strategy,
            vision_aspect_ratio=proc.vision_aspect_ratio)
    inputs = _encode(proc, [ramp_image(*size)])
    out = check_against_hf(cfg, proc, inputs, 0, size)
    n_tokens = int((inputs["input_ids"] == cfg.image_token_id).sum())
    assert out["rows"] == n_tokens


def test_tiny_sizes_cover_the_geometry(tiny):
    """The battery's sizes keep exercising unpadding (rows and cols), downsampling and not."""
    cfg, proc = tiny
    grids = {}
    for size in tiny_image_sizes(FAM):
        inputs = _encode(proc, [ramp_image(*size)])
        rows = FAM.feature_rows(cfg, proc, inputs, 0, size)
        assert [v.name for v in rows.views] == ["base", "anyres"]
        grids[size] = (rows.views[1].rows, rows.views[1].cols)
    assert grids == {(80, 50): (4, 6), (40, 70): (8, 4), (90, 28): (3, 9), (60, 32): (4, 8)}


def test_multi_image_sample_is_one_tile_each(tiny):
    """HF does not tile the images of a multi-image sample: square pad, grid, one newline."""
    cfg, proc = tiny
    sizes = [(80, 50), (40, 70)]
    inputs = _encode(proc, [ramp_image(*s) for s in sizes], n_per_sample=2)
    assert inputs["batch_num_images"].tolist() == [2]
    total = 0
    for i, size in enumerate(sizes):
        rows = FAM.feature_rows(cfg, proc, inputs, i, size)
        assert [v.name for v in rows.views] == ["image"]
        assert int((rows.kind == KIND_NEWLINE).sum()) == 1 and rows.kind[-1] == KIND_NEWLINE
        total += check_against_hf(cfg, proc, inputs, i, size)["rows"]
    assert total == int((inputs["input_ids"] == cfg.image_token_id).sum())


def test_mismatches_raise_naming_the_image(tiny):
    cfg, proc = tiny
    inputs = _encode(proc, [ramp_image(80, 50), ramp_image(40, 70)])
    with pytest.raises(ValueError, match="image 1"):
        FAM.feature_rows(cfg, proc, inputs, 1, (70, 40))  # (w, h) swapped
    fewer = dict(inputs, pixel_values=inputs["pixel_values"][:, :3])
    with pytest.raises(ValueError, match="image 0.*tile"):
        FAM.feature_rows(cfg, proc, fewer, 0, (80, 50))
    more = dict(inputs, pixel_values=torch.cat([inputs["pixel_values"]] * 2, dim=1))
    with pytest.raises(ValueError, match="image 1.*tile"):
        FAM.feature_rows(cfg, proc, more, 1, (40, 70))


@pytest.fixture(scope="module")
def real_geometry(tmp_path_factory):
    """The shipped OneVision settings (384 px SigLIP tiles of 27 x 27 14-px patches, the HF
    pinpoints, anyres_max_9): config and processor only, no weights."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_llava_onevision import (
        LlavaOnevisionImageProcessor,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    from corelens.zoo.tokenizer import build_tokenizer

    tok = build_tokenizer(tmp_path_factory.mktemp("ov-real-tok"))
    cfg = LlavaOnevisionConfig(image_token_id=tok.convert_tokens_to_ids("<image>"),
                               video_token_id=tok.convert_tokens_to_ids("<video>"))
    proc = LlavaOnevisionProcessor(image_processor=LlavaOnevisionImageProcessor(), tokenizer=tok,
                                   video_processor=LlavaOnevisionVideoProcessor(),
                                   num_image_tokens=729, vision_feature_select_strategy="full",
                                   vision_aspect_ratio="anyres_max_9")
    return cfg, proc


@pytest.mark.parametrize("size", [(640, 480), (500, 1400), (2000, 1500)])
def test_real_geometry_rows_match_hf_packing(real_geometry, size):
    """27 tokens of 14 px cover 378 of a tile's 384 px: token edges jump at tile borders
    (boxes from uniform 384 / 27 px cells are off by up to 0.42 token here).

    (2000, 1500) is shrunk by anyres_max_9 (a 4 x 6 tile grid): a shrunk token interpolates
    across those 6 px jumps, which its proportional box does not model, hence the looser tol."""
    cfg, proc = real_geometry
    inputs = _encode(proc, [ramp_image(*size)])
    rows = FAM.feature_rows(cfg, proc, inputs, 0, size)
    shrunk = rows.views[1].rows * rows.views[1].cols < _unpadded_tokens(cfg, size)
    assert shrunk == (size == (2000, 1500))
    out = check_against_hf(cfg, proc, inputs, 0, size, tol=0.2 if shrunk else 0.1)
    assert out["rows"] == int((inputs["input_ids"] == cfg.image_token_id).sum())


def _unpadded_tokens(cfg, size: tuple[int, int]) -> int:
    """Tokens of the joined tile grid after HF's ``unpad_image`` (before any shrinking)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    w, h = size
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    nph, npw = get_anyres_image_grid_shape([h, w], cfg.image_grid_pinpoints,
                                           cfg.vision_config.image_size)
    kept = unpad_image(torch.zeros(1, nph * side, npw * side), [h, w])
    return kept.shape[1] * kept.shape[2]


def test_batch_with_different_tile_counts(tiny):
    """Images with 5, 4 and 3 tiles in one batch: the shorter ones are zero-padded tiles."""
    cfg, proc = tiny
    sizes = [(80, 50), (90, 28), (60, 32)]
    inputs = _encode(proc, [ramp_image(*s) for s in sizes])
    assert inputs["pixel_values"].shape[1] == 5
    for i, size in enumerate(sizes):
        out = check_against_hf(cfg, proc, inputs, i, size)
        assert out["rows"] == int((inputs["input_ids"][i] == cfg.image_token_id).sum())

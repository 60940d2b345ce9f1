"""Idefics3 / SmolVLM / InternVL geometry against HF itself, pixel by pixel.

The oracle: an image whose red / green channels are ramps of the original x / y coordinate. The
processor's views (tiles, global image, thumbnail) are averaged over each vision patch, and HF's
own pixel shuffle (``Idefics3Connector.pixel_shuffle`` / ``InternVLModel.pixel_shuffle``) folds
the patches into LM tokens, so each token carries the original (x, y) of its pixels' centre
(resampling a linear ramp keeps it linear). Every token corelens predicts must carry the centre
of its box, in HF's order, and there must be exactly as many as HF makes. Checked with the tiny
processors (loaded back with ``AutoProcessor``) and with the real checkpoints' settings
(Idefics3-8B: 364 px tiles of 14 px patches, x2 shuffle, longest edge 1456; SmolVLM-256M: 512 px
tiles of 16 px patches, x4 shuffle, longest edge 2048; InternVL3: 448 px tiles of 14 px patches,
up to 12 tiles), configs only, no weights.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from corelens.families import FAMILIES


def ramp_image(w: int, h: int) -> Image.Image:
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0] = np.round((np.arange(w) + 0.5) / w * 255)[None, :]
    img[..., 1] = np.round((np.arange(h) + 0.5) / h * 255)[:, None]
    img[..., 2] = 255
    return Image.fromarray(img)


def _views(name: str, proc, img: Image.Image) -> torch.Tensor:
    """The processor's views of ``img``: [n_views, 3, T, T], raw 0..255 values."""
    from transformers.processing_utils import ProcessorMixin

    ip = proc.image_processor
    if isinstance(proc, ProcessorMixin):  # the whole processor, with its call defaults
        out = proc(images=[[img]], text=[FAMILIES[name].image_token_string(proc)],
                   return_tensors="pt")
    else:
        out = ip([[img]] if name != "internvl" else [img], return_tensors="pt")
    pv = out["pixel_values"].double()
    pv = pv[0] if pv.ndim == 5 else pv
    mean = torch.tensor(ip.image_mean, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(ip.image_std, dtype=torch.float64).view(1, 3, 1, 1)
    return (pv * std + mean) * 255


def hf_tokens(name: str, cfg, proc, img: Image.Image) -> torch.Tensor:
    """Mean raw (r, g, b) of each LM token's pixels, in the order HF merges them."""
    raw = _views(name, proc, img)
    n = raw.shape[0]
    vc = cfg.vision_config
    patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
    cells = F.avg_pool2d(raw, patch)  # [n, 3, side, side]
    side = cells.shape[-1]
    feats = cells.permute(0, 2, 3, 1)  # [n, side, side, 3], row-major patches
    if name == "internvl":
        from transformers.models.internvl.modeling_internvl import InternVLModel

        ratio = cfg.downsample_ratio
        shuffled = InternVLModel.pixel_shuffle(None, feats.contiguous(), scale_factor=ratio)
        k = round(1 / ratio) ** 2
    else:
        from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

        s = cfg.scale_factor
        flat = feats.reshape(n, side * side, 3).contiguous()
        shuffled = Idefics3Connector.pixel_shuffle(None, flat, s)
        k = s * s
    return shuffled.reshape(n, -1, k, 3).mean(-2).reshape(-1, 3)


def check_against_hf(name: str, cfg, proc, size: tuple[int, int], tol: float = 0.1) -> int:
    """``tol``: the largest distance between a token's box centre and its pixels' centre, in
    token sizes (a one-token error is 1.0)."""
    w, h = size
    img = ramp_image(w, h)
    toks = hf_tokens(name, cfg, proc, img)
    inputs = {"pixel_values": torch.zeros(1, 3, *_views(name, proc, img).shape[-2:])}
    rows = FAMILIES[name].feature_rows(cfg, proc, inputs, 0, size)
    assert len(rows) == toks.shape[0], (name, size, len(rows), toks.shape[0])
    boxes = rows.boxes().double()
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    tw, th = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    hx, hy = toks[:, 0] / 255 * w, toks[:, 1] / 255 * h
    err = torch.maximum((hx - cx).abs() / tw, (hy - cy).abs() / th)
    assert err.max() < tol, (name, size, float(err.max()), int(err.argmax()))
    return len(rows)


SIZES = [(80, 50), (90, 28), (40, 70), (100, 100), (30, 30), (61, 37), (37, 61), (120, 24)]


@pytest.mark.parametrize("name", ["idefics3", "smolvlm", "internvl"])
def test_tiny_geometry_matches_hf(name, tiny_folder):
    from transformers import AutoConfig, AutoProcessor

    folder = tiny_folder(name)
    cfg = AutoConfig.from_pretrained(folder)
    proc = AutoProcessor.from_pretrained(folder)
    counts = {check_against_hf(name, cfg, proc, s) for s in SIZES}
    assert len(counts) >= 3  # the sizes exercise different tilings


def _real(name: str):
    if name == "internvl":
        from transformers import InternVLConfig
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
            GotOcr2ImageProcessorPil,
        )

        cfg = InternVLConfig(vision_config={"image_size": [448, 448], "patch_size": [14, 14]},
                             downsample_ratio=0.5, vision_feature_select_strategy="default")
        ip = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True,
                                      min_patches=1, max_patches=12)
        return cfg, SimpleNamespace(image_processor=ip, image_seq_length=256)
    if name == "idefics3":
        from transformers import Idefics3Config
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            Idefics3ImageProcessorPil as IP,
        )

        cfg = Idefics3Config(vision_config={"image_size": 364, "patch_size": 14}, scale_factor=2)
        ip = IP(size={"longest_edge": 4 * 364}, max_image_size={"longest_edge": 364})
        return cfg, SimpleNamespace(image_processor=ip, image_seq_len=169)
    from transformers import SmolVLMConfig
    from transformers.models.smolvlm.image_processing_pil_smolvlm import (
        SmolVLMImageProcessorPil as IP,
    )

    cfg = SmolVLMConfig(vision_config={"image_size": 512, "patch_size": 16}, scale_factor=4)
    ip = IP(size={"longest_edge": 4 * 512}, max_image_size={"longest_edge": 512})
    return cfg, SimpleNamespace(image_processor=ip, image_seq_len=64)


@pytest.mark.parametrize("name", ["idefics3", "smolvlm", "internvl"])
def test_real_settings_geometry_matches_hf(name):
    cfg, proc = _real(name)
    for size in [(640, 480), (300, 900), (1000, 180)]:
        check_against_hf(name, cfg, proc, size)

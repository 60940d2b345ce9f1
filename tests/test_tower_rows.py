"""Vision-TOWER rows (``corelens.data.tower``, ``HookedMLLM.tower_layout``): on every family,
painting a region of one image changes exactly the tower rows whose boxes cover it, at the
patch level (embeddings, tower output) and at the merged level (projector output), in batches
of two images of different sizes -- so the picture order, the offsets between images, CLS
rows, pooling / pixel shuffle / merge-block order and Qwen2.5-VL's window order are all checked
against what the model computes, not against corelens's own arithmetic."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILY_NAMES, flat_image

from corelens.data.layout import box_overlap_fraction
from corelens.errors import InputError
from corelens.zoo.tiny import tiny_image_sizes

HOOKS = ("vision_encoder.hook_vision_embed", "vision_projector.hook_in",
         "vision_projector.hook_out")


def _paint_region(boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A region of about 2x2 cells near the image centre, snapped to a visible cell."""
    w, h = size
    widths = boxes[:, 2] - boxes[:, 0]
    mids = (boxes[:, :2] + boxes[:, 2:]) / 2
    dist = (mids - torch.tensor([w / 2, h / 2])).norm(dim=1) + (widths <= 0) * 1e9
    x0, y0, x1, y1 = boxes[int(dist.argmin())].tolist()
    tw, th = x1 - x0, y1 - y0
    return torch.tensor([round(x0), round(y0), round(min(x1 + tw, w)), round(min(y1 + th, h))],
                        dtype=torch.float)


def _tower_acts(model, images):
    batch = model.prepare([[im] for im in images], ["<image> what is it?"] * len(images))
    _, cache = model.run_with_cache(batch, names_filter=list(HOOKS))
    return batch, cache


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_painting_moves_exactly_the_tower_rows_that_cover_it(name, tiny_model):
    model = tiny_model(name, patch_local=True)
    sizes = tiny_image_sizes(name)
    images = [flat_image(*sizes[0]), flat_image(*sizes[-1])]
    batch, before = _tower_acts(model, images)
    for painted in (0, 1):
        # the region: 2x2 of the coarsest cells (the projector's output) of the painted image
        tower = model.tower_layout(batch, HOOKS[-1])
        rows = tower.rows(before[HOOKS[-1]].shape, HOOKS[-1])
        mine = (tower.example[rows.entry] == painted) & ~rows.is_prefix
        region = _paint_region(rows.boxes[mine], images[painted].size)
        after_images = list(images)
        after_images[painted] = images[painted].copy()
        after_images[painted].paste((250, 20, 20), tuple(int(v) for v in region.tolist()))
        _, after = _tower_acts(model, after_images)
        for hook in HOOKS:
            tower = model.tower_layout(batch, hook)
            act = before[hook]
            rows = tower.rows(act.shape, hook)
            flat = (lambda a: a) if tower.flat else (lambda a: a.flatten(0, 1))
            a = flat(act).reshape(len(rows), -1)
            b = flat(after[hook]).reshape(len(rows), -1)
            change = (b - a).norm(dim=-1).cpu()
            mine = tower.example[rows.entry] == painted
            assert torch.equal(change[~mine], torch.zeros_like(change[~mine])), (name, hook)
            change = change / change[mine].max()
            frac = box_overlap_fraction(rows.boxes, region)
            widths = rows.boxes[:, 2] - rows.boxes[:, 0]
            margin = 0.5 * float(widths[widths > 0].median())
            grown = region + torch.tensor([-margin, -margin, margin, margin])
            far = (box_overlap_fraction(rows.boxes, grown) == 0) & mine & ~rows.is_prefix
            covered = (frac >= 0.5) & mine
            assert covered.sum() >= 1, (name, hook)
            assert (change[covered] > 0.3).all(), (name, hook, painted, change[covered])
            assert (change[far] < 0.05).all(), (name, hook, painted, change[far].max())
            if rows.is_prefix.any():  # a CLS row sees only itself in a patch-local tower
                assert (change[rows.is_prefix & mine] < 0.05).all(), (name, hook)


def test_levels_and_refusals(tiny_model):
    model = tiny_model("llava_next")
    sizes = tiny_image_sizes("llava_next")
    batch, cache = _tower_acts(model, [flat_image(*sizes[0]), flat_image(*sizes[-1])])
    tower = model.tower_layout(batch)
    # base view + tiles per image, all in one tower batch
    assert len(tower) == cache["vision_projector.hook_in"].shape[0]
    assert tower.index.tolist()[:2] == [0, 1] and tower.example[0] == 0
    assert tower.level(cache[HOOKS[0]].shape) == "patches+prefix"  # CLIP's CLS first
    assert tower.level(cache["vision_projector.hook_in"].shape) == "patches"  # CLS dropped
    with pytest.raises(InputError, match="not a per-patch"):
        tower.level(torch.Size([len(tower), 3, 32, 32]), "vision_encoder.hook_in")  # pixels
    with pytest.raises(InputError, match="pictures"):
        tower.level(torch.Size([len(tower) + 1, 17, 32]))


def test_qwen2_5_windows_are_not_the_processor_order(tiny_model):
    """The window order is a real permutation on the tiny model (so the painted test above
    checks it), and the hooks before the reorder keep the processor's order."""
    model = tiny_model("qwen2_5_vl")
    sizes = tiny_image_sizes("qwen2_5_vl")
    batch, _ = _tower_acts(model, [flat_image(*sizes[0]), flat_image(*sizes[-1])])
    inner = model.tower_layout(batch, "vision_projector.hook_in").blocks
    assert inner is not None and not torch.equal(inner, torch.arange(len(inner)))
    assert model.tower_layout(batch, "vision_encoder.hook_vision_embed").blocks is None


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_activation_store_reads_tower_rows_on_every_family(name, tiny_model):
    """The SAE store on a projector hook: every row of the activation once, with its metadata."""
    from corelens.data.examples import GroundedExample
    from corelens.saes.store import ROLES, activations

    model = tiny_model(name)
    sizes = tiny_image_sizes(name)
    exs = [GroundedExample([im], "what is it?", "red", [(0, (0, 0, 8, 8))])
           for im in (flat_image(*sizes[0], color=(10, 90, 200)), flat_image(*sizes[-1]))]
    hook = "vision_projector.hook_out"
    got = activations(model, exs, hook, batch_size=2)
    batch = model.prepare_examples(exs)
    _, cache = model.run_with_cache(batch, names_filter=[hook])
    tower = model.tower_layout(batch, hook)
    rows = tower.rows(cache[hook].shape, hook)
    act = cache[hook] if tower.flat else cache[hook].flatten(0, 1)
    assert torch.equal(got.acts, act.reshape(len(rows), -1).float())
    assert torch.equal(got.example, tower.example[rows.entry])
    assert torch.equal(got.meta[:, 5], rows.row) and (got.role == ROLES.index("vision")).all()
    assert set(got.example.tolist()) == {0, 1}

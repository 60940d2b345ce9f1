"""Loading real checkpoints (issue #16): resolution settings the way HF users set them (each
way of capping an image's tokens works, the layout follows the processor's actual output, the
forward still equals HF's, a wrong knob is named), the CPU dtype default, sharded hub-format
safetensors."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import assert_matches_hf, hf_reference, noise_image

from corelens import HookedMLLM, InputError
from corelens.families.qwen_vl import check_resize
from corelens.zoo.tiny import build_tiny

IMAGE = noise_image(300, 170, 0)


def n_vision(batch) -> int:
    return sum(len(batch.layout.vision_positions(e)) for e in range(len(batch)))


def check_layout(model, batch) -> None:
    """Every image-token slot is one of the layout's positions and vice versa."""
    ids = batch.input_ids
    for e in range(len(batch)):
        slots = torch.isin(ids[e], torch.tensor(sorted(model.vision_token_ids))).nonzero()
        laid = torch.cat([img.positions for img in batch.layout.images[e]])
        assert torch.equal(slots.flatten().sort().values, laid.sort().values)


@pytest.fixture(scope="module")
def qwen_folder(tiny_folder):
    return tiny_folder("qwen2_5_vl")


def grid(batch) -> tuple[int, ...]:
    return tuple(int(v) for v in batch.inputs["image_grid_thw"][0].tolist())


def test_qwen_max_pixels_three_ways_give_the_same_capped_grid(qwen_folder):
    default = HookedMLLM.from_pretrained(qwen_folder)
    base = default.prepare([IMAGE], "what is it?")
    patch = default.processor.image_processor.patch_size
    cap = 4 * default.processor.image_processor.size["longest_edge"]  # 4x the default cap
    loaded = HookedMLLM.from_pretrained(qwen_folder, max_pixels=cap)
    by_load = loaded.prepare([IMAGE], "what is it?")
    by_call = default.prepare([IMAGE], "what is it?", max_pixels=cap)
    after_call = default.prepare([IMAGE], "what is it?")
    assert grid(by_load) == grid(by_call) != grid(base)
    assert grid(after_call) == grid(base)  # one call's setting does not stay
    t, gh, gw = grid(by_load)
    assert gh * gw * patch ** 2 <= cap
    assert n_vision(by_load) == gh * gw // 4 > n_vision(base)
    # HF honours the attribute (max_pixels over size): corelens reads the output, not settings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        default.processor.image_processor.max_pixels = cap
        by_attr = default.prepare([IMAGE], "what is it?")
    assert grid(by_attr) == grid(by_load)
    for model, batch in ((loaded, by_load), (default, by_call), (default, by_attr)):
        check_layout(model, batch)
    assert_matches_hf(loaded, hf_reference("qwen2_5_vl", qwen_folder), by_load)


def test_set_resolution_changes_later_prepares_and_reports_settings(qwen_folder):
    model = HookedMLLM.from_pretrained(qwen_folder)
    before = grid(model.prepare([IMAGE], "q?"))
    cap = 16 * model.processor.image_processor.patch_size ** 2  # 16 patches = 4 tokens
    assert model.set_resolution(min_pixels=cap // 4, max_pixels=cap) is model
    after = grid(model.prepare([IMAGE], "q?"))
    assert after != before and after[1] * after[2] <= 16
    assert model.resolution_settings["size"]["longest_edge"] == cap
    assert {"min_pixels", "max_pixels"} <= set(model.family.resolution_settings)


@pytest.mark.parametrize("where", ["prepare", "from_pretrained"])
def test_a_misspelt_setting_is_named_with_the_fix(qwen_folder, where):
    with pytest.raises(InputError) as err:
        if where == "prepare":
            HookedMLLM.from_pretrained(qwen_folder).prepare([IMAGE], "q?", max_pixel=1024)
        else:
            HookedMLLM.from_pretrained(qwen_folder, max_pixel=1024)
    msg = str(err.value)
    assert "'max_pixel'" in msg and "did you mean 'max_pixels'" in msg and where in msg


def test_a_fixed_resolution_family_says_so(tiny_folder):
    with pytest.raises(InputError, match="resizes every image to its vision tower's fixed"):
        HookedMLLM.from_pretrained(tiny_folder("llava"), max_pixels=1024)


def test_anyres_pinpoints_set_for_the_model_reach_processor_and_config(tiny_folder):
    folder = tiny_folder("llava_onevision")
    image = noise_image(90, 28, 1)  # picks a 3-tile-wide pinpoint by default
    default = HookedMLLM.from_pretrained(folder)
    capped = HookedMLLM.from_pretrained(folder, image_grid_pinpoints=[[32, 32]])
    assert capped.hf_model.config.image_grid_pinpoints == [[32, 32]]
    assert default.hf_model.config.image_grid_pinpoints != [[32, 32]]  # its own copy
    b0, b1 = (m.prepare([image], "what is it?") for m in (default, capped))
    assert n_vision(b1) < n_vision(b0)
    check_layout(capped, b1)
    ref = hf_reference("llava_onevision", folder)
    ref.config.image_grid_pinpoints = [[32, 32]]
    assert_matches_hf(capped, ref, b1)
    # the forward reads the pinpoints too: one call cannot change them
    with pytest.raises(InputError, match="model.set_resolution"):
        default.prepare([image], "q?", image_grid_pinpoints=[[32, 32]])


@pytest.mark.parametrize("family, settings", [
    ("idefics3", {"do_image_splitting": False}),
    ("smolvlm", {"size": {"longest_edge": 32}}),
    ("internvl", {"max_patches": 1}),
])
def test_tiling_families_cap_tiles_per_call_and_match_hf(tiny_folder, family, settings):
    folder = tiny_folder(family)
    model = HookedMLLM.from_pretrained(folder)
    image = noise_image(90, 28, 2)
    base = model.prepare([image], "what is it?")
    capped = model.prepare([image], "what is it?", **settings)
    assert n_vision(capped) < n_vision(base)
    check_layout(model, capped)
    assert_matches_hf(model, hf_reference(family, folder), capped)


def test_check_resize_accepts_every_smart_resize_and_rejects_others():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    f = 28
    sizes = [(300, 170), (4000, 30), (2576, 1456), (56, 56), (33, 900), (640, 480), (29, 29)]
    limits = [(56 * 56, 28 * 28 * 1280), (256 * 28 * 28, 512 * 28 * 28), (4 * f * f, 16 * f * f)]
    for w, h in sizes:
        for lo, hi in limits:
            rh, rw = smart_resize(h, w, factor=f, min_pixels=lo, max_pixels=hi)
            check_resize("q", 0, (w, h), (rw, rh), f, (1, rh // 14, rw // 14))
            if rw != rh:  # the transpose is not a resize of this image
                with pytest.raises(ValueError, match="not an aspect-preserving"):
                    check_resize("q", 0, (w, h), (rh, rw), f, (1, rw // 14, rh // 14))
            if min(w, h) >= 100:  # (a side of a few dozen px leaves the aspect ratio loose)
                with pytest.raises(ValueError, match="not an aspect-preserving"):
                    check_resize("q", 0, (w, h), (rw, rh + 4 * f), f, (1, rh // 14 + 8,
                                                                       rw // 14))
            with pytest.raises(ValueError, match="not an aspect-preserving"):
                check_resize("q", 0, (w, h), (rw, rh), f, (2, rh // 14, rw // 14))


def test_fp16_checkpoint_loads_in_bf16_on_cpu_with_a_notice(tmp_path):
    build_tiny("llava", tmp_path, seed=0)
    hf_reference("llava", str(tmp_path)).half().save_pretrained(tmp_path)  # as LLaVA ships
    with pytest.warns(UserWarning, match="loading it in bf16"):
        loaded = HookedMLLM.from_pretrained(tmp_path)
    assert next(loaded.hf_model.parameters()).dtype == torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        kept = HookedMLLM.from_pretrained(tmp_path, dtype=torch.float16)
        fp32 = HookedMLLM.from_pretrained(tmp_path, dtype="float32")
    assert next(kept.hf_model.parameters()).dtype == torch.float16
    assert next(fp32.hf_model.parameters()).dtype == torch.float32


def test_sharded_hub_format_checkpoint_loads_and_matches_hf(tmp_path):
    build_tiny("qwen2_5_vl", tmp_path, seed=0)
    hf = hf_reference("qwen2_5_vl", str(tmp_path))
    (tmp_path / "model.safetensors").unlink()  # only the shards from here on
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and not (tmp_path / "model.safetensors").exists()
    model = HookedMLLM.from_pretrained(tmp_path)
    batch = model.prepare([IMAGE], "what is it?", "red")
    assert_matches_hf(model, hf_reference("qwen2_5_vl", str(tmp_path)), batch)

"""The structure the design promises: family knowledge lives in corelens.families only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from conftest import noise_image

import corelens
from corelens import compat
from corelens.families import FAMILIES
from corelens.zoo.tiny import tiny_image_sizes

SRC = Path(corelens.__file__).parent


def _family_strings() -> set[str]:
    names = set(FAMILIES)
    for f in FAMILIES.values():
        names |= set(f.hf_architectures) | set(f.model_types)
    return names


def _literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_no_family_name_outside_families():
    names = _family_strings()
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if (SRC / "families") in path.parents:
            continue
        found += [f"{path.relative_to(SRC)}:{line}: {value!r}"
                  for line, value in _literals(path) if value in names]
    assert not found, ("family names outside corelens/families (ask a Family trait instead):\n"
                       + "\n".join(found))


def test_every_family_has_a_tiny_builder():
    from corelens.zoo.tiny import BUILDERS, builder

    assert set(BUILDERS) == {type(f) for f in FAMILIES.values()}
    assert builder("llava") is builder(FAMILIES["llava"])

    class Stray(type(FAMILIES["llava"])):  # looked up by exact class: a subclass has none
        name = "stray"

    with pytest.raises(ValueError, match="'stray'.*corelens/zoo/tiny/"):
        builder(Stray())


def test_the_scan_sees_a_family_name(tmp_path):
    # the check itself: a module that branches on a family name is found
    bad = tmp_path / "bad.py"
    bad.write_text('def f(model):\n    return model.family.name == "gemma3"\n')
    assert (2, "gemma3") in _literals(bad) and "gemma3" in _family_strings()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_traits_match_the_hf_model(name, tiny_model):
    """What accel / attribution / prepare ask the family instead of its name, checked on the
    family's own tiny HF model."""
    model = tiny_model(name)
    fam = model.family
    decoder = model.hf_model.get_decoder()
    block = decoder.layers[0]
    has_sandwich = hasattr(block, "pre_feedforward_layernorm") or hasattr(
        block, "post_feedforward_layernorm")
    assert fam.sandwich_norms == has_sandwich
    assert fam.vision_side_inputs == (compat.qwen3_vl_deepstack(decoder) is not None)
    # bidirectional image blocks: HF's own mask lets an image token see a later one
    (w, h) = tiny_image_sizes(fam)[0]
    batch = model.prepare([noise_image(w, h, 0)], ["what is it ?"])
    pos = batch.layout.vision_positions(0)
    seen = {}

    def tap(a):
        seen["pattern"] = a.pattern_rows(pos[:1][None])

    with torch.no_grad(), model.attention.tap(0, tap):
        model(batch)
    later = seen["pattern"][0, :, 0, pos[1:]]  # first image token's row, later image keys
    assert fam.bidirectional_image_blocks == bool((later > 0).any())


@pytest.mark.parametrize("name", ["llava", "qwen2_5_vl"])
def test_act_name_names_hooks_the_model_has(name, tiny_model):
    from corelens.hook_names import EMBED, FINAL_NORM_IN, act_name

    hooks = tiny_model(name).hook_dict
    assert EMBED in hooks and FINAL_NORM_IN in hooks
    for act in ("z", "q", "k", "v", "pattern", "resid_pre", "resid_mid", "resid_post",
                "attn_out", "mlp_out", "mlp_in", "ln1_in", "ln2_in"):
        for layer in (0, 1):
            assert act_name(act, layer) in hooks, act_name(act, layer)


def test_head_labels_round_trip():
    from corelens.heads import head_name, kv_head_name, parse_head

    for head in [(0, 0), (4, 2), (31, 63)]:
        assert parse_head(head_name(head)) == head == parse_head(kv_head_name(head))
    assert head_name((4, 2)) == "L4H2" and kv_head_name((4, 1)) == "L4KV1"
    for bad in ("L4", "H2", "4H2", "LxH2", "L4H"):
        with pytest.raises(ValueError, match="not a head label"):
            parse_head(bad)

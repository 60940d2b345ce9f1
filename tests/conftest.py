"""Shared fixtures: tiny random models of every family, saved to folders and loaded back."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# names this test session (both xdist workers): a notebook executed in it is reused by the other
# tests of the session, never by a later one (docs/run_notebooks.py, tests/test_notebooks.py)
os.environ.setdefault("CORELENS_TEST_RUN",
                      os.environ.get("PYTEST_XDIST_TESTRUNUID") or uuid.uuid4().hex)
torch.set_num_threads(1)  # tiny models on 2 cores run 10-30x faster single-threaded

from corelens import compat  # noqa: E402
from corelens.families import FAMILIES  # noqa: E402
from corelens.zoo.tiny import build_tiny  # noqa: E402

FAMILY_NAMES = sorted(FAMILIES)


def pytest_report_header(config):
    """The versions a green (or red) run was measured on, first thing in the output."""
    return "corelens against " + ", ".join(f"{k} {v}" for k, v in compat.versions().items())


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """``tiny_folder(name, patch_local=False)`` -> folder with a saved tiny model + processor."""
    cache: dict[tuple[str, bool], str] = {}

    def make(name: str, patch_local: bool = False) -> str:
        key = (name, patch_local)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{name}-{int(patch_local)}")
            build_tiny(name, folder, seed=0, patch_local=patch_local)
            cache[key] = str(folder)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(tiny_folder):
    from corelens import HookedMLLM

    cache: dict[tuple[str, bool], HookedMLLM] = {}

    def make(name: str, patch_local: bool = False) -> HookedMLLM:
        key = (name, patch_local)
        if key not in cache:
            cache[key] = HookedMLLM.from_pretrained(tiny_folder(name, patch_local))
        return cache[key]

    return make


def hf_reference(name: str, folder: str):
    """The plain HF model of family ``name``, loaded from the same folder (eval mode)."""
    from transformers import AutoConfig

    return FAMILIES[name].hf_class(AutoConfig.from_pretrained(folder)).from_pretrained(
        folder).eval()


def assert_matches_hf(model, ref, batch, tol: float = 1e-4) -> torch.Tensor:
    """The HookedMLLM's logits equal the plain HF model's on every real (non-padding)
    position, under both attention paths (SDPA and eager); returns HF's logits."""
    real = batch.attention_mask.bool()
    with torch.no_grad():
        expected = ref(**batch.inputs).logits
        for mode in ("sdpa", "eager"):
            with model.attention.use(mode):
                got = model(batch)
            assert (got - expected)[real].abs().max() < tol, mode
    return expected


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8))


def grounded_examples(family: str, n: int = 3) -> list:
    """n grounded examples for ``family``'s tiny model: noise images of its test sizes, the
    evidence in the top-left quarter, a distractor in the bottom-right, answers of 1-2 tokens."""
    from corelens import GroundedExample
    from corelens.zoo.tiny import tiny_image_sizes

    sizes = tiny_image_sizes(family)
    out = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        out.append(GroundedExample(
            images=[noise_image(w, h, i)], question="what is the color of the square ?" + " ?" * i,
            answer="red blue" if i % 2 else "green", boxes=[(0, 0, w // 2, h // 2)],
            distractors=[(w // 2, h // 2, w, h)], id=f"e{i}"))
    return out


def flat_image(w: int, h: int, color=(128, 128, 128)) -> Image.Image:
    return Image.new("RGB", (w, h), color)

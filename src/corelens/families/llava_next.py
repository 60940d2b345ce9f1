"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``): CLIP tower, MLP projector, Llama/Mistral
decoder, "anyres" tiling.

Geometry of one image (what ``LlavaNextModel.pack_image_features`` scatters, in order) -- the
same as LLaVA-OneVision's tiled path (``corelens.families.onevision``), whose code this family
reuses, with two differences read off HF 5.23:

1. the *base* view: the whole image squashed to ``size_tuple`` (``shortest_edge`` x
   ``shortest_edge`` for the usual CLIP settings), then the per-tile resize and centre crop, a
   square grid of ``image_size // patch_size`` tokens per side, no newlines;
2. the *anyres* view: the image resized to fit the best pinpoint resolution, centred on a zero
   canvas, cut into tiles; the tiles' token grids joined into one grid, the rows/cols in the
   canvas padding dropped (``unpad_image``, in token units), an ``image_newline`` row after each
   grid row. There is NO ``anyres_max`` bilinear downsampling (that is OneVision's), and every
   image is tiled, whatever the number of images in its example (no ``batch_num_images``): the
   processor always makes a base + at least one tile, so HF's single-tile branch (one trailing
   newline) is never taken.

The ``default`` feature strategy drops the CLS token of each tile (CLIP towers); a CLS-less
tower needs ``full``. Every token's box is mapped back to original-image pixels through the
resize, canvas padding and tiling; ``tests/test_families.py`` checks it with the painted-region
test on a patch-local tiny model.
"""

from __future__ import annotations

from typing import Any

from corelens.families.onevision import LlavaOnevision


class LlavaNext(LlavaOnevision):
    """OneVision's anyres geometry without its downsampling and multi-image special case."""

    name = "llava_next"
    hf_architectures = ("LlavaNextForConditionalGeneration",)
    model_types = ("llava_next",)
    modeling = "transformers.models.llava_next.modeling_llava_next"
    supports_video = False  # LlavaNextForConditionalGeneration takes no videos

    @staticmethod
    def _tiled(inputs: dict[str, Any], n_images: int) -> list[bool]:
        return [True] * n_images  # LLaVA-NeXT tiles every image, alone in its example or not

    @staticmethod
    def _max_num_patches(hf_config: Any, processor: Any, where: str) -> int | None:
        return None  # no anyres_max downsampling in LlavaNextModel.pack_image_features

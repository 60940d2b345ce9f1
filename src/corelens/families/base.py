"""What a model family must tell corelens. One subclass per family, in its own module.

Everything family-specific lives in the subclass: which HF class and TransformerLens adapter,
how the processor lays out an image's tokens (``feature_rows``), how the decoder applies rotary
position embeddings and which position ids the decoder sees. Nothing outside
``corelens.families`` branches on the family (the tiny test models of each family are built in
``corelens.zoo.tiny``).
"""

from __future__ import annotations

import contextlib
import re
from abc import ABC, abstractmethod
from typing import Any, Callable, ClassVar, ContextManager

import torch
from jaxtyping import Float, Int
from torch import Tensor

from corelens.data.layout import FeatureRows, ViewGeometry
from corelens.errors import InputError

PLACEHOLDER = "<image>"  # how corelens prompts mark an image, whatever the family's own token
VIDEO_PLACEHOLDER = "<video>"  # ... and a video


class Family(ABC):
    """A family of MLLMs that share a layout of vision tokens and a decoder attention."""

    name: ClassVar[str]
    hf_architectures: ClassVar[tuple[str, ...]]  # HF ``config.architectures`` names
    model_types: ClassVar[tuple[str, ...]] = ()  # HF ``config.model_type`` values

    # --- traits: what code outside families/ may ask instead of testing the name -------------
    # the tokens of one image attend to each other both ways (HF's ``token_type_ids`` blocks)
    bidirectional_image_blocks: ClassVar[bool] = False
    # the decoder normalises each attention / MLP output before the residual add, so heads do
    # not add up in the residual stream (edge attribution refuses such models)
    sandwich_norms: ClassVar[bool] = False
    # vision features also enter the decoder after its input (Qwen3-VL's DeepStack)
    vision_side_inputs: ClassVar[bool] = False
    supports_hybrid_attention: ClassVar[bool] = True  # corelens.accel.HybridAttention
    supports_fastv: ClassVar[bool] = True  # corelens.accel.FastV
    # the processor settings that change how many vision tokens an image becomes (named in
    # errors and docs; any setting the processor declares is accepted: core/resolution.py)
    resolution_settings: ClassVar[tuple[str, ...]] = ()
    # processor settings the model reads too (written to its config; model-wide only)
    config_settings: ClassVar[tuple[str, ...]] = ()

    # --- loading ---------------------------------------------------------------------------
    def bridge_architecture(self, hf_config: Any) -> str:
        """The TransformerLens adapter name (defaults to the HF class name)."""
        return self.hf_class_name(hf_config)

    def hf_class_name(self, hf_config: Any) -> str:
        archs = list(getattr(hf_config, "architectures", None) or [])
        for a in archs:
            if a in self.hf_architectures:
                return a
        return self.hf_architectures[0]

    def hf_class(self, hf_config: Any) -> type:
        import transformers

        return getattr(transformers, self.hf_class_name(hf_config))

    def prepare_hf_model(self, hf_model: torch.nn.Module) -> None:
        """Family fixes applied to the HF model before the bridge wraps it."""

    # --- prompts and images ----------------------------------------------------------------
    def image_token_id(self, hf_config: Any, processor: Any) -> int:
        tid = getattr(hf_config, "image_token_id", None)
        if tid is None:
            tid = getattr(hf_config, "image_token_index", None)
        if tid is None:
            raise ValueError(f"{self.name}: config has no image_token_id")
        return int(tid)

    def image_token_string(self, processor: Any) -> str:
        return str(getattr(processor, "image_token", PLACEHOLDER))

    def has_chat_template(self, processor: Any) -> bool:
        """Whether ``build_prompt`` can format a question with this processor: it has a
        (non-blank) chat template. Without one, prompts must be written out whole, with the
        family's own image / video tokens (``prepare``'s raw prompts)."""
        tpl = getattr(processor, "chat_template", None)
        if isinstance(tpl, dict):
            return any(isinstance(t, str) and t.strip() for t in tpl.values())
        return isinstance(tpl, str) and bool(tpl.strip())

    def build_prompt(self, processor: Any, question: str, n_images: int,
                     n_videos: int = 0) -> str:
        """The chat-formatted user turn with ``n_images`` images and ``n_videos`` videos, ending
        where the answer starts.

        ``question`` may mark where images go with ``<image>`` and videos with ``<video>``;
        otherwise the images come first, then the videos. Needs a chat template
        (``has_chat_template``); raw prompts skip this method.
        """
        return self.build_prompts(processor, [(question, n_images, n_videos)])[0]

    def build_prompts(self, processor: Any, questions: list[tuple[str, int, int]]) -> list[str]:
        """``build_prompt`` of each ``(question, n_images, n_videos)``, in one call of the chat
        template (HF's per-call overhead paid once)."""
        if not questions:
            return []
        if not self.has_chat_template(processor):
            raise InputError(
                f"the {self.name} processor has no chat template, so the question cannot be "
                "put into a chat turn; write the whole prompt with the family's image token "
                f"({self.image_token_string(processor)!r}) once per image and mark it raw "
                "(GroundedExample(raw_prompt=True) / prepare(..., raw_prompts=[True])), or give "
                "the processor a chat template (processor.chat_template = ...)")
        chats = [[{"role": "user", "content": _chat_content(*q)}] for q in questions]
        return processor.apply_chat_template(chats, add_generation_prompt=True, tokenize=False)

    def processor_kwargs(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def feature_rows(
        self, hf_config: Any, processor: Any, inputs: dict[str, Tensor], image: int,
        size: tuple[int, int],
    ) -> FeatureRows:
        """The rows merged into the placeholder tokens of the ``image``-th image of the batch
        (global index over the batch, in processor order), original size ``size = (w, h)``."""

    # --- the vision tower's own rows (``corelens.data.tower``) ---------------------------------
    # the tower's activations are one flat ``[patches, ...]`` over every image (Qwen-VL), not
    # ``[pictures, tokens, ...]``
    flat_tower: ClassVar[bool] = False

    def tower_grids(
        self, hf_config: Any, processor: Any, inputs: dict[str, Tensor], image: int,
        size: tuple[int, int],
    ) -> list[ViewGeometry]:
        """The patch grids the vision tower sees for the ``image``-th image of the batch (global
        index, processor order): one per picture it encodes (the image, its tiles, crops,
        thumbnail), in the tower's batch order; boxes in ORIGINAL pixels."""
        raise NotImplementedError(f"{self.name} does not map its vision tower's rows")

    def tower_prefix(self, hf_config: Any) -> int:
        """Tokens the tower puts before each patch grid (a CLS token)."""
        return 0

    def tower_merge(self, hf_config: Any) -> int:
        """Patches per side that the projector folds into one LM token."""
        return 1

    def tower_block_order(self, hf_model: Any, inputs: dict[str, Tensor],
                          hook_name: str) -> Tensor | None:
        """Flat towers: the order of the merge blocks in ``hook_name``'s rows, as indices into
        the processor's order (None: the processor's order)."""
        return None

    def layout_keys(self, inputs: dict[str, Tensor], sizes: list[tuple[int, int]]) -> list[Any]:
        """A key per image of the batch (processor order; ``sizes``: their original sizes):
        within one ``prepare`` call, images with equal keys get the same ``feature_rows``
        (computed once); None: always compute. Default: the original size, for families whose
        layout depends on the size and the processor settings alone."""
        return list(sizes)

    # --- videos ------------------------------------------------------------------------------
    supports_video: ClassVar[bool] = False

    def video_token_id(self, hf_config: Any, processor: Any) -> int:
        tid = getattr(hf_config, "video_token_id", None)
        if tid is None:
            tid = getattr(hf_config, "video_token_index", None)
        if tid is None:
            raise ValueError(f"{self.name}: config has no video_token_id")
        return int(tid)

    def video_token_string(self, processor: Any) -> str:
        return str(getattr(processor, "video_token", VIDEO_PLACEHOLDER))

    def video_feature_rows(
        self, hf_config: Any, processor: Any, inputs: dict[str, Tensor], video: int,
        size: tuple[int, int], n_frames: int, times: list[float] | None,
    ) -> FeatureRows:
        """The rows merged into the video-token positions of the ``video``-th video of the batch
        (global index, processor order): frames of ``size = (w, h)``, ``n_frames`` of them,
        shown at ``times`` seconds (None if unknown). Views carry their frame spans
        (``ViewGeometry.frames`` / ``times``)."""
        raise NotImplementedError(f"{self.name} does not take videos")

    def check_videos(self, lengths: list[int]) -> None:
        """Raise an ``InputError`` if this family cannot batch videos of these frame counts."""

    # --- decoder ---------------------------------------------------------------------------
    def position_ids(
        self, hf_model: Any, inputs: dict[str, Tensor]
    ) -> Int[Tensor, "..."]:
        """Position ids the decoder sees. Default: count only real tokens (left padding)."""
        mask = inputs["attention_mask"]
        return (mask.long().cumsum(-1) - 1).clamp(min=0)

    def prune_side_inputs(self, decoder: Any, kept: Callable[[], Tensor | None],
                          n_tokens: Callable[[], int]) -> ContextManager[None]:
        """While active, vision features injected after the decoder input (``vision_side_inputs``)
        go only to the tokens kept by token pruning: ``kept()`` gives the kept positions
        ``[batch, n_kept]`` of the running forward (None: not pruned), ``n_tokens()`` the
        unpruned sequence length. FastV uses it; default: nothing is injected, nothing to do."""
        return contextlib.nullcontext()

    def rotary(self) -> Callable[..., tuple[Tensor, Tensor]]:
        """``(q, k, cos, sin, hf_attn) -> (q, k)`` as the family's decoder applies RoPE."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        def apply(q: Float[Tensor, "b h t d"], k: Float[Tensor, "b g t d"], cos: Tensor,
                  sin: Tensor, hf_attn: Any) -> tuple[Tensor, Tensor]:
            return apply_rotary_pos_emb(q, k, cos, sin)

        return apply


def _chat_content(question: str, n_images: int, n_videos: int) -> list[dict[str, str]]:
    """A user turn's content: the question split at its ``<image>`` / ``<video>`` marks, or
    without marks the images, then the videos, then the question."""
    parts = re.split(f"({re.escape(PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})", question)
    if len(parts) == 1:
        return ([{"type": "image"} for _ in range(n_images)]
                + [{"type": "video"} for _ in range(n_videos)]
                + [{"type": "text", "text": question}])
    content = []
    for text in parts:
        if text == PLACEHOLDER:
            content.append({"type": "image"})
        elif text == VIDEO_PLACEHOLDER:
            content.append({"type": "video"})
        elif text:
            content.append({"type": "text", "text": text})
    return content

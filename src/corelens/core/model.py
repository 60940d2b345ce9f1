"""``HookedMLLM``: a TransformerLens bridge around an HF MLLM that knows its vision tokens."""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from corelens import compat
from corelens.core import cache_budget, resolution
from corelens.core.attention import AttentionBackend
from corelens.core.cache import MLLMActivationCache
from corelens.core.evaluate import window_offset
from corelens.core.prepare import prepare as _prepare
from corelens.core.prepare import tower_layout as _tower_layout
from corelens.core.tl_surface import read_through_bridge, with_name
from corelens.data.batch import MultimodalBatch
from corelens.data.tower import TowerLayout
from corelens.errors import InputError
from corelens.families import Family, family_for_config
from corelens.families.adapters import register_adapters
from corelens.hook_names import act_name
from corelens.saes import attach as sae_attach

ModelInput = MultimodalBatch | str | Sequence[str] | Tensor
Positions = str | Tensor | Sequence[Tensor] | None


def _build_bridge(hf_model: Any, processor: Any, family: Family) -> Any:
    compat.require()
    register_adapters()  # the TransformerLens adapters corelens adds (InternVL, Qwen2-VL)
    family.prepare_hf_model(hf_model)
    return compat.build_bridge_from_module(
        hf_model, family.bridge_architecture(hf_model.config), hf_config=hf_model.config,
        tokenizer=getattr(processor, "tokenizer", processor),
        model_name=getattr(hf_model.config, "name_or_path", "") or "external",
    )


@read_through_bridge
class HookedMLLM(torch.nn.Module):
    """An MLLM with every TransformerLens hook, its vision-token layout and an owned attention.

    Build it with ``from_pretrained`` (hub id or local folder) or ``from_hf``. Every method that
    runs the model takes a ``MultimodalBatch`` from ``prepare`` (or text, for text-only runs).
    ``model(batch)`` returns the logits, ``Float[Tensor, "batch pos d_vocab"]``;
    ``run_with_cache`` returns them with the cache, where an attention pattern is
    ``Float[Tensor, "batch head query_pos key_pos"]``.

    Example:
        ```python
        from corelens import zoo

        model = zoo.load("toy-llava")  # a HookedMLLM; or HookedMLLM.from_pretrained(folder)
        batch = model.prepare_examples(zoo.examples("toy-llava", 2, seed=0))
        logits, cache = model.run_with_cache(batch)  # logits: [2, seq, d_vocab]
        cache["blocks.0.attn.hook_pattern"].shape  # [batch, head, query_pos, key_pos]
        model.to_str_tokens(batch)[:3]  # ['<s>', '<img 0:r0,c0>', '<img 0:r0,c1>']
        ```
    """

    def __init__(self, hf_model: Any, processor: Any, family: Family | None = None) -> None:
        super().__init__()
        self.family = family or family_for_config(hf_model.config)
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.bridge = _build_bridge(hf_model, processor, self.family)
        self.hf_model = hf_model  # the same modules the bridge wraps
        self._hook_table: tuple[tuple[str, Any], ...] | None = None  # hook_dict's key
        self._hook_names: dict[str, Any] = {}
        compat.direct_calls(self.bridge)
        compat.cached_block_kwargs(self.bridge)
        compat.skip_idle_offload_checks()
        self.attention = AttentionBackend(self.bridge, self.family.rotary(), hf_model.config)
        self.vision_token_ids = _vision_token_ids(self.family, hf_model.config, processor)
        self.eval()

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: Any, processor: Any) -> "HookedMLLM":
        """Wrap an already-loaded HF model (modified in place: bridge modules replace its own)."""
        return cls(hf_model.eval(), processor)

    @classmethod
    def from_pretrained(
        cls,
        name_or_dir: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **kw: Any,
    ) -> "HookedMLLM":
        """Load model + processor from a local folder (offline, always) or a hub id.

        Image-processor settings go to the processor, the way HF users set them:
        ``from_pretrained(qwen, max_pixels=1280 * 28 * 28)``, ``size={"longest_edge": 728}``
        (Idefics3 / SmolVLM), ``max_patches=6`` (InternVL), ``image_grid_pinpoints=[...]``
        (LLaVA-NeXT / OneVision: written to the model config too, which the forward reads).
        Any keyword the image (video) processor declares is one (``model.resolution_settings``
        lists them); ``set_resolution`` changes them later, ``prepare(..., **settings)`` for one
        call. Every other keyword goes to the HF model's ``from_pretrained``.

        ``dtype``: the weights' dtype (a ``torch.dtype`` or its name). Left out, HF's default
        applies (the checkpoint's own dtype), except that an fp16 checkpoint loaded for the CPU
        becomes bf16 with a notice: CPU fp16 matmuls are several times slower than bf16 (and
        fp32); pass ``dtype=torch.float16`` to keep fp16. ``"float32"`` is the reference for
        exact comparisons; on a GPU bf16 (or the checkpoint's fp16) is the usual choice.

        ``device_map`` (in ``kw``: ``"auto"``, ``"balanced"``, a dict of module -> device, ...)
        spreads a model that does not fit one GPU over several: corelens loads the HF model
        with it (through accelerate) and builds the bridge on the loaded modules, so every hook
        and the attention backend run on each layer's own device. Inputs go to the device of
        the input embedding (``model.device``); metrics accumulate in fp32 whatever ``dtype``.
        ``device`` and ``device_map`` are exclusive.
        """
        from transformers import AutoConfig, AutoProcessor

        if device is not None and kw.get("device_map") is not None:
            raise ValueError("give device= or device_map=, not both (device_map places the "
                             "model itself)")
        local = os.path.isdir(name_or_dir)
        if not local and _looks_local(str(name_or_dir)):
            raise InputError(f"no model folder at {str(name_or_dir)!r} (it looks like a local "
                             "path, and it does not exist): check the path, or give a hub id "
                             "such as 'llava-hf/llava-1.5-7b-hf'")
        if local:
            kw.setdefault("local_files_only", True)
        files = {k: v for k, v in kw.items() if k == "local_files_only"}
        config = AutoConfig.from_pretrained(name_or_dir, **files)
        family = family_for_config(config)
        processor = AutoProcessor.from_pretrained(name_or_dir, **files)
        settings, model_kw = resolution.split_settings(processor, kw)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is None:
            dtype = _cpu_safe_dtype(config, device, model_kw.get("device_map"))
        if dtype is not None:
            model_kw["dtype"] = dtype
        try:
            hf_model = family.hf_class(config).from_pretrained(name_or_dir, **model_kw)
        except TypeError as err:
            bad = resolution.unexpected_keywords(err, model_kw)
            if bad is None:
                raise
            raise resolution.unknown_setting(
                family, processor, bad or list(model_kw), "from_pretrained") from err
        processor = resolution.with_settings(family, processor, settings, hf_model.config,
                                             where="from_pretrained")
        if device is not None:
            hf_model = hf_model.to(device)
        return cls(hf_model.eval(), processor, family)

    @property
    def resolution_settings(self) -> dict[str, Any]:
        """The processor settings that may be changed (``set_resolution``, ``prepare``), with
        their current values; ``family.resolution_settings`` are those that change the number
        of vision tokens."""
        out = {}
        for name in sorted(resolution.known_settings(self.processor)):
            for part in (self.processor.image_processor,
                         getattr(self.processor, "video_processor", None)):
                if part is not None and hasattr(part, name):
                    out[name] = getattr(part, name)
                    break
        return out

    def set_resolution(self, **settings: Any) -> "HookedMLLM":
        """Change image-processor settings for every later ``prepare`` (e.g.
        ``max_pixels=512 * 28 * 28``); settings the model reads as well (anyres
        ``image_grid_pinpoints``) are written to its config. Returns the model."""
        self.processor = resolution.with_settings(self.family, self.processor, settings,
                                                  self.hf_model.config, where="set_resolution")
        return self

    # --- the TransformerLens surface -------------------------------------------------------
    @property
    def cfg(self) -> Any:
        return self.bridge.cfg

    @property
    def hook_dict(self) -> dict[str, Any]:
        """TransformerLens's ``hook_dict``: every hook point by name, aliases included. The
        bridge rebuilds its alias tables at every access (~0.5 ms on a toy model); here they
        are rebuilt only when its table of hook points changed (an SAE attached, a hook point
        added or replaced)."""
        table = tuple(compat.hook_registry(self.bridge).items())
        if table != self._hook_table:
            self._hook_table, self._hook_names = table, self.bridge.hook_dict
        return dict(self._hook_names)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embedding (under a ``device_map`` the
        model's first stage; the vision tower may sit elsewhere, accelerate moves its input)."""
        emb = self.hf_model.get_input_embeddings()
        dev = compat.accelerate_execution_device(emb)
        if dev is not None:  # accelerate-offloaded: weights live elsewhere, compute here
            return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
        weight = getattr(emb, "weight", None)
        if isinstance(weight, Tensor) and weight.device.type != "meta":
            return weight.device
        return next(self.hf_model.parameters()).device

    def prepare(self, images: Any, prompts: str | Sequence[str], answers: Any = None,
                boxes: Any = None, **kw: Any) -> MultimodalBatch:
        """Images + prompts (+ answers, evidence boxes) -> ``MultimodalBatch`` on this device.

        ``kw``: ``core.prepare.prepare``'s options, and image-processor settings for this call
        only (``max_pixels=...``, ``max_patches=...``: ``resolution_settings``)."""
        kw.setdefault("device", self.device)
        settings, kw = resolution.split_settings(self.processor, kw)
        processor = resolution.with_settings(self.family, self.processor, settings)
        try:
            batch = _prepare(self.family, self.hf_model, processor, images, prompts, answers,
                             boxes, **kw)
            batch.settings = dict(settings)
            return batch
        except TypeError as err:
            bad = resolution.unexpected_keywords(err, kw)
            if not bad:
                raise
            raise resolution.unknown_setting(self.family, self.processor, bad,
                                             "prepare") from err

    def prepare_examples(self, examples: Sequence[Any], **kw: Any) -> MultimodalBatch:
        """``GroundedExample``s -> ``MultimodalBatch`` (evidence and distractor boxes kept)."""
        examples = [ex.validate(evidence=False) for ex in examples]  # prepare checks boxes
        kw.setdefault("raw_prompts", [getattr(ex, "raw_prompt", False) for ex in examples])
        return self.prepare([ex.images for ex in examples], [ex.question for ex in examples],
                            [ex.answer for ex in examples], [ex.boxes for ex in examples],
                            distractors=[ex.distractors for ex in examples],
                            videos=[getattr(ex, "videos", []) for ex in examples],
                            ids=[ex.id for ex in examples], **kw)

    def tower_layout(self, batch: MultimodalBatch,
                     hook_name: str = "vision_projector.hook_in") -> TowerLayout:
        """Where each row of a vision-tower / projector activation of ``batch`` sits: the patch
        grid of every picture the tower encodes (image, tile, crop, thumbnail), with boxes in
        original pixels (``corelens.data.tower``); ``.rows(act.shape, hook_name)`` maps the rows
        of an activation. ``hook_name`` matters where hooks see the patches in different orders
        (Qwen2.5-VL's windows). Images only: video frames go through the tower apart."""
        processor = resolution.with_settings(self.family, self.processor, batch.settings)
        return _tower_layout(self.family, self.hf_model, processor, batch, hook_name)

    def _inputs(self, inp: ModelInput) -> tuple[Tensor, dict[str, Any]]:
        if isinstance(inp, MultimodalBatch):
            device = self.device  # read once: it walks the HF model to its embedding
            return inp.input_ids.to(device), {
                k: v.to(device) for k, v in inp.model_kwargs().items()}
        if isinstance(inp, Tensor):
            self._check_no_vision_tokens(inp)
            return inp.to(self.device), {}
        if isinstance(inp, str) or (isinstance(inp, Sequence) and all(isinstance(s, str)
                                                                       for s in inp)):
            texts = [inp] if isinstance(inp, str) else list(inp)
            old = self.tokenizer.padding_side
            self.tokenizer.padding_side = "left"
            try:
                enc = self.tokenizer(texts, return_tensors="pt", padding=True)
            finally:
                self.tokenizer.padding_side = old
            mask = enc["attention_mask"].to(self.device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            return enc["input_ids"].to(self.device), {"attention_mask": mask,
                                                      "position_ids": pos}
        raise InputError(f"cannot run the model on a {type(inp).__name__}; pass a "
                         "MultimodalBatch from model.prepare(...), a string or a token tensor")

    def _check_no_vision_tokens(self, ids: Tensor) -> None:
        """Token ids alone cannot carry an image: refuse ids that hold image / video tokens
        (the model would run on placeholder embeddings, a silently wrong number)."""
        found = torch.isin(ids.cpu(), torch.tensor(sorted(self.vision_token_ids)))
        if found.any():
            raise InputError(
                f"these token ids hold {int(found.sum())} image/video token(s) (ids "
                f"{sorted(set(ids.cpu()[found].tolist()))}) but no pixel values: the model "
                "would see the placeholder embedding instead of the image. Pass the "
                "MultimodalBatch from model.prepare(...) / prepare_examples(...) instead of "
                "batch.input_ids (TransformerLens's patching functions accept it too)")

    def forward(self, inp: ModelInput, return_type: str | None = "logits",
                **kw: Any) -> Float[Tensor, "batch seq vocab"]:
        """The model's logits ``[batch, seq, vocab]`` (``return_type=None``: nothing).

        ``logits_to_keep=k`` (HF's): the unembedding runs on the last ``k`` positions only and
        the logits are ``[batch, k, vocab]``; ``batch.logits_to_keep`` covers every query
        position (what ``evaluate``, ablation and the patching metrics read). With
        ``return_type=None`` it defaults to 1: nobody reads them (hooks on ``unembed`` then
        see one position; pass ``logits_to_keep=0`` for all)."""
        ids, kwargs = self._inputs(inp)
        if return_type is None:
            kw.setdefault("logits_to_keep", 1)
        return self.bridge(ids, return_type=return_type, **kwargs, **_without_kv_cache(kw))

    def run_with_hooks(self, inp: ModelInput, fwd_hooks: Sequence[tuple[Any, Callable]] = (),
                       bwd_hooks: Sequence[tuple[Any, Callable]] = (), **kw: Any) -> Any:
        """TransformerLens's ``run_with_hooks``; each hook's ``hook.name`` is the name it was
        added under (a TL alias such as ``blocks.0.hook_resid_post`` stays that)."""
        ids, kwargs = self._inputs(inp)
        return self.bridge.run_with_hooks(ids, fwd_hooks=self._named(fwd_hooks),
                                          bwd_hooks=self._named(bwd_hooks), **kwargs,
                                          **_without_kv_cache(kw))

    @contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[Any, Callable]] = (),
              bwd_hooks: Sequence[tuple[Any, Callable]] = (), **kw: Any) -> Iterator[Any]:
        """TransformerLens's ``hooks`` context manager (hook names as in ``run_with_hooks``)."""
        with self.bridge.hooks(fwd_hooks=self._named(fwd_hooks),
                               bwd_hooks=self._named(bwd_hooks), **kw) as m:
            yield m

    def add_hook(self, name: Any, hook: Callable, dir: str = "fwd", **kw: Any) -> None:
        """TransformerLens's ``add_hook`` (a name, or a filter over names); ``reset_hooks``
        removes it."""
        for n, fn in self._named([(name, hook)]):
            self.bridge.add_hook(n, fn, dir=dir, **kw)

    def _named(self, hooks: Sequence[tuple[Any, Callable]]) -> list[tuple[str, Callable]]:
        """(name or filter, fn) -> (name, fn seeing ``hook.name`` = that name). A filter is
        expanded over ``hook_dict``; where it matches both a bridge name and its TL alias, the
        alias is kept (one hook per hook point)."""
        out: list[tuple[str, Callable]] = []
        for name, fn in hooks:
            if isinstance(name, str):
                out.append((name, with_name(fn, name)))
                continue
            picked: dict[int, str] = {}  # hook point -> the name this filter reaches it by
            hook_dict = self.hook_dict
            for n in (n for n in hook_dict if name(n)):
                point = hook_dict[n]
                if id(point) not in picked or picked[id(point)] == point.name:
                    picked[id(point)] = n  # an alias wins over the bridge's own name
            out += [(n, with_name(fn, n)) for n in picked.values()]
        return out

    def run_with_cache(
        self, inp: ModelInput, names_filter: Any = None, positions: Positions = None,
        check_memory: bool = True, **kw: Any
    ) -> tuple[Tensor, MLLMActivationCache]:
        """Run and cache activations (TransformerLens names).

        ``positions`` caches only some sequence positions: ``"query"`` (the batch's query
        positions), ``"vision"`` (its vision tokens), a 1-D tensor shared by the batch, or one
        tensor per example. Per-example positions are right-padded by repeating the example's
        last one; ``cache.positions`` / ``cache.position_mask`` say which is which. Attention
        patterns are sliced along their query axis.

        ``check_memory``: before running, the cache's size is estimated from the model's widths
        (``core.cache_budget``); above half the free memory of the device a warning names the
        cheaper paths, above all of it an ``InputError`` does (the estimate covers decoder hooks).
        """
        ids, kwargs = self._inputs(inp)
        index = self._position_index(inp, positions, ids.shape[0])
        hooks = self.hook_dict
        names = self._own_cache_names(names_filter, kw, hooks)
        picked = names  # what the filter reaches (TransformerLens's path: only where read)
        if picked is None and (check_memory or index is not None):
            picked = self._names(names_filter, hooks)
        if check_memory:
            self._check_cache_budget(ids, picked, index, kw.get("logits_to_keep"), hooks)
        kw = _without_kv_cache(kw)
        if names is None and index is None:  # TransformerLens's options, errors and warnings
            logits, tl_cache = self.bridge.run_with_cache(ids, names_filter=names_filter,
                                                          **kwargs, **kw)
            return logits, MLLMActivationCache.from_cache(
                tl_cache, vision_side_inputs=self.family.vision_side_inputs)
        idx, valid = index if index is not None else (None, None)
        store: dict[str, Tensor | None] = {}

        def saver(name: str) -> Callable[..., None]:
            def save(act: Any, hook: Any) -> None:
                if isinstance(act, tuple):  # as TransformerLens: a tuple caches its first tensor
                    act = act[0] if act and isinstance(act[0], Tensor) else None
                if act is None or idx is None:
                    store[name] = None if act is None else act.detach()
                else:
                    store[name] = _gather_positions(name, act.detach(), idx.to(act.device),
                                                    int(ids.shape[1]))
            return save

        if names is None:  # positions with TransformerLens's run options
            logits = self.bridge.run_with_hooks(ids, fwd_hooks=[(n, saver(n)) for n in picked],
                                                **kwargs, **kw)
        else:
            with compat.temporary_hooks([(hooks[n], saver(n)) for n in names]):
                logits = self.bridge(ids, **kwargs, **kw)
        cache = MLLMActivationCache(store, self.bridge, has_batch_dim=True,
                                    vision_side_inputs=self.family.vision_side_inputs,
                                    positions=idx, position_mask=valid)
        return logits, cache

    def _own_cache_names(self, names_filter: Any, kw: dict[str, Any],
                         hooks: dict[str, Any]) -> list[str] | None:
        """The hook names ``run_with_cache`` caches by itself (TransformerLens's own
        ``run_with_cache`` rebuilds its alias tables at every call: ~5% of a toy forward), or
        None where TransformerLens's must run: its own options (``stop_at_layer``,
        ``pos_slice``, ``incl_bwd``, ...), compatibility mode, and a filter that names a hook
        this model lacks or picks a gated-off one (TransformerLens raises / warns about those)."""
        if set(kw) & _TL_CACHE_OPTIONS or getattr(self.bridge, "compatibility_mode", False):
            return None
        if isinstance(names_filter, (str, list, tuple)):
            wanted = [names_filter] if isinstance(names_filter, str) else list(names_filter)
            if not wanted or any(not isinstance(n, str) or n not in hooks for n in wanted):
                return None
        elif names_filter is not None and not callable(names_filter):
            return None
        picked = self._picked(names_filter, hooks)
        gated = {n for n in picked if self._gated(n, hooks)}
        if gated and names_filter is not None:  # None: TransformerLens skips them unwarned
            return None
        return [n for n in picked if n not in gated]

    def _check_cache_budget(self, ids: Tensor, names: list[str],
                            index: tuple[Tensor, Tensor] | None, keep: int | None,
                            hooks: dict[str, Any]) -> None:
        b, t = ids.shape
        parts = cache_budget.estimate(self, names, b, t,
                                      rows=None if index is None else index[0].shape[1],
                                      logits_rows=keep or None, hooks=hooks)
        total, free = sum(parts.values()), cache_budget.free_bytes(self.device)
        if free is None or total <= cache_budget.WARN_FRACTION * free:
            return
        message = cache_budget.advice(parts, total, free, positions=index is not None)
        if total > free:
            raise InputError(message)
        warnings.warn(message, cache_budget.CacheMemoryWarning, stacklevel=3)

    def _names(self, names_filter: Any, hooks: dict[str, Any] | None = None) -> list[str]:
        hooks = self.hook_dict if hooks is None else hooks
        return [n for n in self._picked(names_filter, hooks)  # the filter first: the gate
                if not self._gated(n, hooks)]                  # check costs more than it

    @staticmethod
    def _picked(names_filter: Any, hooks: dict[str, Any]) -> list[str]:
        """The names of ``hooks`` a ``names_filter`` picks (None: all; a name; names; a
        callable), in ``hooks``'s order."""
        if names_filter is None:
            return list(hooks)
        if isinstance(names_filter, str):
            return [names_filter] if names_filter in hooks else []
        if callable(names_filter):
            return [n for n in hooks if names_filter(n)]
        wanted = set(names_filter)
        return [n for n in hooks if n in wanted]

    def _gated(self, name: str, hooks: dict[str, Any]) -> bool:
        return compat.gated_hook_reason(self.bridge, hooks[name].name or name) is not None

    def _position_index(self, inp: ModelInput, positions: Positions,
                        batch: int) -> tuple[Tensor, Tensor] | None:
        if positions is None:
            return None
        if isinstance(positions, str):
            if not isinstance(inp, MultimodalBatch):
                raise InputError(f"positions={positions!r} needs a MultimodalBatch")
            if positions == "query":
                lists = inp.query_positions
            elif positions == "vision":
                lists = [inp.layout.vision_positions(e) for e in range(len(inp))]
            else:
                raise InputError(
                    f"positions must be 'query', 'vision' or tensors, not {positions!r}")
        elif isinstance(positions, Tensor) and positions.ndim == 1:
            lists = [positions] * batch
        else:
            lists = list(positions)
        width = max(max(len(p) for p in lists), 1)
        idx = torch.zeros(batch, width, dtype=torch.long)
        valid = torch.zeros(batch, width, dtype=torch.bool)
        for e, p in enumerate(lists):
            p = torch.as_tensor(p, dtype=torch.long).cpu()
            if p.numel():
                idx[e, : len(p)] = p
                idx[e, len(p):] = p[-1]
                valid[e, : len(p)] = True
        return idx, valid

    # --- tokens -----------------------------------------------------------------------------
    def to_str_tokens(self, inp: ModelInput, example: int = 0) -> list[str]:
        """Token strings. Image tokens read ``<img i:rR,cC>`` (``<img i:rR,cC,VIEW>`` where the
        image has several views: anyres tiles, base); video tokens ``<vid v:fA-B,S-Es,rR,cC>``
        (the frames ``A..B`` the token sees, ``fA`` for one frame, and the seconds of the first
        and last of them when the video's fps is known); structural rows ``<img i:nl>`` /
        ``<vid v:nl>``. Padding is dropped."""
        if isinstance(inp, MultimodalBatch):
            ids = inp.input_ids[example].tolist()
            toks = self.tokenizer.convert_ids_to_tokens(ids)
            for img in inp.layout.images[example]:
                for p in img.positions.tolist():
                    info = inp.layout.token_info(example, p)
                    assert info is not None  # a position of one of the example's images
                    toks[p] = info.label()
            mask = inp.attention_mask[example].bool().tolist()
            return [t for t, m in zip(toks, mask) if m] if not all(mask) else toks
        if isinstance(inp, Tensor):  # as TransformerLens: one list per row of a 2-D tensor
            ids_t = inp.cpu()
            if ids_t.ndim == 2 and ids_t.shape[0] > 1:
                return [self.tokenizer.convert_ids_to_tokens(r.tolist()) for r in ids_t]
            return self.tokenizer.convert_ids_to_tokens(ids_t.reshape(-1).tolist())
        if not isinstance(inp, str) and isinstance(inp, Sequence):
            return [self.to_str_tokens(t) for t in inp]
        ids_t, _ = self._inputs(inp)
        return self.tokenizer.convert_ids_to_tokens(ids_t[0].tolist())

    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool | None = None,
                  padding_side: str | None = None, **kw: Any) -> Int[Tensor, "batch seq"]:
        """Token ids of text. Without TransformerLens's ``prepend_bos`` / ``padding_side`` /
        ``move_to_device`` / ``truncate``: the tokenizer's own special tokens, left padding (as
        ``model("text")`` runs it); with any of them: TransformerLens's ``to_tokens``."""
        if prepend_bos is None and padding_side is None and not kw:
            return self._inputs(text)[0]
        return self.bridge.to_tokens(text, prepend_bos=prepend_bos, padding_side=padding_side,
                                     **kw)

    # --- analysis conveniences ---------------------------------------------------------------
    def logit_lens(
        self, inp: ModelInput, positions: Positions = "query", layers: Sequence[int] | None = None
    ) -> Float[Tensor, "layer batch pos vocab"]:
        """Logits read off the residual stream after each layer (final norm + unembedding),
        at ``positions`` (any position, vision tokens included)."""
        n = self.cfg.n_layers
        layers = list(range(n)) if layers is None else list(layers)
        names = [act_name("resid_post", l) for l in layers]
        with torch.no_grad():
            _, cache = self.run_with_cache(inp, names_filter=names, positions=positions)
            out = []
            for name in names:
                resid = cache[name]
                out.append(self.bridge.unembed(self.bridge.ln_final(resid)))
        return torch.stack(out)

    @torch.no_grad()
    def generate(self, inp: ModelInput, max_new_tokens: int = 20, do_sample: bool = False,
                 skip_special_tokens: bool = True, **kw: Any) -> list[str]:
        """Greedy (or sampled) continuation of each example; hooks fire at every step."""
        ids, kwargs = self._inputs(inp)
        kwargs.pop("position_ids", None)  # HF derives positions step by step from the mask
        out = self.hf_model.generate(input_ids=ids, max_new_tokens=max_new_tokens,
                                     do_sample=do_sample,
                                     pad_token_id=self.tokenizer.pad_token_id, **kwargs, **kw)
        return self.tokenizer.batch_decode(out[:, ids.shape[1]:],
                                           skip_special_tokens=skip_special_tokens)

    # --- sparse autoencoders: corelens.saes (above core, so imported on use) ---------------------
    def add_sae(self, sae: Any, use_error_term: bool | None = None) -> None:
        """SAELens's ``add_sae``: splice ``sae`` in at its hook name (``corelens.saes``)."""
        sae_attach.add_sae(self, sae, use_error_term)

    def reset_saes(self, act_names: Any = None, prev_saes: Any = None) -> None:
        """SAELens's ``reset_saes``: remove the SAEs at ``act_names`` (all: None)."""
        sae_attach.reset_saes(self, act_names, prev_saes)

    def saes(self, saes: Any = (), reset_saes_end: bool = True,
             use_error_term: bool | None = None) -> Any:
        """SAELens's ``saes`` context: ``saes`` attached within the ``with`` block."""
        return sae_attach.saes(self, saes, reset_saes_end, use_error_term)

    def run_with_saes(self, inp: ModelInput, saes: Any = (), **kw: Any) -> Any:
        """SAELens's ``run_with_saes``: the forward with ``saes`` attached for this call."""
        return sae_attach.run_with_saes(self, inp, saes, **kw)

    def run_with_cache_with_saes(self, inp: ModelInput, saes: Any = (), **kw: Any) -> Any:
        """SAELens's ``run_with_cache_with_saes``: ``run_with_cache`` with ``saes`` attached;
        the cache holds their hook points (``<hook_name>.hook_sae_acts_post``, ...)."""
        return sae_attach.run_with_cache_with_saes(self, inp, saes, **kw)


def _without_kv_cache(kw: dict[str, Any]) -> dict[str, Any]:
    """HF's forward fills a KV cache by default (``use_cache=True``: a copy of every layer's
    keys and values, ~8% of a toy forward) that these forwards never return; off unless the
    caller asks for it or passes a cache."""
    if "use_cache" in kw or any(k in kw for k in compat.KV_CACHE_KWARGS):
        return kw
    return {"use_cache": False, **kw}


# run_with_cache options that only TransformerLens's run_with_cache implements
_TL_CACHE_OPTIONS = frozenset({
    "return_cache_object", "remove_batch_dim", "stop_at_layer", "start_at_layer", "pos_slice",
    "incl_bwd", "reset_hooks_end", "clear_contexts", "device"})


def _gather_positions(name: str, act: Tensor, idx: Int[Tensor, "batch p"], seq: int) -> Tensor:
    """Select positions of a hooked activation: the query axis of patterns/scores, else dim 1.
    Logits over the last k positions only (``logits_to_keep``) are indexed from the end."""
    if not name.startswith(("blocks.", "embed", "hook_embed", "unembed", "ln_final")):
        return act  # vision encoder / projector: batched by image, not by sequence
    if name.startswith(("unembed", "hook_unembed")) and act.ndim == 3 and act.shape[1] < seq:
        idx = idx - window_offset(seq, act.shape[1], idx)
    if name.endswith(("hook_pattern", "hook_attn_scores")) and act.ndim == 4:
        b, h, _, k = act.shape
        return torch.gather(act, 2, idx[:, None, :, None].expand(b, h, idx.shape[1], k))
    if act.ndim >= 2 and act.shape[0] == idx.shape[0] and act.shape[1] >= int(idx.max()) + 1:
        shape = (idx.shape[0], idx.shape[1]) + tuple(act.shape[2:])
        return torch.gather(act, 1, idx.view(*idx.shape, *([1] * (act.ndim - 2))).expand(shape))
    return act


def _vision_token_ids(family: Family, hf_config: Any, processor: Any) -> set[int]:
    """The ids of the tokens that stand for image / video features in ``input_ids``."""
    ids = {family.image_token_id(hf_config, processor)}
    try:
        ids.add(family.video_token_id(hf_config, processor))
    except (ValueError, NotImplementedError, AttributeError):
        pass  # a family without video
    return ids



def _looks_local(name: str) -> bool:
    """A path, not a hub id ("org/name"): absolute, relative with ./ ../ ~, or deeper."""
    parent = os.path.dirname(name)
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name
            or name.count("/") > 1 or (bool(parent) and os.path.isdir(parent)))


def _cpu_safe_dtype(config: Any, device: Any, device_map: Any) -> torch.dtype | None:
    """bf16 in place of a checkpoint's fp16 when the model will run on the CPU (with a
    notice); ``None`` (HF's default: the checkpoint's dtype) otherwise."""
    on_cpu = device_map in (None, "cpu") and (device is None or
                                              torch.device(device).type == "cpu")
    saved = [getattr(c, "dtype", None) or getattr(c, "torch_dtype", None)
             for c in (config, getattr(config, "text_config", None)) if c is not None]
    saved = [getattr(torch, d) if isinstance(d, str) else d for d in saved if d is not None]
    if not on_cpu or not saved or saved[0] != torch.float16:
        return None
    warnings.warn("corelens: the checkpoint is fp16 and the model runs on the CPU, where fp16 "
                  "is several times slower than bf16: loading it in bf16 (pass "
                  "dtype=torch.float16 to keep fp16, or dtype=torch.float32 for exact "
                  "comparisons)", stacklevel=3)
    return torch.bfloat16

"""Every private TransformerLens / transformers / torch name corelens touches, in one place.

corelens owns the decoder attention forward of a TransformerLens ``TransformerBridge`` and meets
HF's KV cache there, so it leans on names that neither library promises to keep. Each one is
used only through a function of this module, and listed in ``PRIVATE_NAMES`` with the signature
corelens expects; ``problems()`` checks them all (``tests/test_compat.py`` asserts it is empty,
and ``HookedMLLM`` calls ``require()`` when it builds a bridge), so an upgrade that drops or
changes one fails loudly here, naming the name, instead of silently somewhere in a forward.

Tested range: see ``pyproject.toml`` (transformers, transformer-lens upper bounds).
"""

from __future__ import annotations

import contextlib
import inspect
import types
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
import transformers
from accelerate.utils import align_module_device as accelerate_align_module_device
from torch import Tensor
from transformer_lens.conversion_utils.conversion_steps.base_tensor_conversion import (
    BaseTensorConversion,
)
from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components import (
    base as tl_component_base,
)
from transformer_lens.model_bridge.generalized_components import position_embedding_hooks_mixin
from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent
from transformer_lens.model_bridge.generalized_components.block import BlockBridge
from transformer_lens.model_bridge.generalized_components.embedding import EmbeddingBridge
from transformer_lens.model_bridge.generalized_components.linear import LinearBridge
from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge
from transformer_lens.model_bridge.generalized_components.rms_normalization import (
    RMSNormalizationBridge,
)
from transformer_lens.model_bridge.sources import _bridge_builder
from transformers import vision_utils
from transformers.cache_utils import Cache
from transformers.models.qwen3_vl import modeling_qwen3_vl
from transformers.processing_utils import ProcessorMixin

from corelens.errors import CorelensError

__all__ = ["BaseTensorConversion", "KV_CACHE_KWARGS", "PRIVATE_NAMES", "PrivateName",
           "accelerate_execution_device", "apply_position_embedding_hooks",
           "build_bridge_from_module", "cached_block_kwargs", "direct_calls",
           "gated_hook_reason", "skip_idle_offload_checks",
           "has_attn_implementation", "has_hooks", "hook_registry",
           "kv_cache", "problems", "processor_images_kwargs", "qwen3_vl_deepstack",
           "refresh_hook_registry", "register_tl_adapter", "replace_forward", "restore_forward",
           "replace_qwen3_vl_deepstack", "require", "set_attn_implementation", "update_kv_cache",
           "versions"]

# HF's decoder layers hand their attention the KV cache as ``cache=`` since transformers 5.24
# (``past_key_values=`` before; deprecated until 5.40). TransformerLens 4.3's
# ``_update_kv_cache`` only knows the old names, so on 5.24+ it silently skips the update and
# every decoding step attends to itself alone: corelens reads either name itself.
KV_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")


def versions() -> dict[str, str]:
    """The installed versions of the libraries whose internals corelens depends on."""
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "transformer_lens": metadata.version("transformer-lens")}


# --- the private names, each behind one function -----------------------------------------------
def build_bridge_from_module(model: Any, architecture: str, **kw: Any) -> Any:
    """A ``TransformerBridge`` around an already-loaded HF module (TL's private builder: the
    public ``TransformerBridge.boot_transformers`` may pip-install and loads by name)."""
    return _bridge_builder.build_bridge_from_module(model, architecture, **kw)


def register_tl_adapter(architecture: str, adapter: type) -> None:
    """Register ``adapter`` for an HF class name with TransformerLens (public
    ``register_adapter``), unless one is registered already (its ``_adapters`` table)."""
    if architecture not in ArchitectureAdapterFactory._adapters:
        ArchitectureAdapterFactory.register_adapter(architecture, adapter)


def hook_registry(bridge: Any) -> dict[str, Any]:
    """The bridge's table of hook names (``hook_dict`` is built from it): where SAEs register
    their own hook points (``corelens.saes``)."""
    table = getattr(bridge, "_hook_registry", None)
    if not isinstance(table, dict):
        raise CorelensError("TransformerBridge._hook_registry is gone or changed: corelens.saes "
                            "cannot register an SAE's hook points (install the tested "
                            "transformer-lens, requirements.lock)")
    return table


def refresh_hook_registry(bridge: Any) -> None:
    """Let the bridge's hook registry see hook points added to its components after build."""
    bridge.clear_hook_registry()
    bridge._initialize_hook_registry()


def gated_hook_reason(bridge: Any, name: str) -> str | None:
    """Why the bridge refuses to fire hook ``name`` (None: it fires)."""
    return bridge._gated_hook_reason(name)


def apply_position_embedding_hooks(attn: Any, position_embeddings: Any) -> Any:
    """Fire the bridge's ``hook_cos`` / ``hook_sin`` on an attention call's (cos, sin)."""
    if isinstance(attn, position_embedding_hooks_mixin.PositionEmbeddingHooksMixin):
        return attn._apply_position_embedding_hooks(position_embeddings)
    return position_embeddings


def replace_forward(component: Any, fn: Callable[..., Any]) -> None:
    """Make ``fn(component, ...)`` the bridge component's forward. A plain ``forward =`` on a
    bridge component is forwarded to the HF module it wraps, hence ``object.__setattr__``."""
    object.__setattr__(component, "forward", types.MethodType(fn, component))


def restore_forward(component: Any) -> None:
    """Undo ``replace_forward``: the component's class forward again."""
    if "forward" in vars(component):
        object.__delattr__(component, "forward")


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether any forward / backward hook is registered on ``module`` (torch keeps no public
    accessor for this)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


# --- leaf bridges called straight through while nothing watches them ---------------------------
_torch_module = torch.nn.modules.module  # holds torch's every-module hook tables


def _passes_through(bridge: GeneralizedComponent) -> bool:
    """Whether calling ``bridge`` would only run its wrapped module: the bridge, each hook point
    it holds (exactly TL's identity ``HookPoint``) and the wrapped module have no hook, are not
    compiled, have no forward set on the instance (accelerate's offload hook, a tracer's
    wrapper) and no accelerate hook; no every-module hook is registered and no jit trace is
    recording. These are the tests torch's ``_call_impl`` makes, read directly, at every call:
    a hook added at any time sends the call down TL's path."""
    m = _torch_module
    if (m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
            or m._global_backward_pre_hooks or torch._C._get_tracing_state()):
        return False
    for module in (bridge, *bridge._modules.values()):
        if module is None:
            return False
        d = module.__dict__  # has_hooks's four tables, inline: this runs ~50 times a forward
        if (d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"]
                or d["_backward_pre_hooks"] or module._compiled_call_impl is not None
                or "forward" in d or "_hf_hook" in d
                or (isinstance(module, HookPoint) and type(module) is not HookPoint)):
            return False
    return True


class DirectLinearBridge(LinearBridge):
    """TL's ``LinearBridge`` whose call is ``F.linear`` when nothing watches it. TL's call runs
    ~20 Python frames around the matmul (the offload check, torch's module call twice over,
    ``hook_in`` and ``hook_out`` as modules); a toy forward has ~34 of them. The result is the
    same tensor, and TL's projection-hook flags end as TL's forward leaves them; with a hook on
    the bridge, on either hook point, on the wrapped module or on every module, or a wrapped
    module that is not a plain ``nn.Linear``, TL's call runs."""

    def __call__(self, input: Tensor, *args: Any, **kwargs: Any) -> Any:
        linear = self._modules.get("_original_component")
        if args or kwargs or type(linear) is not torch.nn.Linear or not _passes_through(self):
            return super().__call__(input, *args, **kwargs)
        params = linear._parameters
        out = F.linear(input, params["weight"], params["bias"])
        # TL's projection-hook protocol (its MLPBridge): a pending hook_in suppression is
        # consumed by this call, and hook_out is recorded as fired
        if self._suppress_next_hook_in:
            object.__setattr__(self, "_suppress_next_hook_in", False)
        object.__setattr__(self, "_fired_hook_out", True)
        return out


def _native_norm(norm: Any) -> bool:
    """Whether TL's forward of ``norm`` returns its HF module's output (its native path)."""
    wrapped = norm._modules.get("_original_component")  # TL's original_component property
    return (wrapped is not None and not isinstance(wrapped, torch.nn.Identity)
            and bool(norm.use_native_layernorm_autograd
                     or getattr(norm.config, "layer_norm_folding", False)))


class _DirectNorm:
    """A ``NormalizationBridge`` on its native path that calls the HF norm once. TL's forward
    computes the norm a first time to feed ``hook_scale`` / ``hook_normalized`` and then again
    through the HF module, whose output it returns: without a hook there the first pass is
    waste, and with no hook anywhere on the bridge its hook points need no call either. The
    output is the HF module's, cast to the input's dtype as TL does; with any hook on the
    bridge TL's call runs (and with one on ``hook_scale`` / ``hook_normalized`` its forward)."""

    def __call__(self, hidden_states: Tensor, **kwargs: Any) -> Any:
        norm = self._modules.get("_original_component")
        if kwargs or not _native_norm(self) or not _passes_through(self):
            return super().__call__(hidden_states, **kwargs)
        out = norm(hidden_states)
        return out if out.dtype == hidden_states.dtype else out.to(hidden_states.dtype)

    def forward(self, hidden_states: Tensor, **kwargs: Any) -> Tensor:
        if (kwargs or has_hooks(self.hook_scale) or has_hooks(self.hook_normalized)
                or not _native_norm(self)):
            return super().forward(hidden_states, **kwargs)
        x = self.hook_in(hidden_states)
        out = self.original_component(x)
        return self.hook_out(out if out.dtype == x.dtype else out.to(x.dtype))


class DirectNormalizationBridge(_DirectNorm, NormalizationBridge):
    """TL's ``NormalizationBridge`` computing its norm once (``_DirectNorm``)."""


class DirectRMSNormalizationBridge(_DirectNorm, RMSNormalizationBridge):
    """TL's ``RMSNormalizationBridge`` computing its norm once (``_DirectNorm``)."""


_TAKES_POSITION_IDS: dict[Any, bool] = {}


def _takes_position_ids(module: torch.nn.Module) -> bool:
    forward = type(module).forward
    hit = _TAKES_POSITION_IDS.get(forward)
    if hit is None:
        hit = _TAKES_POSITION_IDS[forward] = (
            "position_ids" in inspect.signature(forward).parameters)
    return hit


class DirectEmbeddingBridge(EmbeddingBridge):
    """TL's ``EmbeddingBridge`` that, when nothing watches it, calls its HF embedding as TL's
    forward would without reading the embedding's signature (``inspect.signature`` at every
    call) or calling its unhooked hook points; output cast to the embedding's dtype as TL
    does."""

    def __call__(self, input_ids: Tensor, *args: Any, **kwargs: Any) -> Any:
        emb = self._modules.get("_original_component")
        if args or kwargs or emb is None or _takes_position_ids(emb) or not _passes_through(self):
            return super().__call__(input_ids, *args, **kwargs)
        own = emb._parameters  # parameters()'s first: the module's own, then its children's
        weight = next((w for w in own.values() if w is not None), None) if own else None
        if weight is None:
            weight = next(emb.parameters(), None)
        out = emb(input_ids)
        if isinstance(out, tuple):
            out = out[0]
        return out if weight is None or out.dtype == weight.dtype else out.to(weight.dtype)


_DIRECT: dict[type, type] = {
    LinearBridge: DirectLinearBridge, NormalizationBridge: DirectNormalizationBridge,
    RMSNormalizationBridge: DirectRMSNormalizationBridge, EmbeddingBridge: DirectEmbeddingBridge}


def direct_calls(bridge: Any) -> int:
    """Give every leaf component of ``bridge`` of exactly TL's linear, norm or embedding class
    its direct subclass above (the instance's class is switched, as torch's parametrize does;
    ``isinstance`` checks still hold and the model pickles). Norms not on TL's native path keep
    their class. Returns how many were switched."""
    n = 0
    for module in bridge.modules():
        direct = _DIRECT.get(type(module))
        if direct is None or (issubclass(direct, _DirectNorm) and (
                type(module).forward is not NormalizationBridge.forward
                or not _native_norm(module))):
            continue
        object.__setattr__(module, "__class__", direct)
        n += 1
    return n


_NOT_OFFLOADED = contextlib.nullcontext()


def _align_module_device(module: torch.nn.Module, execution_device: Any = None) -> Any:
    """accelerate's ``align_module_device``, but a shared no-op context for a module that
    carries no accelerate hook, where accelerate's generator context does nothing anyway."""
    if execution_device is None and getattr(module, "_hf_hook", None) is None:
        return _NOT_OFFLOADED
    return accelerate_align_module_device(module, execution_device)  # what TL imports


def skip_idle_offload_checks() -> None:
    """TransformerLens enters accelerate's ``align_module_device`` around every bridge
    component's call (~70 per toy forward, ~20 us each: a generator context, an import and
    three attribute checks) so that offloaded weights are materialised; this makes that call
    free for modules accelerate never hooked, and leaves offloaded ones on accelerate's path.
    The switch is process-wide (the name lives in TransformerLens's module); the result of every
    call is the same."""
    tl_component_base.align_module_device = _align_module_device


_ANY_KWARG: dict[Any, bool] = {}


def _accepts_any_kwarg(fn: Callable[..., Any]) -> bool:
    key = getattr(fn, "__func__", fn)
    hit = _ANY_KWARG.get(key)
    if hit is None:
        hit = _ANY_KWARG[key] = any(p.kind is inspect.Parameter.VAR_KEYWORD
                                    for p in inspect.signature(fn).parameters.values())
    return hit


def _block_kwargs(self: Any, kwargs: dict[str, Any], num_positional_args: int = 0) -> Any:
    if _accepts_any_kwarg(self.original_component.forward):
        return kwargs
    return BlockBridge._filter_kwargs_for_forward(self, kwargs, num_positional_args)


def cached_block_kwargs(bridge: Any) -> int:
    """Every ``BlockBridge`` of ``bridge`` reads its HF layer's forward signature once: TL
    filters a block call's kwargs by ``inspect.signature`` at every call (~0.09 ms per
    layer), and passes them all through when that forward takes ``**kwargs`` (every HF decoder
    layer does); other forwards keep TL's filter. Returns how many blocks were switched."""
    n = 0
    for module in bridge.modules():
        if isinstance(module, BlockBridge):
            object.__setattr__(module, "_filter_kwargs_for_forward",
                               types.MethodType(_block_kwargs, module))
            n += 1
    return n


@contextlib.contextmanager
def temporary_hooks(hooks: list[tuple[Any, Callable[..., Any]]]) -> Iterator[None]:
    """Within the block, each ``(hook point, fn)`` is a forward hook ``fn(act, hook=point)``;
    on exit exactly these are removed (other hooks on the same points stay), as
    TransformerLens's run_with_cache does, without its per-call alias tables."""
    added: list[tuple[Any, Any]] = []
    try:
        for point, fn in hooks:
            added.append((point, point.add_hook(fn, dir="fwd")))
        yield
    finally:
        for point, handle in added:
            handle.hook.remove()
            point.fwd_hooks[:] = [h for h in point.fwd_hooks if h is not handle]


def token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts)["input_ids"]``; for HF's plain Rust-backed tokenizers one text after
    the other on this thread: their batch call hands the texts to the Rust thread pool, whose
    wake-ups cost more CPU than a few short texts (``prepare``'s answer boundary: 0.2 against
    0.1 ms for 15 texts on toy-llava). The same ids: HF's call, too, turns the backend's padding
    and truncation off, sets its ``encode_special_tokens`` and encodes each text alone; a
    tokenizer class that changes that path (or a transformers without these internals) goes
    through its own call."""
    if not _encodes_on_backend(tokenizer):
        return tokenizer(texts)["input_ids"]
    backend = tokenizer.backend_tokenizer
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    backend.encode_special_tokens = bool(tokenizer.split_special_tokens)
    return [backend.encode(t, add_special_tokens=True).ids for t in texts]


def _encodes_on_backend(tokenizer: Any) -> bool:
    """Whether ``tokenizer(texts)`` is HF's plain path to the Rust backend's ``encode``."""
    plain = getattr(transformers, "TokenizersBackend", None)
    base = getattr(transformers, "PreTrainedTokenizerBase", None)
    cls = type(tokenizer)
    return (plain is not None and base is not None
            and getattr(tokenizer, "backend_tokenizer", None) is not None
            and hasattr(tokenizer, "split_special_tokens")
            and cls.__call__ is base.__call__
            and getattr(cls, "_encode_plus", None) is getattr(plain, "_encode_plus", False)
            and not hasattr(tokenizer, "_switch_to_input_mode"))


def has_attn_implementation(config: Any) -> bool:
    """Whether ``config`` is one HF dispatches attention on."""
    return hasattr(config, "_attn_implementation")


def set_attn_implementation(config: Any, name: str) -> None:
    """Switch the attention implementation HF dispatches on for the modules of ``config``
    (``PreTrainedConfig.set_attn_implementation`` would re-validate and walk sub-configs)."""
    config._attn_implementation = name


def processor_images_kwargs(processor: Any) -> dict[str, Any] | None:
    """The image-processor kwargs a processor call really passes (its own merge of class
    defaults, processor attributes and tokenizer init kwargs); None where this processor does
    not merge that way."""
    tok = getattr(processor, "tokenizer", None)
    try:
        merged = processor._merge_kwargs(tokenizer_init_kwargs=getattr(tok, "init_kwargs", None))
        return dict(merged["images_kwargs"])
    except (AttributeError, TypeError, KeyError):
        return None


def qwen2_5_vl_window_index(vision_config: Any, grid_thw: Tensor) -> Tensor:
    """Qwen2.5-VL's window order of the merge blocks of the images of ``grid_thw`` (HF's own
    ``get_vision_window_index``, as the tower's forward calls it): block ``window_index[i]`` (in
    the processor's order) is the i-th block the tower's layers and merger see."""
    index, _ = vision_utils.get_vision_window_index(
        grid_thw, spatial_merge_size=vision_config.spatial_merge_size,
        window_size=vision_config.window_size, patch_size=vision_config.patch_size)
    return torch.as_tensor(index, dtype=torch.long).cpu()


def qwen3_vl_deepstack(decoder: Any) -> Callable[..., Tensor] | None:
    """Qwen3-VL's DeepStack step (adds vision features at the vision positions after early
    decoder layers), or None for decoders without one."""
    return getattr(decoder, "_deepstack_process", None)


@contextlib.contextmanager
def replace_qwen3_vl_deepstack(decoder: Any, fn: Callable[..., Tensor]) -> Iterator[None]:
    """Within the block, ``decoder`` runs ``fn(hidden, masks, embeds)`` as its DeepStack step."""
    decoder._deepstack_process = fn
    try:
        yield
    finally:
        del decoder._deepstack_process


def accelerate_execution_device(module: torch.nn.Module) -> Any | None:
    """Where accelerate runs an offloaded module (its ``_hf_hook``); None if not offloaded."""
    return getattr(getattr(module, "_hf_hook", None), "execution_device", None)


def kv_cache(kwargs: dict[str, Any]) -> Any | None:
    """The HF ``Cache`` an attention call was handed, whichever name this transformers uses."""
    for name in KV_CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def update_kv_cache(hf_attn: Any, k: Tensor, v: Tensor,
                    kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """Append this call's rotated keys / values to the HF cache it was handed (if any) and
    return every key / value the call attends to. HF's own attention does the same
    (``cache.update(k, v, self.layer_idx)``)."""
    cache = kv_cache(kwargs)
    if cache is None:
        return k, v
    layer_idx = getattr(hf_attn, "layer_idx", None)
    if layer_idx is None:
        raise CorelensError(f"{type(hf_attn).__name__} has no layer_idx: corelens cannot place "
                            "its keys in the KV cache")
    return cache.update(k, v, layer_idx)


_GONE = object()


# --- the contract --------------------------------------------------------------------------
@dataclass(frozen=True)
class PrivateName:
    """One private name corelens uses: where it lives and the parameters it must accept."""

    owner: Any
    name: str
    params: tuple[str, ...] = ()  # parameter names that must exist (callables only)

    @property
    def where(self) -> str:
        owner = self.owner
        if isinstance(owner, types.ModuleType):
            return f"{owner.__name__}.{self.name}"
        if not isinstance(owner, type):
            owner = type(owner)
        return f"{owner.__module__}.{owner.__qualname__}.{self.name}"

    def problem(self) -> str | None:
        target = getattr(self.owner, self.name, _GONE)
        if target is _GONE:
            return f"{self.where} is gone"
        if not self.params:
            return None
        try:
            sig = inspect.signature(target)
        except (TypeError, ValueError):
            return f"{self.where} has no readable signature"
        missing = [p for p in self.params if p not in sig.parameters]
        if missing:
            return f"{self.where}{sig} lacks parameter(s) {', '.join(missing)}"
        return None


def _private_names() -> tuple[PrivateName, ...]:
    module = torch.nn.Module()  # torch's hook dicts are instance attributes
    mixin = position_embedding_hooks_mixin.PositionEmbeddingHooksMixin
    return (
        PrivateName(_bridge_builder, "build_bridge_from_module",
                    ("model", "architecture", "hf_config", "tokenizer", "model_name")),
        PrivateName(ArchitectureAdapterFactory, "_adapters"),
        PrivateName(TransformerBridge, "_initialize_hook_registry", ("self",)),
        PrivateName(TransformerBridge, "clear_hook_registry", ("self",)),
        PrivateName(TransformerBridge, "_gated_hook_reason",
                    ("self", "hook_point_name")),
        PrivateName(mixin, "_apply_position_embedding_hooks", ("self", "position_embeddings")),
        PrivateName(GeneralizedComponent, "original_component"),
        PrivateName(tl_component_base, "align_module_device", ("module", "execution_device")),
        PrivateName(BlockBridge, "_filter_kwargs_for_forward",
                    ("self", "kwargs", "num_positional_args")),
        PrivateName(NormalizationBridge, "_hf_autograd_forward_with_hooks", ("self", "x")),
        PrivateName(GeneralizedComponent, "__setattr__", ("self", "name", "value")),
        PrivateName(BaseTensorConversion, "handle_conversion"),
        PrivateName(BaseTensorConversion, "revert"),
        PrivateName(ProcessorMixin, "_merge_kwargs", ("tokenizer_init_kwargs",)),
        PrivateName(modeling_qwen3_vl.Qwen3VLTextModel, "_deepstack_process",
                    ("hidden_states", "visual_pos_masks", "visual_embeds")),
        PrivateName(Cache, "update", ("key_states", "value_states", "layer_idx")),
        PrivateName(vision_utils, "get_vision_window_index",
                    ("grid_thw", "spatial_merge_size", "window_size", "patch_size")),
        PrivateName(Cache, "get_seq_length"),
        PrivateName(module, "_forward_hooks"),
        PrivateName(module, "_forward_pre_hooks"),
        PrivateName(module, "_backward_hooks"),
        PrivateName(module, "_backward_pre_hooks"),
        PrivateName(torch.nn.Module, "_compiled_call_impl"),
        PrivateName(_torch_module, "_global_forward_hooks"),
        PrivateName(_torch_module, "_global_forward_pre_hooks"),
        PrivateName(_torch_module, "_global_backward_hooks"),
        PrivateName(_torch_module, "_global_backward_pre_hooks"),
        PrivateName(torch._C, "_get_tracing_state"),
        PrivateName(GeneralizedComponent, "_suppress_next_hook_in"),
        PrivateName(GeneralizedComponent, "_fired_hook_out"),
        PrivateName(HookPoint(), "fwd_hooks"),
    )


PRIVATE_NAMES: tuple[PrivateName, ...] = _private_names()


def problems() -> list[str]:
    """What of ``PRIVATE_NAMES`` is missing or changed in the installed libraries."""
    return [p for name in PRIVATE_NAMES if (p := name.problem()) is not None]


def require() -> None:
    """Raise a ``CorelensError`` naming every private name the installed libraries lack."""
    found = problems()
    if found:
        v = ", ".join(f"{k} {val}" for k, val in versions().items())
        raise CorelensError(
            "corelens depends on internals that the installed libraries changed (" + v + "):\n  "
            + "\n  ".join(found) + "\ninstall the tested versions: `pip install -r "
            "requirements.lock` (or the ranges in corelens's pyproject.toml)")

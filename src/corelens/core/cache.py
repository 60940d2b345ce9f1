"""``MLLMActivationCache``: TransformerLens's ``ActivationCache`` with residual decompositions that
are right at the vision positions of an MLLM.

TransformerLens takes ``hook_embed`` (the token-embedding lookup) as the decoder's input. In an
MLLM the decoder gets something else at the vision positions: HF scatters the projected image
features over the ``<image>`` placeholder rows after the lookup, so ``hook_embed`` holds the
placeholder's embedding there (the same row at every vision token) and the decomposition misses
the residual by the image features. Qwen3-VL also adds vision features after early decoder
layers (DeepStack), and TransformerLens's ``logit_attrs`` leaves out the final norm's weight
(folded into ``W_U`` only in compatibility mode). This cache fixes the three; the rest is
TransformerLens's.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.model_bridge.generalized_components import (
    LayerNormPreBridge,
    RMSNormPreBridge,
)
from transformer_lens.utilities import Slice, SliceInput

from corelens.errors import InputError
from corelens.hook_names import EMBED, FINAL_NORM_IN, act_name

EMBED_LABEL = "embed"  # the decoder's input embeddings (vision positions: the image features)
SIDE_LABEL = "{layer}_vision_in"  # vision features added after a layer (Qwen3-VL's DeepStack)
_POST_NORMS = {"attn": "ln1_post", "mlp": "ln2_post"}  # bridge names of sandwich norms


class MLLMActivationCache(ActivationCache):
    """The activations of one run of a ``HookedMLLM`` (``run_with_cache`` returns it).

    Everything of TransformerLens's ``ActivationCache`` works as there; what differs:

    * The input component of every decomposition (``decompose_resid``,
      ``get_full_resid_decomposition``), labelled ``"embed"``, is what the decoder really
      received: ``blocks.0.hook_resid_pre``, the merged input embeddings. At text positions it is
      the token embedding (times the family's embedding scale); at vision positions it is the
      projected image feature HF put there. ``cache["hook_embed"]`` stays the raw lookup (the
      ``<image>`` placeholder's row at vision positions) and is no component.
    * Vision features added to the residual stream after decoder layer ``l`` (Qwen3-VL's
      DeepStack; ``vision_side_inputs``) are components of their own, labelled
      ``"{l}_vision_in"``: ``blocks.{l+1}.hook_resid_pre - blocks.{l}.hook_resid_post``
      (``ln_final.hook_in`` after the last layer). One row per layer after which this run added
      something; zero at text positions.
    * The final residual stream (``layer=None`` / ``n_layers``) is ``ln_final.hook_in``.
    * Sandwich norms (Gemma 3: the attention and MLP outputs are normalised before the residual
      add): ``hook_attn_out`` / ``hook_mlp_out`` are the normalised outputs, the real residual
      contributions. A head's result (``stack_head_results``, ``compute_head_results``) and a
      neuron's (``get_neuron_results``) are then its share of the normalised output, the
      post-norm's scale held at its cached value (as ``logit_attrs`` holds the final norm's):
      ``(z_h W_O_h) / s * w`` (centred first for a LayerNorm), which add up to ``hook_attn_out``
      with the biases.
    * ``logit_attrs`` folds the final norm's weight into the token directions (what
      TransformerLens's compatibility mode does to ``W_U``), so the attributions of a full
      decomposition sum to the token's logit (less ``b_U`` and the final norm's bias projected on
      the token, both zero in the supported families).

    ``positions`` / ``position_mask``: set by ``run_with_cache(positions=...)`` (which positions
    the cache holds), else None.
    """

    def __init__(self, cache_dict: dict[str, Tensor], model: Any, has_batch_dim: bool = True,
                 *, vision_side_inputs: bool = False, positions: Tensor | None = None,
                 position_mask: Tensor | None = None) -> None:
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        self.has_embed = EMBED in cache_dict
        self.vision_side_inputs = vision_side_inputs
        self.positions = positions
        self.position_mask = position_mask
        self._derived_results: set[str] = set()

    @classmethod
    def from_cache(cls, cache: ActivationCache, **kw: Any) -> "MLLMActivationCache":
        """The same activations (not copied) as an ``MLLMActivationCache``."""
        return cls(cache.cache_dict, cache.model, has_batch_dim=cache.has_batch_dim, **kw)

    def apply_slice_to_batch_dim(self, batch_slice: Union[Slice, SliceInput]
                                 ) -> "MLLMActivationCache":
        if not isinstance(batch_slice, Slice):
            batch_slice = Slice(batch_slice)
        sliced = super().apply_slice_to_batch_dim(batch_slice)

        def cut(t: Tensor | None) -> Tensor | None:
            return None if t is None else batch_slice.apply(t, dim=0)

        return MLLMActivationCache(sliced.cache_dict, self.model, sliced.has_batch_dim,
                                   vision_side_inputs=self.vision_side_inputs,
                                   positions=cut(self.positions),
                                   position_mask=cut(self.position_mask))

    # --- residual streams ------------------------------------------------------------------
    @property
    def _n_layers(self) -> int:
        return int(self.model.cfg.n_layers)

    def _layer(self, layer: Optional[int]) -> int:
        return self._n_layers if layer is None or layer == -1 else int(layer)

    def _after(self, layer: int) -> Tensor:
        """The residual stream after ``layer`` and what is added between layers: the input of
        the next layer, or of the final norm."""
        if layer + 1 < self._n_layers:
            return self[act_name("resid_pre", layer + 1)]
        return self[FINAL_NORM_IN]

    def residual(self, layer: Optional[int] = None, mlp_input: bool = False) -> Tensor:
        """The residual stream a decomposition of ``layer`` adds up to: ``resid_pre`` (or
        ``resid_mid`` with ``mlp_input``) of ``layer``, ``ln_final.hook_in`` for
        ``None`` / ``-1`` / ``n_layers``."""
        layer = self._layer(layer)
        if layer == self._n_layers:
            if mlp_input:
                raise InputError("mlp_input needs a layer below n_layers (the final residual "
                                 "stream has no MLP)")
            return self[FINAL_NORM_IN]
        return self[act_name("resid_mid" if mlp_input else "resid_pre", layer)]

    def _side_inputs(self, layer: int) -> list[tuple[int, Tensor]]:
        """(l, features added after l) for l < layer where this run added any."""
        if not self.vision_side_inputs:
            return []
        out = []
        for l in range(min(layer, self._n_layers)):
            try:
                delta = self._after(l) - self[act_name("resid_post", l)]
            except KeyError as e:
                raise KeyError(
                    "this model adds vision features between decoder layers (DeepStack); their "
                    "components are read as blocks.{l+1}.hook_resid_pre (or ln_final.hook_in) "
                    f"minus blocks.{{l}}.hook_resid_post, which this cache lacks ({e}); run "
                    "run_with_cache without a names_filter that drops them") from e
            if bool(delta.ne(0).any()):
                out.append((l, delta))
        return out

    def accumulated_resid(
        self, layer: Optional[int] = None, incl_mid: bool = False, apply_ln: bool = False,
        pos_slice: Union[Slice, SliceInput] = None, mlp_input: bool = False,
        return_labels: bool = False,
    ) -> Union[Tensor, tuple[Tensor, list[str]]]:
        """TransformerLens's ``accumulated_resid``; the last entry (``"final_post"``) is the
        final norm's input ``ln_final.hook_in`` (after the vision features a model adds behind
        its last layer, if any), not the last block's ``hook_resid_post``."""
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        layer = self._layer(layer)
        labels: list[str] = []
        parts: list[Tensor] = []
        for l in range(layer + 1):
            if l == self._n_layers:
                parts.append(self[FINAL_NORM_IN])
                labels.append("final_post")
                continue
            parts.append(self[act_name("resid_pre", l)])
            labels.append(f"{l}_pre")
            if (incl_mid and l < layer) or (mlp_input and l == layer):
                parts.append(self[act_name("resid_mid", l)])
                labels.append(f"{l}_mid")
        components = torch.stack([pos_slice.apply(c, dim=-2) for c in parts], dim=0)
        if apply_ln:
            components = self.apply_ln_to_stack(
                components, layer, pos_slice=pos_slice, mlp_input=mlp_input,
                has_batch_dim=self.has_batch_dim, recompute_ln=layer == self._n_layers)
        return (components, labels) if return_labels else components

    def decompose_resid(
        self, layer: Optional[int] = None, mlp_input: bool = False,
        mode: Literal["all", "mlp", "attn"] = "all", apply_ln: bool = False,
        pos_slice: Union[Slice, SliceInput] = None, incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Union[Tensor, tuple[Tensor, list[str]]]:
        """The residual stream into ``layer`` (``None``: the final norm's input) as a stack of
        what put it there, in order: ``"embed"`` (the decoder's input embeddings, the image
        features at vision positions), then per layer ``"{l}_attn_out"``, ``"{l}_mlp_out"`` and
        ``"{l}_vision_in"`` (vision features added after layer l, where the model has them).
        With ``incl_embeds=False`` the inputs (embed and vision_in) are left out; ``mode``
        keeps only the attention or MLP outputs. All of it sums to ``residual(layer)``.
        Arguments and return as TransformerLens's."""
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        layer = self._layer(layer)
        incl_attn = mode != "mlp"
        incl_mlp = mode != "attn" and not self.model.cfg.attn_only
        side = dict(self._side_inputs(layer)) if incl_embeds else {}
        parts: list[Tensor] = []
        labels: list[str] = []
        if incl_embeds:
            parts.append(self[EMBED])
            labels.append(EMBED_LABEL)
        for l in range(layer):
            if incl_attn:
                parts.append(self[act_name("attn_out", l)])
                labels.append(f"{l}_attn_out")
            if incl_mlp:
                parts.append(self[act_name("mlp_out", l)])
                labels.append(f"{l}_mlp_out")
            if l in side:
                parts.append(side[l])
                labels.append(SIDE_LABEL.format(layer=l))
        if mlp_input and incl_attn:
            parts.append(self[act_name("attn_out", layer)])
            labels.append(f"{layer}_attn_out")
        components = torch.stack([pos_slice.apply(c, dim=-2) for c in parts], dim=0)
        if apply_ln:
            components = self.apply_ln_to_stack(components, layer, pos_slice=pos_slice,
                                                mlp_input=mlp_input)
        return (components, labels) if return_labels else components

    # --- heads and neurons through sandwich norms ------------------------------------------------
    def _post_norm(self, layer: int, sub: str) -> Any | None:
        """The norm applied to ``sub``'s ("attn" / "mlp") output of ``layer`` before the
        residual add (sandwich norms), or None."""
        return dict(self.model.blocks[layer].named_children()).get(_POST_NORMS[sub])

    def _has_post_norms(self) -> bool:
        return any(self._post_norm(l, s) is not None
                   for l in range(self._n_layers) for s in _POST_NORMS)

    def _post_norm_scale(self, layer: int, sub: str) -> Tensor:
        key = f"blocks.{layer}.{_POST_NORMS[sub]}.hook_scale"
        try:
            return self[key]
        except KeyError as e:
            raise KeyError(
                f"layer {layer} normalises its {sub} output before the residual add; per-head "
                f"and per-neuron contributions need that norm's cached scale {key!r}, which this "
                "cache lacks") from e

    @staticmethod
    def _norm_weight(norm: Any, like: Tensor) -> Tensor | None:
        """The norm's elementwise weight as its forward applies it (``1 + w`` for Gemma's), or
        None for a norm without one."""
        if isinstance(norm, (LayerNormPreBridge, RMSNormPreBridge)):  # weight-free norms
            return None
        w = getattr(norm, "weight", None)
        if not isinstance(w, Tensor):
            return None
        w = w.to(device=like.device, dtype=torch.float32)
        if getattr(norm, "uses_weight_offset", False):
            w = 1.0 + w
        return w.to(like.dtype)

    @staticmethod
    def _norm_bias(norm: Any) -> Tensor | None:
        if getattr(norm, "uses_rms_norm", True) or isinstance(norm, LayerNormPreBridge):
            return None
        b = getattr(getattr(norm, "original_component", None), "bias", None)
        return b if isinstance(b, Tensor) else None

    def _through_post_norm(self, x: Tensor, layer: int, sub: str, scale: Tensor) -> Tensor:
        """Linear part of ``sub``'s post-norm of ``layer`` at its cached ``scale`` (which
        broadcasts against ``x``)."""
        norm = self._post_norm(layer, sub)
        if not getattr(norm, "uses_rms_norm", True):
            x = x - x.mean(-1, keepdim=True)
        x = x / scale.to(x.dtype)
        w = self._norm_weight(norm, x)
        return x if w is None else x * w

    def _fill_head_results(self) -> None:
        """Store each head's residual contribution where a sandwich norm sits between the
        heads and the residual stream (TransformerLens computes ``z W_O`` for the others)."""
        for l in range(self._n_layers):
            key = act_name("result", l)
            if self._post_norm(l, "attn") is None or key in self._derived_results:
                continue
            z = self[act_name("z", l)]
            attn = self.model.blocks[l].attn
            w_o = attn.W_O.to(device=z.device)
            dtype = torch.promote_types(z.dtype, w_o.dtype)
            result = torch.einsum("...hd,hdm->...hm", z.to(dtype), w_o.to(dtype))
            result = result * getattr(self.model.blocks[l], "residual_contribution_scale", 1.0)
            scale = self._post_norm_scale(l, "attn").unsqueeze(-2)  # [..., pos, 1, 1]
            self.cache_dict[key] = self._through_post_norm(result, l, "attn", scale)
            self._derived_results.add(key)

    def compute_head_results(self) -> None:
        """TransformerLens's ``compute_head_results``; behind a sandwich norm a head's result
        is its share of the normalised attention output (cached post-norm scale)."""
        self._fill_head_results()
        if not all(self._post_norm(l, "attn") is not None for l in range(self._n_layers)):
            super().compute_head_results()  # TransformerLens's z W_O for the other layers

    def stack_head_results(self, layer: int = -1, return_labels: bool = False,
                           incl_remainder: bool = False,
                           pos_slice: Union[Slice, SliceInput] = None,
                           apply_ln: bool = False) -> Any:
        """TransformerLens's ``stack_head_results`` (residual contributions of the heads; see
        the class docstring for models with sandwich norms)."""
        self._fill_head_results()
        return super().stack_head_results(layer, return_labels=return_labels,
                                          incl_remainder=incl_remainder, pos_slice=pos_slice,
                                          apply_ln=apply_ln)

    def get_neuron_results(self, layer: int, neuron_slice: Union[Slice, SliceInput] = None,
                           pos_slice: Union[Slice, SliceInput] = None,
                           project_output_onto: Optional[Tensor] = None) -> Tensor:
        """TransformerLens's ``get_neuron_results``; behind a sandwich norm a neuron's result
        is its share of the normalised MLP output (cached post-norm scale)."""
        if self._post_norm(layer, "mlp") is None:
            return super().get_neuron_results(layer, neuron_slice=neuron_slice,
                                              pos_slice=pos_slice,
                                              project_output_onto=project_output_onto)
        if not isinstance(neuron_slice, Slice):
            neuron_slice = Slice(neuron_slice)
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        block = self.model.blocks[layer]
        norm = self._post_norm(layer, "mlp")
        acts = pos_slice.apply(self[("post", layer, "mlp")], dim=-2)
        scale = pos_slice.apply(self._post_norm_scale(layer, "mlp"), dim=-2)
        acts = neuron_slice.apply(acts, dim=-1) / scale.to(acts.dtype)
        w_out = neuron_slice.apply(block.mlp.W_out.to(acts.device), dim=0)
        w_out = w_out * getattr(block, "residual_contribution_scale", 1.0)
        if not getattr(norm, "uses_rms_norm", True):
            w_out = w_out - w_out.mean(-1, keepdim=True)
        w = self._norm_weight(norm, w_out)
        if w is not None:
            w_out = w_out * w
        if project_output_onto is None:
            return acts[..., None] * w_out
        projected = w_out @ project_output_onto.to(w_out)
        return acts * projected if project_output_onto.ndim == 1 else acts[..., None] * projected

    def stack_neuron_results(self, layer: int, pos_slice: Union[Slice, SliceInput] = None,
                             neuron_slice: Union[Slice, SliceInput] = None,
                             return_labels: bool = False, incl_remainder: bool = False,
                             apply_ln: bool = False, project_output_onto: Optional[Tensor] = None,
                             mlp_input: bool = False) -> Any:
        """TransformerLens's ``stack_neuron_results`` (neuron results as in
        ``get_neuron_results``). Behind sandwich norms ``apply_ln`` with a projection is done
        on the full ``[..., d_mlp, d_model]`` stack (TransformerLens's memory-saving path reads
        ``W_out`` without the post-norm)."""
        if not (apply_ln and project_output_onto is not None and self._has_post_norms()):
            return super().stack_neuron_results(
                layer, pos_slice=pos_slice, neuron_slice=neuron_slice,
                return_labels=return_labels, incl_remainder=incl_remainder, apply_ln=apply_ln,
                project_output_onto=project_output_onto, mlp_input=mlp_input)
        stack, labels = super().stack_neuron_results(
            layer, pos_slice=pos_slice, neuron_slice=neuron_slice, return_labels=True,
            incl_remainder=incl_remainder, apply_ln=True, mlp_input=mlp_input)
        stack = stack @ project_output_onto.to(stack)
        return (stack, labels) if return_labels else stack

    def _bias(self, layer: int, mlp_input: bool, include_mlp_biases: bool, like: Tensor,
              pos_slice: Slice) -> Tensor:
        """The biases added to the residual stream into ``layer``, shaped like ``like``."""
        if not self._has_post_norms():
            bias = self.model.accumulated_bias(layer, mlp_input,
                                               include_mlp_biases=include_mlp_biases)
            return bias.to(like).expand(like.shape)
        total = torch.zeros_like(like)
        for l in range(layer + (1 if mlp_input else 0)):
            block = self.model.blocks[l]
            contrib = getattr(block, "residual_contribution_scale", 1.0)
            subs = ["attn"] + (["mlp"] if include_mlp_biases and l < layer else [])
            for sub in subs:
                module = getattr(block, sub)
                b = getattr(module, "b_O" if sub == "attn" else "b_out", None)
                norm = self._post_norm(l, sub)
                if norm is None:
                    if isinstance(b, Tensor):
                        total = total + b.to(like) * contrib
                    continue
                scale = pos_slice.apply(self._post_norm_scale(l, sub), dim=-2)
                if isinstance(b, Tensor):
                    total = total + self._through_post_norm(b.to(like) * contrib, l, sub, scale)
                post_bias = self._norm_bias(norm)
                if post_bias is not None:
                    total = total + post_bias.to(like)
        return total

    def get_full_resid_decomposition(
        self, layer: Optional[int] = None, mlp_input: bool = False, expand_neurons: bool = True,
        apply_ln: bool = False, pos_slice: Union[Slice, SliceInput] = None,
        return_labels: bool = False, project_output_onto: Optional[Tensor] = None,
    ) -> Union[Tensor, tuple[Tensor, list[str]]]:
        """The residual stream into ``layer`` (``None``: the final norm's input) by head,
        neuron (or MLP layer, ``expand_neurons=False``), input and bias, in TransformerLens's
        order: ``"L{l}H{h}"``, ``"L{l}N{n}"`` (or ``"{l}_mlp_out"``), ``"embed"`` (the
        decoder's input embeddings, the image features at vision positions), ``"{l}_vision_in"``
        (vision features added after layer l, where the model has them), ``"bias"``. It sums to
        ``residual(layer, mlp_input)``. Arguments and return as TransformerLens's."""
        layer = self._layer(layer)
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        project = project_output_onto
        squeeze = project is not None and project.ndim == 1
        if squeeze:
            project = project.unsqueeze(-1)
        ln_folded = apply_ln and project is not None

        def finish(stack: Tensor) -> Tensor:
            if ln_folded:
                stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice,
                                               mlp_input=mlp_input)
            return stack @ project.to(stack) if project is not None else stack

        heads, labels = self.stack_head_results(layer + (1 if mlp_input else 0),
                                                pos_slice=pos_slice, return_labels=True)
        components = [finish(heads)]
        if not self.model.cfg.attn_only and layer > 0:
            if expand_neurons:
                neurons, neuron_labels = self.stack_neuron_results(
                    layer, pos_slice=pos_slice, return_labels=True, apply_ln=ln_folded,
                    project_output_onto=project, mlp_input=mlp_input)
                components.append(neurons)
            else:
                mlps, neuron_labels = self.decompose_resid(
                    layer, mlp_input=mlp_input, pos_slice=pos_slice, incl_embeds=False,
                    mode="mlp", return_labels=True)
                components.append(finish(mlps))
            labels.extend(neuron_labels)
        embed = pos_slice.apply(self[EMBED], dim=-2)
        components.append(finish(embed[None]))
        labels.append(EMBED_LABEL)
        for l, delta in self._side_inputs(layer):
            components.append(finish(pos_slice.apply(delta, dim=-2)[None]))
            labels.append(SIDE_LABEL.format(layer=l))
        bias = self._bias(layer, mlp_input, expand_neurons, embed, pos_slice)
        components.append(finish(bias[None]))
        labels.append("bias")
        stack = torch.cat(components, dim=0)
        if apply_ln and not ln_folded:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice,
                                           mlp_input=mlp_input)
        if squeeze:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack

    # --- logits ------------------------------------------------------------------------------
    def _final_norm_weight(self, like: Tensor) -> Tensor | None:
        """The final norm's weight as its forward applies it; refuses a final norm or a
        logit map this cache cannot split linearly."""
        cap = getattr(self.model.cfg, "output_logits_soft_cap", -1.0)
        if cap is not None and cap > 0:
            raise InputError(f"this model soft-caps its logits (tanh at {cap}): they are not a "
                             "sum over residual components; logit_attrs would not add up")
        norm = self.model.ln_final
        w = self._norm_weight(norm, like)
        if "ln_final.hook_out" in self.cache_dict and "ln_final.hook_normalized" in self.cache_dict:
            out = self["ln_final.hook_out"].detach().float()
            expect = self["ln_final.hook_normalized"].detach().float()
            if w is not None:
                expect = expect * w.detach().to(device=expect.device, dtype=torch.float32)
            bias = self._norm_bias(norm)
            if bias is not None:
                expect = expect + bias.detach().to(device=expect.device, dtype=torch.float32)
            err = (out - expect).abs().max()
            bound = 16 * torch.finfo(self["ln_final.hook_out"].dtype).eps * (
                1.0 + expect.abs().max())
            if err > bound:
                raise InputError(
                    f"the final norm's output is not its normalised input times its weight "
                    f"(off by {float(err):.3g}): the weights may have been processed after the "
                    "run, or the norm is one this cache does not know; logit_attrs would not "
                    "add up")
        return w

    def logit_attrs(
        self, residual_stack: Tensor, tokens: Any, incorrect_tokens: Any = None,
        pos_slice: Union[Slice, SliceInput] = None, batch_slice: Union[Slice, SliceInput] = None,
        has_batch_dim: bool = True,
    ) -> Tensor:
        """TransformerLens's ``logit_attrs`` with the final norm applied as the model does:
        each component is centred (LayerNorm), divided by the cached scale at its position
        (``ln_final.hook_scale``) and multiplied by the norm's weight (folded into the token
        directions, as compatibility mode folds it into ``W_U``). The attributions of a full
        decomposition (``get_full_resid_decomposition()`` / ``decompose_resid()``) sum to the
        token's logit less ``b_U[token]`` (and the final norm's bias dotted with the token's
        direction, for a LayerNorm with one). Arguments and return as TransformerLens's."""
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        if not isinstance(batch_slice, Slice):
            batch_slice = Slice(batch_slice)
        directions = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            if _token_shape(tokens) != _token_shape(incorrect_tokens):
                raise ValueError("tokens and incorrect_tokens must have the same shape")
            directions = directions - self.model.tokens_to_residual_directions(incorrect_tokens)
        w = self._final_norm_weight(directions)
        if w is not None:
            directions = directions * w.to(directions.device)
        scaled = self.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=pos_slice,
                                        batch_slice=batch_slice, has_batch_dim=has_batch_dim)
        if (has_batch_dim and batch_slice.mode != "int" and scaled.ndim == 4
                and directions.ndim == 2 and directions.shape[0] == scaled.shape[1]):
            directions = directions.unsqueeze(-2)  # one direction per example, over positions
        return (scaled * directions.to(scaled)).sum(dim=-1)


def _token_shape(tokens: Any) -> torch.Size:
    if isinstance(tokens, (str, int)):
        return torch.Size([])
    return torch.as_tensor(tokens).shape

"""FastV, KV-byte counting and the ``corelens accelerate`` command (re-exported by
``corelens.accel``, whose docstring defines the variants)."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from corelens.accel.hybrid import (
    HybridAttention,
    HybridCache,
    _alive_index,
    _check_family,
    _gather_heads,
    _layout_masks,
    _neg,
    _next_positions,
    _sliding_windows,
    _step_positions,
    _text_config,
)
from corelens.attention import KernelCall
from corelens.batch import MultimodalBatch
from corelens.errors import InputError
from corelens.heads import head_name, kv_head_name


# --- FastV ------------------------------------------------------------------------------------
class FastV:
    """FastV: after layer ``k`` (layers ``0..k-1`` see every token) drop ``ratio`` of each
    example's vision tokens — those receiving the least attention from its last prompt position
    in layer ``k - 1``, averaged over heads; layers ``k..`` never compute them (their hidden
    states, their keys and values, their KV cache entries). Every example of a batch must have
    the same number of vision tokens."""

    def __init__(self, model: Any, k: int = 2, ratio: float = 0.5) -> None:
        _check_family(model, "supports_fastv", "FastV")
        n = _text_config(model).num_hidden_layers
        if not 1 <= k < n or not 0.0 <= ratio < 1.0:
            raise InputError(f"FastV wants 1 <= k < {n} and 0 <= ratio < 1")
        self.model, self.k, self.ratio = model, k, ratio
        self.keep: Tensor | None = None  # [b, kept] positions kept after layer k (last prefill)
        self.dropped: Tensor | None = None

    def _decoder(self) -> Any:
        dec = self.model.hf_model.get_decoder()
        if not hasattr(dec, "layers"):
            raise InputError("FastV: cannot find the decoder's layers")
        return dec

    @contextlib.contextmanager
    def attach(self, batch: MultimodalBatch | None = None) -> Iterator["FastV"]:
        """Prune within the block (for ``batch``, or each ``MultimodalBatch`` the model is
        called on). Logits at dropped positions read as zero hidden state."""
        state: dict[str, Any] = {}
        dev = self.model.device

        def plan(b: MultimodalBatch) -> None:
            vision, valid = _layout_masks(b, dev)
            counts = vision.sum(-1)
            if not bool((counts == counts[0]).all()):
                raise InputError("FastV: every example of a batch needs the same number of "
                                 "vision tokens")
            state.update(vision=vision, last=b.last_prompt_positions.to(dev),
                         n_drop=int(int(counts[0]) * self.ratio), t=vision.shape[1])
            state.pop("keep", None)

        if batch is not None:
            plan(batch)
        dec = self._decoder()
        handles = []
        if batch is None:
            handles.append(self.model.register_forward_pre_hook(
                lambda m, a: plan(a[0]) if a and isinstance(a[0], MultimodalBatch) else None))

        def tap(inputs: Any) -> None:
            if "t" not in state or inputs.q.shape[2] != state["t"]:
                return
            rows = state["last"][:, None]
            att = inputs.pattern_rows(rows)[:, :, 0].float().mean(1)  # [b, t]
            att = att.masked_fill(~state["vision"], math.inf)
            drop = att.topk(state["n_drop"], dim=-1, largest=False).indices
            keep = torch.ones_like(state["vision"])
            keep.scatter_(1, drop, False)
            t = keep.shape[1]
            state["keep"] = torch.arange(t, device=dev)[None].expand(len(keep), t)[keep].view(
                len(keep), -1)
            self.keep, self.dropped = state["keep"], drop.sort(-1).values

        def prune(module: Any, args: Any, kwargs: Any) -> Any:
            keep = state.get("keep")
            if keep is None:
                return None
            t = state["t"]
            args = list(args)
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] == t:
                hidden = torch.gather(hidden, 1, keep[..., None].expand(-1, -1, hidden.shape[-1]))
                if args:
                    args[0] = hidden
                else:
                    kwargs["hidden_states"] = hidden
            pe = kwargs.get("position_embeddings")
            if pe is not None and pe[0].shape[-2] == t:
                kwargs["position_embeddings"] = tuple(
                    torch.gather(x.expand(len(keep), -1, -1), 1,
                                 keep[..., None].expand(-1, -1, x.shape[-1])) for x in pe)
            pid = kwargs.get("position_ids")
            if isinstance(pid, Tensor) and pid.ndim == 2 and pid.shape[-1] == t:
                kwargs["position_ids"] = torch.gather(pid.expand(len(keep), -1), 1, keep)
            m = kwargs.get("attention_mask")
            if isinstance(m, Tensor) and m.ndim == 4 and m.shape[-1] == t:
                m = m.expand(len(keep), -1, -1, -1)
                m = torch.gather(m, 2, keep[:, None, :, None].expand(-1, m.shape[1], -1, t))
                kwargs["attention_mask"] = torch.gather(
                    m, 3, keep[:, None, None, :].expand(-1, m.shape[1], m.shape[2], -1))
            return tuple(args), kwargs

        def unprune(module: Any, args: Any, out: Any) -> Any:
            keep = state.get("keep")
            hs = getattr(out, "last_hidden_state", None)
            if keep is None or hs is None or hs.shape[1] != keep.shape[1]:
                return None
            full = hs.new_zeros(hs.shape[0], state["t"], hs.shape[-1])
            full.scatter_(1, keep[..., None].expand(-1, -1, hs.shape[-1]), hs)
            out.last_hidden_state = full
            state.pop("keep")  # decoding steps that follow are not pruned
            return out

        for layer in dec.layers[self.k:]:
            handles.append(layer.register_forward_pre_hook(prune, with_kwargs=True))
        handles.append(dec.register_forward_hook(unprune))
        side_inputs = self.model.family.prune_side_inputs(dec, lambda: state.get("keep"),
                                                           lambda: state["t"])
        try:
            with side_inputs, self.model.attention.tap(self.k - 1, tap):
                yield self
        finally:
            for hnd in handles:
                hnd.remove()

    @torch.no_grad()
    def generate(self, batch: MultimodalBatch, max_new_tokens: int = 20,
                 return_logits: bool = False) -> Any:
        """Greedy decoding on a ``FastVCache``: layers >= k cache only the kept tokens. New
        token ids [b, n] (and the logits of every step, [b, n, vocab], if ``return_logits``).
        A decoding step at sequence index ``i`` sees every cached key but the prompt's padding,
        and on a sliding-window layer (Gemma 3) only keys whose ORIGINAL index ``j > i -
        sliding_window``; those that leave the window are freed."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        ids, kw = self.model._inputs(batch)
        nxt, mrope = _next_positions(kw)
        valid = kw["attention_mask"].bool()
        cache = FastVCache(_sliding_windows(self.model))

        def record(call: KernelCall) -> None:  # the prompt's keys / values, after pruning
            cache.k[call.layer], cache.v[call.layer] = call.k, call.v
            return None

        with self.attach(batch), self.model.attention.kernel(record):
            out = self.model.hf_model(input_ids=ids, **kw, use_cache=False, logits_to_keep=1)
        logits, t = out.logits[:, -1], valid.shape[1]
        full = torch.arange(t, device=valid.device)[None].expand(len(valid), t)
        for layer in range(len(cache.k)):
            if cache.k[layer] is None:
                raise InputError(f"FastV decoding: layer {layer} did not reach corelens's "
                                 "attention backend (an eager / hooked layer?)")
            pos = full if layer < self.k else self.keep
            cache.pos[layer], cache.ok[layer] = pos, valid.gather(1, pos)
        cache.length = t
        cache.trim()
        toks, steps = [], []
        with self.model.attention.kernel(cache.attend):
            for s in range(max_new_tokens):
                steps.append(logits)
                tok = logits.argmax(-1)
                toks.append(tok)
                if s + 1 < max_new_tokens:
                    out = self.model.hf_model(input_ids=tok[:, None],
                                              position_ids=_step_positions(nxt + s, mrope),
                                              use_cache=False)
                    logits = out.logits[:, -1]
                    cache.length += 1
                    cache.trim()
        self.last_cache = cache
        out_toks = torch.stack(toks, 1)
        return (out_toks, torch.stack(steps, 1)) if return_logits else out_toks


class FastVCache:
    """FastV's KV cache: per layer the keys / values of the tokens it computed (layers >= k:
    the kept ones) and of the generated tokens, each with its original sequence index
    (``pos``) and validity (``ok``: not padding). Sliding-window layers keep only the keys
    that the next query (index ``length``) can still see, ``pos > length - sliding_window``:
    the window is applied by original position, not by slot."""

    def __init__(self, sliding: list[int | None]) -> None:
        n = len(sliding)
        self.sliding = sliding
        self.k: list[Tensor | None] = [None] * n
        self.v: list[Tensor | None] = [None] * n
        self.pos: list[Tensor] = [torch.empty(0)] * n  # [b, n_l] sequence index
        self.ok: list[Tensor] = [torch.empty(0)] * n  # [b, n_l] key valid
        self.length = 0  # the next token's sequence index

    def nbytes(self, layers: Any = None) -> int:
        """Bytes of the keys / values held (of ``layers``, default all)."""
        layers = range(len(self.k)) if layers is None else layers
        return sum(t.numel() * t.element_size() for l in layers for t in (self.k[l], self.v[l]))

    def trim(self) -> None:
        """Free the entries of sliding-window layers that the next query no longer sees."""
        for l, sw in enumerate(self.sliding):
            if sw is None:
                continue
            idx = _alive_index(self.pos[l] > self.length - sw)
            if idx.shape[1] < self.pos[l].shape[1]:
                self.k[l], self.v[l] = (_gather_heads(x, idx) for x in (self.k[l], self.v[l]))
                self.pos[l], self.ok[l] = self.pos[l].gather(1, idx), self.ok[l].gather(1, idx)

    def attend(self, call: KernelCall) -> Tensor:
        """The decoding kernel: append the step's key / value, attend over the layer's cache."""
        l, q = call.layer, call.q
        if q.shape[2] != 1:
            raise InputError("FastV cached decoding runs one token per step")
        b = q.shape[0]
        i = self.length
        self.k[l] = torch.cat([self.k[l], call.k], 2)
        self.v[l] = torch.cat([self.v[l], call.v], 2)
        self.pos[l] = torch.cat([self.pos[l], torch.full((b, 1), i, device=q.device)], 1)
        self.ok[l] = torch.cat([self.ok[l], torch.ones(b, 1, dtype=torch.bool,
                                                        device=q.device)], 1)
        seen = self.ok[l]
        if self.sliding[l] is not None:
            seen = seen & (self.pos[l] > i - self.sliding[l])
        mask = torch.where(seen, 0.0, _neg(q.dtype)).to(q.dtype)[:, None, None, :]
        return F.scaled_dot_product_attention(q, self.k[l], self.v[l], attn_mask=mask,
                                              scale=call.scaling,
                                              enable_gqa=q.shape[1] != call.k.shape[1])


def cache_nbytes(cache: Any) -> int:
    """Bytes held by an HF cache (``DynamicCache``), a ``HybridCache`` or a ``FastVCache``."""
    if isinstance(cache, (HybridCache, FastVCache)):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


# --- the `corelens accelerate` command ---------------------------------------------------------
def _zoo_spec(data: str) -> tuple[int, int] | None:
    """``zoo:N[:SEED]`` -> (N, SEED); None for anything else (a JSONL path)."""
    if not data.startswith("zoo:"):
        return None
    parts = data.split(":")
    return int(parts[1]), int(parts[2]) if len(parts) > 2 else 0


def _data(model_name: str, data: str) -> tuple[list[Any], str]:
    """``zoo:N[:SEED]`` (fresh examples of a shipped model's task) or a corelens JSONL."""
    from corelens import zoo
    from corelens.loaders import load_jsonl

    spec = _zoo_spec(data)
    if spec is None:
        return load_jsonl(data), data
    if model_name not in zoo.names():
        raise InputError("zoo:N data needs --model to be a shipped toy model "
                         f"({', '.join(zoo.names())})")
    n, seed = spec
    return zoo.examples(model_name, n, seed=seed), f"zoo.examples({model_name!r}, {n}, seed={seed})"


def _load(args: Any) -> tuple[Any, Any, list[Any], dict[str, Any]]:
    """The model, its head scores, the evaluation examples and where each set came from.

    Heads are never scored on the examples the claims are measured on: with ``zoo:N:SEED``
    data they are scored on ``zoo:max(N // 2, 32):SEED+1`` (disjoint, and held out from the
    training streams like every ``zoo.examples`` set), with ``--score-data`` on that set, and
    with a JSONL alone on a seeded half of it (``split_examples``), the other half evaluated."""
    from corelens import zoo
    from corelens.examples import check_disjoint, split_examples
    from corelens.head_scores import HeadScores
    from corelens.model import HookedMLLM
    from corelens.ram import MEAN_METRICS, RATIO_METRICS, score_heads

    name = str(args.model)
    model = zoo.load(name) if name in zoo.names() else HookedMLLM.from_pretrained(name)
    examples, source = _data(name, str(args.data))
    score_examples: list[Any] | None = None
    score_source = ""
    if getattr(args, "score_data", None):
        score_examples, score_source = _data(name, str(args.score_data))
    elif (spec := _zoo_spec(str(args.data))) is not None:
        score_examples, score_source = _data(name, f"zoo:{max(spec[0] // 2, 32)}:{spec[1] + 1}")
    to_score = str(args.scores) in MEAN_METRICS + RATIO_METRICS
    if to_score and score_examples is None:
        score_examples, examples = split_examples(examples)
        score_source = f"split_examples({source}, seed 0): scoring half"
        source = f"split_examples({source}, seed 0): evaluation half"
    limit = getattr(args, "limit", None)
    if limit:
        examples = examples[:limit]
    sets: dict[str, Any] = {"evaluation": {"n": len(examples), "source": source,
                                           "ids": [e.id for e in examples]}}
    if to_score:
        assert score_examples is not None
        check_disjoint(score_examples, examples)
        scores = score_heads(model, score_examples, str(args.scores), progress=False)
        sets["scoring"] = {"n": len(score_examples), "source": score_source,
                           "ids": [e.id for e in score_examples]}
    else:
        scores = HeadScores.load(args.scores)
        sets["scoring"] = {"source": f"HeadScores file {args.scores}"}
    return model, scores, examples, sets


def main_accelerate(args: Any) -> dict[str, Any]:
    """``corelens accelerate --model M --scores S --data D [--score-data D2] [--frac 0.1]
    [--n-sink 4] [--window 64] [--n-pooled 0] [--fastv-k 2] [--fastv-ratio 0.5] [--limit N]
    [--seed 0] [--batch-size 16] [--out report.json]``: teacher-forced accuracy
    (``corelens.evaluate``) and wall time of full attention, the CoRe hybrid, random KV heads at
    the same KV budget (hybrid), and FastV, on the same evaluation examples.

    ``args`` is a namespace: ``model`` (folder / hub id, or a shipped toy model name),
    ``scores`` (a HeadScores JSON, or a metric name of ``corelens.ram`` such as ``"ram"`` or
    ``"selectivity"`` to score heads first, never on the evaluation examples: see ``_load``),
    ``data`` (a corelens JSONL, or ``zoo:N[:SEED]``: N fresh examples of the shipped model's
    task), and optional ``score_data`` (JSONL or ``zoo:N:SEED``), ``frac``, ``n_sink``, ``window``,
    ``n_pooled``, ``fastv_k``, ``fastv_ratio``, ``limit``, ``seed``, ``batch_size``, ``out``
    (missing or None = the defaults above). Returns (and prints as JSON) the report."""
    import time

    from corelens.evaluate import evaluate

    def get(name: str, default: Any) -> Any:
        value = getattr(args, name, None)
        return default if value is None else value

    model, scores, examples, sets = _load(args)
    frac = get("frac", 0.1)
    kw = dict(n_sink=get("n_sink", 4), window=get("window", 64), n_pooled=get("n_pooled", 0))
    core = HybridAttention(model, scores.top(frac=frac), **kw)
    rand = HybridAttention.random(model, len(core.full_kv_heads), seed=get("seed", 0), **kw)
    fastv = FastV(model, k=get("fastv_k", 2), ratio=get("fastv_ratio", 0.5))
    variants: dict[str, Any] = {"full": contextlib.nullcontext, "core_hybrid": core.attach,
                                "random_hybrid": rand.attach, "fastv": fastv.attach}
    report: dict[str, Any] = {
        "model": str(args.model), "metric": scores.metric, **sets, "frac": frac, **kw,
        "kv_budget": core.kv_budget,
        "core_heads": [head_name(h) for h in core.heads],
        "random_kv_heads": [kv_head_name(g) for g in rand.full_kv_heads],
        "fastv": {"k": fastv.k, "ratio": fastv.ratio}, "variants": {}}
    for name, ctx in variants.items():
        t0 = time.perf_counter()
        with ctx():
            res = evaluate(model, examples, batch_size=get("batch_size", 16), progress=False)
        report["variants"][name] = {"accuracy": res.accuracy, "mean_logprob": res.mean_logprob,
                                    "seconds": round(time.perf_counter() - t0, 3)}
    full = report["variants"]["full"]["accuracy"]
    for v in report["variants"].values():
        v["accuracy_vs_full"] = v["accuracy"] / full if full else float("nan")
    text = json.dumps(report, indent=2)
    out = get("out", None)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    print(text)
    return report

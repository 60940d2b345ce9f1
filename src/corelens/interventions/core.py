"""The intervention core that patching, attribution and ablation share.

What every intervention on an MLLM needs (hook names are ``corelens.hook_names.act_name``): a
cache of activations (``cache_activations``), whether two batches line up position for position
(``check_aligned``), what each position is (``token_roles``, ``position_groups``), the image
features of a batch computed once and handed to stacked copies of it (``image_features``,
``stacked``), and the batched runner that applies many edits, one per stacked copy, in one
forward (``sweep``: it resumes at the first edited block, replays that block's attention when
only its head outputs z are edited, and runs the last block at the metric's rows only).
Nothing here knows a method (patching, attribution, ablation) or a family.
Heads are ``corelens.heads.Head``.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any, Callable, Collection, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens.hook_points import HookPoint

from corelens import compat
from corelens.core.evaluate import logits_to_keep
from corelens.data.batch import MultimodalBatch, repeat_batch
from corelens.errors import LayoutError

Metric = Callable[[Tensor, MultimodalBatch], Float[Tensor, " batch"]]
Edit = Callable[[Tensor], None]  # edits one copy's rows of a hooked activation in place
Role = tuple


def cache_activations(model: Any, batch: MultimodalBatch, names: list[str]
                      ) -> dict[str, Tensor]:
    """The activations at ``names`` of one forward of ``batch`` (no grad, detached)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(batch, names_filter=names, logits_to_keep=1)
    return {n: cache[n].detach() for n in names}


def check_aligned(a: MultimodalBatch, b: MultimodalBatch) -> None:
    """Both batches must put the same kind of token at every position and teacher-force the
    same answer tokens (else ``answer_logprob`` on the target scores another answer)."""
    if a.input_ids.shape != b.input_ids.shape:
        raise LayoutError(f"cannot patch between batches of shapes {tuple(a.input_ids.shape)} "
                          f"and {tuple(b.input_ids.shape)}: build pairs with the same prompt "
                          "length and image sizes")
    if not torch.equal(a.attention_mask.cpu(), b.attention_mask.cpu()):
        raise LayoutError("cannot patch: the two batches are padded differently")
    for e in range(len(a)):
        va, vb = a.layout.vision_positions(e), b.layout.vision_positions(e)
        if not torch.equal(va, vb):
            raise LayoutError(f"cannot patch: example {e}'s vision tokens sit at different "
                              "positions in the two batches (different image sizes?)")
        if not torch.equal(a.query_positions[e].cpu(), b.query_positions[e].cpu()):
            raise LayoutError(f"cannot patch: example {e}'s answer positions differ")
        if not torch.equal(a.answer_tokens[e].cpu(), b.answer_tokens[e].cpu()):
            raise LayoutError(
                f"cannot patch: example {e} teacher-forces different answers in the two batches "
                f"(tokens {a.answer_tokens[e].tolist()} vs {b.answer_tokens[e].tolist()}): a "
                "metric such as answer_logprob would score the target's answer, for a corrupted "
                "target the corrupted one. Build the pair with patching.prepare_pair(model, "
                "clean, corrupted), which gives both batches the clean answer and keeps the "
                "corrupted one as wrong_ids")
        ia, ib = a.layout.images[e], b.layout.images[e]
        same_grid = len(ia) == len(ib) and all(
            torch.equal(x.rows.kind, y.rows.kind) and torch.equal(x.rows.view, y.rows.view)
            and torch.equal(x.rows.row, y.rows.row) and torch.equal(x.rows.col, y.rows.col)
            for x, y in zip(ia, ib))
        if not same_grid:
            raise LayoutError(f"cannot patch: example {e}'s vision tokens cover different grid "
                              "cells in the two batches (same token count, different image "
                              "shape: token i sits at another row/col and position id); build "
                              "pairs with the same image sizes")


def token_roles(batch: MultimodalBatch, example: int) -> list[Role | None]:
    """The role of each position of an example (None for padding)."""
    mask = batch.attention_mask[example].bool().tolist()
    anchor = int(batch.query_positions[example][0])
    roles: list[Role | None] = [("text", p - anchor) if m else None for p, m in enumerate(mask)]
    for img in batch.layout.images[example]:
        rows = img.rows
        for j, p in enumerate(img.positions.tolist()):
            v = int(rows.view[j])
            view = rows.views[v].name if v >= 0 else "structural"
            roles[p] = ("image", img.image_index, view, int(rows.row[j]), int(rows.col[j]))
    return roles


def position_groups(batch: MultimodalBatch) -> list[tuple[str, list[Tensor]]]:
    """(label, positions of each example): vision tokens per region (evidence, each distractor,
    other vision tokens), then each text token by its offset from the first answer-predicting
    position (so prompts of different lengths line up), in sequence order."""
    groups: list[tuple[str, list[Tensor]]] = []
    region_sets: list[dict[str, Tensor]] = []
    for e in range(len(batch)):
        vision = batch.layout.vision_positions(e).cpu()
        taken = torch.zeros(batch.seq_len, dtype=torch.bool)
        sets: dict[str, Tensor] = {}
        if batch.boxes and batch.boxes[e]:
            sets["evidence"] = batch.evidence_positions(e).cpu()
            taken[sets["evidence"]] = True
        for i, d in enumerate(batch.distractor_positions(e)):
            d = d.cpu()[~taken[d.cpu()]]
            sets[f"distractor {i}"] = d
            taken[d] = True
        sets["other vision"] = vision[~taken[vision]]
        region_sets.append(sets)
    labels = list(dict.fromkeys(k for sets in region_sets for k in sets))
    for label in labels:
        per = [sets.get(label, torch.zeros(0, dtype=torch.long)) for sets in region_sets]
        if any(len(p) for p in per):
            groups.append((label, per))
    text: dict[int, list[Tensor]] = {}
    for e in range(len(batch)):
        for p, role in enumerate(token_roles(batch, e)):
            if role is not None and role[0] == "text":
                text.setdefault(role[1], [torch.zeros(0, dtype=torch.long)] * len(batch))
                text[role[1]] = [t if i != e else torch.tensor([p])
                                 for i, t in enumerate(text[role[1]])]
    for offset in sorted(text):
        groups.append((f"text {offset:+d}", text[offset]))
    return groups


def index_pairs(per_example: list[Tensor]) -> tuple[Tensor, Tensor]:
    """(example index, position) pairs for advanced indexing."""
    ex = torch.cat([torch.full((len(p),), e, dtype=torch.long) for e, p in enumerate(per_example)])
    return ex, torch.cat(per_example).long()


def image_features(model: Any, batch: MultimodalBatch) -> Any | None:
    """The batch's image encoder outputs (vision tower + projector, as the HF model's
    ``get_image_features`` returns them), recorded from one forward; None when the model has no
    such method or the batch no image."""
    return unedited_run(model, batch, features=True)[0]


def _features_method(model: Any, batch: MultimodalBatch) -> tuple[Any, Any] | None:
    """(the HF model's inner module, its ``get_image_features``) when the batch's image
    features can be handed to later forwards, else None."""
    inner = getattr(getattr(model, "hf_model", None), "model", None)
    fn = getattr(inner, "get_image_features", None)
    if fn is None or batch.inputs.get("pixel_values") is None:
        return None
    if batch.inputs.get("pixel_values_videos") is not None:
        return None  # HF takes encoder outputs only in place of ALL pixel inputs: run the tower
    return inner, fn


def unedited_run(model: Any, batch: MultimodalBatch, *, features: bool,
                 blocks: Collection[int] = (), zs: Collection[int] = ()
                 ) -> tuple[Any | None, dict[int, Any], dict[int, Tensor]]:
    """One unedited forward of ``batch`` recording what stacked forwards reuse: its image
    features (``image_features``; None where they cannot be handed over), what decoder
    ``blocks`` return, as returned (``skip_blocks``), and the head outputs z (the input of
    ``o_proj``, ``[batch, pos, head * d_head]``) of layers ``zs`` (``replay_z``). No forward
    when nothing is recorded."""
    method = _features_method(model, batch) if features else None
    if method is None and not blocks and not zs:
        return None, {}, {}
    got: dict[str, Any] = {}
    outputs: dict[int, Any] = {}
    z: dict[int, Tensor] = {}
    handles = [model.bridge.blocks[i].register_forward_hook(
        lambda mod, args, out, i=i: outputs.__setitem__(i, out)) for i in sorted(set(blocks))]
    handles += [model.bridge.blocks[i].attn.o.register_forward_pre_hook(
        lambda mod, args, i=i: z.__setitem__(i, args[0].detach())) for i in sorted(set(zs))]
    if method is not None:
        inner, fn = method

        def record(*args: Any, **kw: Any) -> Any:
            got["out"] = fn(*args, **kw)
            return got["out"]

        inner.get_image_features = record
    try:
        with torch.no_grad():
            model(batch, return_type=None)
    finally:
        if method is not None:
            del inner.get_image_features
        for h in handles:
            h.remove()
    return got.get("out"), outputs, z


def repeat_image_features(features: Any, k: int) -> Any:
    """Image encoder outputs for ``repeat_batch(batch, k)``: per-image sequences repeated k
    times, tensors (images or their tokens first) concatenated k times — copy-major, as
    ``repeat_batch`` orders images."""
    def rep(v: Any) -> Any:
        if isinstance(v, Tensor):
            return torch.cat([v] * k)
        if isinstance(v, (list, tuple)):
            if all(isinstance(e, Tensor) for e in v):  # one entry per image
                return list(v) * k
            return [rep(e) for e in v]  # e.g. per layer, then per image (deepstack)
        return v
    return type(features)(**{name: rep(v) for name, v in features.items()
                             if name not in ("hidden_states", "attentions")})


def stacked(model: Any, batch: MultimodalBatch, k: int,
             features: Any | None) -> tuple[MultimodalBatch, dict[str, Any]]:
    """``repeat_batch(batch, k)`` and forward kwargs that hand it ``features`` (the vision
    tower then does not run again)."""
    big = repeat_batch(batch, k)
    if features is None:
        return big, {}
    inputs = {n: t for n, t in big.inputs.items() if n != "pixel_values"}
    return replace(big, inputs=inputs), {
        "mm_encoder_outputs": {"image": repeat_image_features(features, k)}}


def _block_hook(name: str) -> tuple[int, str] | None:
    """(layer, the rest of the name) for a hook in decoder block ``layer`` (``blocks.L.rest``;
    rest "" for the block itself), None for a hook elsewhere."""
    head, _, tail = name.partition(".")
    index, _, rest = tail.partition(".")
    return (int(index), rest) if head == "blocks" and index.isdigit() else None


def first_block(names: Sequence[str], n_layers: int) -> int:
    """The first decoder block that hooks ``names`` can change: blocks before it compute what
    they compute in the unedited run (``ln_final`` / ``unembed`` hooks: after every block;
    embeddings, vision tower: the first)."""
    first = n_layers
    for name in names:
        block = _block_hook(name)
        if block is not None:
            first = min(first, block[0])
        elif not name.startswith(AFTER_BLOCKS):
            return 0
    return first


# A block's hook points that see its head outputs z or come after them (what a job may hook at
# the block its attention is replayed at): ``blocks.L.`` + one of these (or a prefix of it).
Z_HOOKS = ("attn.hook_z", "attn.o.hook_in")
AFTER_Z_HOOKS = ("attn.o.hook_out", "attn.hook_out", "hook_attn_out", "hook_resid_mid",
                 "hook_mlp_out", "hook_resid_post", "hook_out", "ln2.", "mlp.")
AFTER_BLOCKS = ("ln_final", "unembed", "hook_unembed")


def replays_z(names: Sequence[str], layer: int) -> bool:
    """Whether hooks ``names`` leave ``layer``'s attention, up to its head outputs z, as in
    the unedited run: they hook z or what comes after it at ``layer``, later blocks, the final
    norm and the unembedding, nothing before (embeddings, the vision tower, earlier blocks)."""
    for name in names:
        block = _block_hook(name)
        if block is None:
            if not name.startswith(AFTER_BLOCKS):
                return False
            continue
        at, rest = block
        if at < layer or (at == layer and not (rest in Z_HOOKS
                                               or rest.startswith(AFTER_Z_HOOKS))):
            return False
    return True


def trims_last_block(names: Sequence[str], n_layers: int, replayed: bool) -> bool:
    """Whether the last block may compute only the rows the metric reads under hooks ``names``:
    nothing at it (but z where its attention is replayed: z is then every row) or after it."""
    for name in names:
        block = _block_hook(name)
        at_last = block is not None and block[0] == n_layers - 1
        if name.startswith(AFTER_BLOCKS) or (at_last and not (replayed and block[1] in Z_HOOKS)):
            return False
    return True


def _stack_output(out: Any, k: int, batch: int) -> Any:
    """A block output for ``k`` stacked copies (tensors with the batch first repeated)."""
    if isinstance(out, Tensor):
        return out.repeat(k, *([1] * (out.ndim - 1))) if out.shape[:1] == (batch,) else out
    if isinstance(out, tuple):
        return type(out)(_stack_output(o, k, batch) for o in out)
    return out


@contextmanager
def skip_blocks(model: Any, upto: int, outputs: dict[int, Any], k: int,
                batch: int) -> Iterator[None]:
    """While active, decoder blocks ``< upto`` do not run: block ``upto - 1`` returns its
    recorded output (stacked ``k`` times), so an edit at block ``upto`` or later resumes from
    there. The blocks before it return a copy of the same (the decoder loop passes each output
    on to a block that ignores it; one shared copy instead of one per block keeps the memory
    at two stacked outputs, and keeps anything done to it in place away from the one used)."""
    blocks = list(model.bridge.blocks)[:upto]
    if blocks:
        resumed = _stack_output(outputs[upto - 1], k, batch)
        filler = _stack_output(outputs[upto - 1], k, batch) if upto > 1 else None
    for i, block in enumerate(blocks):
        out = resumed if i == upto - 1 else filler
        compat.replace_forward(block, lambda self, *a, _o=out, **kw: _o)
    try:
        yield
    finally:
        for block in blocks:
            compat.restore_forward(block)


@contextmanager
def replay_z(model: Any, layer: int | None, zs: dict[int, Tensor], k: int) -> Iterator[None]:
    """While active, ``layer``'s attention returns ``o_proj`` of its recorded z (stacked ``k``
    times; ``hook_z`` fires on it) instead of computing q, k, v and the scores
    (``AttentionBackend.replay``). None: nothing replayed."""
    if layer is None:
        yield
        return
    z = zs[layer]
    with model.attention.replay(layer, z.repeat(k, *([1] * (z.ndim - 1)))):
        yield


def _hooked(block: Any, replayed: bool) -> bool:
    """A live hook in ``block`` that would see fewer rows (z itself, when replayed, sees all)."""
    z = block.attn.o.hook_in if replayed else None
    return any(compat.has_hooks(m) for m in block.modules()
               if isinstance(m, HookPoint) and m is not z)


def _merge(hidden: Tensor, out: Any, n: int) -> Any:
    """A trimmed block's output over every row: the rows it did not compute pass its input."""
    if isinstance(out, tuple):
        return (torch.cat([hidden[:, :-n], out[0]], 1),) + out[1:]
    return torch.cat([hidden[:, :-n], out], 1)


@contextmanager
def last_rows(model: Any, n: int, replayed: bool) -> Iterator[None]:
    """While active, the last decoder block computes only the last ``n`` rows (the rows
    ``logits_to_keep=n`` reads): its MLP, norms and attention queries run there, its keys and
    values over every row (``AttentionBackend.keys_from``; none when its attention is
    ``replayed``). The rows before pass its input on: exact for the kept logits only, so a
    block with a live hook (but z when replayed), or an attention that would not honour it
    (``can_trim``), runs in full. ``n`` 0: nothing trimmed."""
    layer = len(model.bridge.blocks) - 1
    if n <= 0 or layer < 0:
        yield
        return
    block = model.bridge.blocks[layer]
    attention = model.attention

    def forward(self: Any, *args: Any, **kw: Any) -> Any:
        named = "hidden_states" in kw
        hidden = kw.pop("hidden_states") if named else args[0]
        rest = args if named else args[1:]

        def run(h: Tensor) -> Any:
            return (type(self).forward(self, *rest, hidden_states=h, **kw) if named
                    else type(self).forward(self, h, *rest, **kw))
        if n >= hidden.shape[1] or not attention.can_trim(layer) or _hooked(self, replayed):
            return run(hidden)
        keys = (nullcontext() if replayed
                else attention.keys_from(layer, self.ln1(hidden)))
        with keys:
            return _merge(hidden, run(hidden[:, -n:]), n)

    compat.replace_forward(block, forward)
    try:
        yield
    finally:
        compat.restore_forward(block)


def sweep(
    model: Any, target: MultimodalBatch, metric: Metric, jobs: Sequence[Sequence[tuple[str, Edit]]],
    *, per_forward: int, reuse_vision: bool = True, resume: bool = True, replay: bool = True,
    trim: bool = True, progress: bool = False, desc: str = "",
) -> Float[Tensor, "job batch"]:
    """The metric of the target run under each job (a list of (hook name, in-place edit of
    that copy's rows)), ``per_forward`` jobs per forward as stacked copies of the target that
    reuse its image features. Equal to running the jobs one forward each.

    ``resume``: a forward whose jobs edit nothing before decoder block l does not run blocks
    < l; it starts from block l - 1's output in the unedited run, recorded once in the run that
    records the image features (memory: one block output of the target batch per distinct
    resume point, plus two stacked ones in flight). Jobs in layer order resume late: an
    all-heads sweep costs ~L(L+1)/2 block forwards per stacked forward instead of L^2.

    ``replay``: when the jobs of a forward hook block l (its first edited block) only at its
    head outputs z or after them (``replays_z``), block l's attention does not compute q, k, v
    and the scores: it feeds its z of the unedited run (recorded there: one z of the target
    batch per such layer) to ``hook_z`` and ``o_proj``. ``trim``: when the metric reads the
    logits of the last rows only (``logits_to_keep``) and nothing hooks the last block (but z
    where it is replayed) or after it, the last block computes those rows only (``last_rows``).
    """
    B = len(target)
    L = len(model.bridge.blocks)
    per_forward = max(1, int(per_forward))
    names = [[name for name, _ in job] for job in jobs]
    firsts = [first_block(n, L) for n in names]
    starts = range(0, len(jobs), per_forward)
    firsts_per = [min(firsts[s:s + per_forward]) for s in starts]
    uptos = [f if resume else 0 for f in firsts_per]
    chunk_names = [[n for job in names[s:s + per_forward] for n in job] for s in starts]
    replays = [f if replay and f < L and replays_z(ns, f) else None
               for f, ns in zip(firsts_per, chunk_names)]
    features, outputs, zs = unedited_run(
        model, target, features=reuse_vision and per_forward > 1,
        blocks={u - 1 for u in uptos if u > 0}, zs={r for r in replays if r is not None})
    out = []
    for start, upto, replayed, ns in tqdm(zip(starts, uptos, replays, chunk_names),
                                          total=len(starts), disable=not progress, desc=desc):
        chunk = jobs[start:start + per_forward]
        big, extra = stacked(model, target, len(chunk), features)
        by_name: dict[str, list[tuple[int, Edit]]] = {}
        for i, job in enumerate(chunk):
            for name, edit in job:
                by_name.setdefault(name, []).append((i, edit))

        def hook_for(name: str) -> Callable:
            def hook(x: Tensor, hook: Any) -> Tensor:
                x = x.clone()
                for i, edit in by_name[name]:
                    edit(x[i * B:(i + 1) * B])
                return x
            return hook

        keep = logits_to_keep(metric, big)
        # the last block trimmed only when it runs (no job edits a block: all are resumed past)
        trimmed = (keep if trim and upto < L and trims_last_block(ns, L, replayed == L - 1)
                   else 0)
        with torch.no_grad(), skip_blocks(model, upto, outputs, len(chunk), B), \
                replay_z(model, replayed, zs, len(chunk)), \
                last_rows(model, trimmed, replayed == L - 1):
            logits = model.run_with_hooks(big, fwd_hooks=[(n, hook_for(n)) for n in by_name],
                                          logits_to_keep=keep, **extra)
        out.append(metric(logits, big).float().view(len(chunk), B).cpu())
    return torch.cat(out)

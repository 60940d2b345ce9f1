"""Activations of an MLLM for SAE training: every kept token of grounded examples, image included.

SAELens's ``ActivationsStore`` (``sae_lens/training/activations_store.py``) cannot serve here: it
tokenises text (``get_batch_tokens`` -> ``model.run_with_cache(batch_tokens, ...)``), so on an
MLLM it would run the decoder without the image, and its buffer carries no metadata. This store
keeps its shape -- forward ``batch_size`` examples at a time (SAELens's
``store_batch_size_prompts``), gather activations into a bounded buffer, shuffle it, serve
``out_batch_size`` rows (SAELens's ``train_batch_size_tokens``) -- with MLLM inputs:

* ``GroundedExample``s -> ``model.prepare_examples`` -> one forward with a hook at
  ``hook_name`` that stops the forward once it has fired (SAELens's ``stop_at_layer``); the
  image features are in, the tokens of the chosen ``roles`` are kept, padding is dropped.
* Each kept token carries its metadata (``META``): example index, position, role, and for a
  vision token its image (or video) index, view, grid row and column -- the ones
  ``batch.layout.token_info(e, p)`` gives.
* Roles: ``vision`` (image/video feature tokens: ``layout.vision_positions``), ``structural``
  (the image rows that are not a grid cell: LLaVA-OneVision's newline, a CLS feature), ``answer``
  (the teacher-forced answer tokens) and ``text`` (every other real token). All by default.

The buffer. SAELens mixes half of the old buffer into each refill (``mixing_buffer.py``) and its
checkpoint saves only ``n_dataset_processed``, so a restart loses (skips) what the buffer held.
Here a *fill* is a run of whole example batches holding at most ``buffer_tokens`` kept tokens
(the kept-token count is known from the prepared batch, before the forward); it is shuffled
with a generator seeded by (seed, epoch, fill start) and served to the last row (the last
batch of a fill is short when ``out_batch_size`` does not divide it) before the next fill is
read. The state is then four integers -- the epoch, where the open fill starts in the epoch's
(seeded) batch order (the batches before it are consumed), how many batches it holds, how many
of its out-batches were served -- written atomically (fsynced, then renamed) to the JSON
``partial`` each time an out-batch is handed out (handed out = consumed).
A new store on the same ``partial`` rebuilds the open fill, skips what was served and goes on:
no example batch is repeated or skipped, and no token either (the shuffle is replayed). A
consumer that checkpoints on its own (``train_sae``) saves ``state_dict()`` with its
checkpoint and gives it back with ``load_state_dict``, so the store resumes where that
checkpoint was taken.

Vision-tower hooks (``vision_encoder.*``, ``vision_projector.*``) see no sequence: their rows
are the patches of the pictures the tower encodes (image, anyres tiles, crops, thumbnail), laid
out by ``model.tower_layout(batch, hook_name)`` (``corelens.data.tower``). Each row's metadata:
``position`` -1, role ``vision`` (a patch, or a merged cell after the projector's pixel shuffle /
pooling / merger) or ``structural`` (a CLS token), its ``image``, ``view`` = which of the image's
tower pictures, ``row``/``col`` in that picture's grid at the hook's level
(``store.tower_level``: ``patches``, ``patches+prefix`` or ``merged``). Batches with videos are
refused there (the frames go through the tower in a call of their own).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from corelens.data.batch import MultimodalBatch
from corelens.data.tower import TowerLayout
from corelens.errors import InputError
from corelens.hook_names import is_vision_hook

ROLES = ("vision", "structural", "text", "answer")
META = ("example", "position", "role", "image", "view", "row", "col", "video")
_NOT_SEQUENCE = ("hook_pattern", "hook_attn_scores")  # [batch, head, query, key]


@dataclass
class ActivationBatch:
    """Activations ``[n, d]`` and their metadata ``[n, len(META)]`` (``-1`` where a column does
    not apply, e.g. the image of a text token); ``ids[i]``: the id of row i's example."""

    acts: Tensor
    meta: Tensor
    ids: list[Any] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.acts.shape[0])

    def column(self, name: str) -> Tensor:
        return self.meta[:, META.index(name)]

    @property
    def example(self) -> Tensor:
        return self.column("example")

    @property
    def position(self) -> Tensor:
        return self.column("position")

    @property
    def role(self) -> Tensor:
        return self.column("role")

    def role_names(self) -> list[str]:
        return [ROLES[r] for r in self.role.tolist()]

    @staticmethod
    def cat(parts: Sequence["ActivationBatch"], d: int = 0) -> "ActivationBatch":
        if not parts:
            return ActivationBatch(torch.zeros(0, d), torch.zeros(0, len(META), dtype=torch.long))
        return ActivationBatch(torch.cat([p.acts for p in parts]),
                               torch.cat([p.meta for p in parts]),
                               [i for p in parts for i in p.ids])


# ----------------------------------------------------------------------- one example batch
def check_hook(hook_name: str, model: Any = None) -> None:
    """Refuse hooks whose activations are not ``[batch, pos, ...]`` over the decoder sequence,
    and names the model does not have."""
    names = getattr(model, "hook_dict", None)
    if names is not None and hook_name not in names:
        raise InputError(f"the model has no hook {hook_name!r} (model.hook_dict lists them; "
                         "corelens.hook_names.act_name('resid_post', layer) spells decoder ones)")
    if hook_name.endswith(_NOT_SEQUENCE):
        raise InputError(f"{hook_name} is [batch, head, query, key], not one row per token: "
                         "train on hook_z / hook_q / hook_k / hook_v or a residual hook")


def token_metadata(batch: MultimodalBatch, roles: Sequence[str],
                   first_example: int = 0) -> Tensor:
    """``[n, len(META)]``: the kept tokens of ``batch`` (those of ``roles``; padding never), in
    (example, position) order; ``example`` counts from ``first_example``."""
    codes = torch.tensor([ROLES.index(r) for r in roles])
    seq = batch.seq_len
    out = []
    for e in range(len(batch)):
        meta = torch.full((seq, len(META)), -1, dtype=torch.long)
        meta[:, 0] = first_example + e
        meta[:, 1] = torch.arange(seq)
        role = meta[:, 2]
        role[batch.attention_mask[e].bool().cpu()] = ROLES.index("text")
        if len(batch.answer_tokens[e]):
            role[batch.query_positions[e].cpu() + 1] = ROLES.index("answer")
        for img in batch.layout.images[e]:
            rows, pos = img.rows, img.positions
            vision = img.vision_mask
            role[pos] = torch.where(vision, ROLES.index("vision"), ROLES.index("structural"))
            meta[pos, 3] = img.image_index
            meta[pos, 4] = rows.view
            meta[pos, 5] = torch.where(vision, rows.row, -1)
            meta[pos, 6] = torch.where(vision, rows.col, -1)
            meta[pos, 7] = int(img.is_video)
        out.append(meta[torch.isin(role, codes)])
    return torch.cat(out) if out else torch.zeros(0, len(META), dtype=torch.long)


def tower_metadata(tower: TowerLayout, level: str, roles: Sequence[str],
                   first_example: int = 0) -> tuple[Tensor, Tensor]:
    """``([n, len(META)], [n])``: the kept rows of a tower activation laid out on ``level``
    (``corelens.data.tower.LEVELS``; ``tower = model.tower_layout(batch, hook_name)``) and which
    of the activation's rows they are."""
    rows = tower.rows_at(level)
    meta = torch.full((len(rows), len(META)), -1, dtype=torch.long)
    meta[:, 0] = tower.example[rows.entry] + first_example
    meta[:, 2] = torch.where(rows.is_prefix, ROLES.index("structural"), ROLES.index("vision"))
    meta[:, 3] = tower.image[rows.entry]
    meta[:, 4] = tower.index[rows.entry]
    meta[:, 5], meta[:, 6], meta[:, 7] = rows.row, rows.col, 0
    keep = torch.isin(meta[:, 2], torch.tensor([ROLES.index(r) for r in roles])).nonzero()
    return meta[keep[:, 0]], keep[:, 0]


class _Stop(Exception):
    """Raised by the capture hook: the rest of the forward is not needed."""


@torch.no_grad()
def capture(model: Any, batch: MultimodalBatch, hook_name: str) -> Tensor:
    """The activation at ``hook_name`` of one forward, ``[batch, pos, d]`` (head axes flattened,
    as SAELens's ``get_activations`` does; a tower hook's as it fired); the forward stops right
    after the hook fires."""
    got: dict[str, Tensor] = {}

    def grab(act: Tensor, hook: Any) -> None:
        got["act"] = act.detach()
        raise _Stop

    try:
        with model.hooks(fwd_hooks=[(hook_name, grab)]):
            model(batch, return_type=None)
    except _Stop:
        pass
    if "act" not in got:
        raise InputError(f"hook {hook_name!r} did not fire in the forward; names such as "
                         "corelens.hook_names.act_name('resid_post', 1) do")
    act = got["act"]
    if is_vision_hook(hook_name):
        return act
    if act.ndim < 3 or tuple(act.shape[:2]) != tuple(batch.shape):
        raise InputError(f"{hook_name} gives {tuple(act.shape)}, not [batch, pos, ...] = "
                         f"{tuple(batch.shape)} + (...)")
    return act.reshape(*act.shape[:2], -1)


def tower_level(model: Any, batch: MultimodalBatch, hook_name: str) -> str:
    """Which grid ``hook_name``'s rows are laid out on (one forward up to the hook)."""
    act = capture(model, batch, hook_name)
    return model.tower_layout(batch, hook_name).level(act.shape, hook_name)


def batch_activations(model: Any, batch: MultimodalBatch, hook_name: str,
                      roles: Sequence[str], first_example: int = 0,
                      dtype: torch.dtype = torch.float32) -> ActivationBatch:
    """The kept tokens of one prepared batch, in (example, position) order (tower hooks: the
    kept rows, in the activation's order)."""
    if is_vision_hook(hook_name):
        act = capture(model, batch, hook_name)
        tower = model.tower_layout(batch, hook_name)
        meta, keep = tower_metadata(tower, tower.level(act.shape, hook_name), roles,
                                    first_example)
        flat = act if tower.flat else act.flatten(0, 1)
        rows = flat.reshape(len(flat), -1)[keep.to(act.device)]
        ids = [batch.ids[e - first_example] if batch.ids else None for e in meta[:, 0].tolist()]
        return ActivationBatch(rows.to(dtype), meta, ids)
    meta = token_metadata(batch, roles, first_example)
    act = capture(model, batch, hook_name)
    rows = act[(meta[:, 0] - first_example).to(act.device), meta[:, 1].to(act.device)]
    ids = [batch.ids[e - first_example] if batch.ids else None for e in meta[:, 0].tolist()]
    return ActivationBatch(rows.to(dtype), meta, ids)


def _check_roles(roles: Sequence[str]) -> tuple[str, ...]:
    roles = (roles,) if isinstance(roles, str) else tuple(roles)
    bad = [r for r in roles if r not in ROLES]
    if bad or not roles:
        raise InputError(f"roles {bad or roles} unknown: pick from {ROLES}")
    return roles


def activations(model: Any, examples: Sequence[Any], hook_name: str, *,
                roles: Sequence[str] = ROLES, batch_size: int = 8,
                dtype: torch.dtype = torch.float32, **prepare_kw: Any) -> ActivationBatch:
    """Every kept activation, in order (examples in order, positions in order), no shuffle: the
    reference ``ActivationStore`` is checked against (same ``batch_size``: same padding)."""
    check_hook(hook_name, model)
    roles = _check_roles(roles)
    parts = []
    for start in range(0, len(examples), batch_size):
        batch = model.prepare_examples(examples[start:start + batch_size], **prepare_kw)
        parts.append(batch_activations(model, batch, hook_name, roles, start, dtype))
    return ActivationBatch.cat(parts)


# ---------------------------------------------------------------------------------- the store
class ActivationStore:
    """Shuffled, bounded, resumable batches of ``ActivationBatch`` (see the module doc).

    ``examples`` are cut into example batches of ``batch_size`` (batch b = examples
    ``b*batch_size ...``); each epoch visits them in a seeded order. ``epochs=None`` cycles
    for ever. ``partial``: the JSON state file (resume: a new store on the same path, same
    arguments). Iterating goes on from the current state; ``batches()`` streams every example
    batch in order without touching it (evaluation)."""

    def __init__(self, model: Any, examples: Sequence[Any], hook_name: str, *,
                 roles: Sequence[str] = ROLES, batch_size: int = 8,
                 buffer_tokens: int = 65536, out_batch_size: int = 4096, seed: int = 0,
                 partial: str | Path | None = None, epochs: int | None = 1,
                 dtype: torch.dtype = torch.float32, device: Any = None,
                 progress: bool = True, **prepare_kw: Any) -> None:
        check_hook(hook_name, model)
        if not examples:
            raise InputError("no examples")
        if min(batch_size, buffer_tokens, out_batch_size) < 1:
            raise InputError("batch_size, buffer_tokens and out_batch_size must be >= 1")
        self.model, self.examples, self.hook_name = model, list(examples), hook_name
        self.roles = _check_roles(roles)
        self.batch_size, self.buffer_tokens = batch_size, buffer_tokens
        self.out_batch_size, self.seed, self.epochs = out_batch_size, seed, epochs
        self.dtype, self.device, self.progress = dtype, device, progress
        self.prepare_kw = prepare_kw
        self.n_batches = math.ceil(len(self.examples) / batch_size)
        self.partial = Path(partial) if partial is not None else None
        self.run = self._identity()
        self._state = self._fresh()
        self._prepared: dict[int, tuple[MultimodalBatch, int]] = {}
        self.peak_buffer = 0  # most activations held at once (tests check the bound)
        self.tower_level: str | None = None  # a tower hook's grid (corelens.data.tower.LEVELS)
        if self.partial is not None and self.partial.is_file():
            saved = json.loads(self.partial.read_text())
            if saved.get("run") != self.run:
                raise ValueError(f"{self.partial} holds the state of another store "
                                 f"({saved.get('run')}; this one: {self.run}): use a new path")
            self._state = saved["state"]

    # --- state
    def _identity(self) -> dict[str, Any]:
        ids = json.dumps([[str(getattr(ex, n, None)) for n in ("id", "question", "answer")]
                          for ex in self.examples])
        return {"hook_name": self.hook_name, "roles": list(self.roles),
                "batch_size": self.batch_size, "n_examples": len(self.examples),
                "examples": hashlib.sha1(ids.encode()).hexdigest()[:16],
                "buffer_tokens": self.buffer_tokens, "out_batch_size": self.out_batch_size,
                "seed": self.seed, "epochs": self.epochs}

    @staticmethod
    def _fresh() -> dict[str, Any]:
        return {"epoch": 0, "start": 0, "fill": 0, "served": 0}

    def state_dict(self) -> dict[str, Any]:
        """Where the store stands (JSON-able): pass it to ``load_state_dict`` to go on there."""
        return {"run": self.run, "state": json.loads(json.dumps(self._state))}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("run") != self.run:
            raise ValueError(f"state of another store ({state.get('run')}; this one: {self.run})")
        self._state = json.loads(json.dumps(state["state"]))
        self._save()

    def _save(self) -> None:
        if self.partial is None:
            return
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.partial.with_name(self.partial.name + ".tmp")
        with tmp.open("w") as f:
            f.write(json.dumps(self.state_dict()))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.partial)  # atomic: a kill leaves the old state or the new one

    @property
    def consumed(self) -> list[int]:
        """The example batches of this epoch fully served (the state's ``start`` first ones of
        the epoch's order)."""
        return self.order(self._state["epoch"])[:self._state["start"]]

    @property
    def exhausted(self) -> bool:
        return self.epochs is not None and self._state["epoch"] >= self.epochs

    def order(self, epoch: int) -> list[int]:
        """The example batches of ``epoch`` in the order they are read."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_batches, generator=g).tolist()

    # --- batches
    def _prepare(self, b: int) -> tuple[MultimodalBatch, int]:
        """Example batch ``b`` prepared, and how many tokens it keeps (kept for the fill)."""
        if b not in self._prepared:
            start = b * self.batch_size
            batch = self.model.prepare_examples(self.examples[start:start + self.batch_size],
                                                **self.prepare_kw)
            n = len(self._metadata(batch))
            if n > self.buffer_tokens:
                raise InputError(f"example batch {b} keeps {n} tokens, more than buffer_tokens="
                                 f"{self.buffer_tokens}: raise buffer_tokens or lower "
                                 "batch_size")
            self._prepared[b] = (batch, n)
        return self._prepared[b]

    def _metadata(self, batch: MultimodalBatch) -> Tensor:
        """The kept rows' metadata of a prepared batch, known before its forward (a tower
        hook's level is read once, off the first batch)."""
        if not is_vision_hook(self.hook_name):
            return token_metadata(batch, self.roles)
        if self.tower_level is None:
            self.tower_level = tower_level(self.model, batch, self.hook_name)
        tower = self.model.tower_layout(batch, self.hook_name)
        return tower_metadata(tower, self.tower_level, self.roles)[0]

    def _plan(self, order: list[int], start: int) -> list[int]:
        """The batches of the fill starting at ``order[start]``: as many as fit the buffer."""
        fill, total = [], 0
        for b in order[start:]:
            n = self._prepare(b)[1]
            if fill and total + n > self.buffer_tokens:
                break
            fill.append(b)
            total += n
        return fill

    def _read(self, fill: list[int]) -> ActivationBatch:
        parts = []
        for b in fill:
            batch, _ = self._prepare(b)
            del self._prepared[b]  # the batch's inputs are not needed once it is read
            part = batch_activations(self.model, batch, self.hook_name, self.roles,
                                     b * self.batch_size, self.dtype)
            if self.device is not None:
                part.acts = part.acts.to(self.device)
            parts.append(part)
        buf = ActivationBatch.cat(parts)
        self.peak_buffer = max(self.peak_buffer, len(buf))
        return buf

    def _serve(self, buf: ActivationBatch) -> Iterator[ActivationBatch]:
        """The open fill's out-batches from ``served`` on (its shuffle replayed)."""
        st = self._state
        g = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + st["epoch"]) * 1_000_003 + st["start"])
        perm = torch.randperm(len(buf), generator=g)
        for j in range(st["served"], math.ceil(len(buf) / self.out_batch_size)):
            idx = perm[j * self.out_batch_size:(j + 1) * self.out_batch_size]
            st["served"] = j + 1
            self._save()  # handed out = consumed
            yield ActivationBatch(buf.acts[idx.to(buf.acts.device)], buf.meta[idx],
                                  [buf.ids[i] for i in idx.tolist()])

    def batches(self) -> Iterator[ActivationBatch]:
        """Every example batch's kept tokens, in example order (no shuffle, state untouched)."""
        for b in range(self.n_batches):
            start = b * self.batch_size
            batch = self.model.prepare_examples(self.examples[start:start + self.batch_size],
                                                **self.prepare_kw)
            yield batch_activations(self.model, batch, self.hook_name, self.roles, start,
                                    self.dtype)

    def __iter__(self) -> Iterator[ActivationBatch]:
        st = self._state
        total = None if self.epochs is None else self.epochs * self.n_batches
        bar = tqdm(total=total, initial=st["epoch"] * self.n_batches + st["start"],
                   desc=f"activations {self.hook_name}", unit="batch",
                   disable=not self.progress)
        try:
            while not self.exhausted:
                order = self.order(st["epoch"])
                while st["start"] < self.n_batches:
                    if st["fill"]:  # resuming an open fill
                        fill = order[st["start"]:st["start"] + st["fill"]]
                    else:
                        fill = self._plan(order, st["start"])
                        st["fill"] = len(fill)
                    n = sum(self._prepare(b)[1] for b in fill)
                    if st["served"] < math.ceil(n / self.out_batch_size):
                        yield from self._serve(self._read(fill))
                    for b in fill:
                        self._prepared.pop(b, None)
                    st.update(start=st["start"] + len(fill), fill=0, served=0)
                    self._save()
                    bar.update(len(fill))
                st.update(epoch=st["epoch"] + 1, start=0, fill=0, served=0)
                self._prepared.clear()
                self._save()
        finally:
            bar.close()

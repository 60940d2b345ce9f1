"""Data-parallel head scoring (and ablation sweeps) on ``torch.distributed``, run by ``torchrun``.

    torchrun --nproc_per_node 8 -m corelens.distributed \\
        --model Qwen/Qwen3-VL-32B-Instruct --data refcocog.jsonl --out ram.json \\
        --batch-size 4 --partial runs/ram-partial.jsonl --dtype bfloat16
    torchrun --nproc_per_node 8 -m corelens.distributed ablation \\
        --model ... --data refcocog.jsonl --scores ram.json --out curve.json

How the work is split, so that the result equals ``ram.score_all`` on one process:

- The global batches are fixed by the example order and the batch size alone: batch b holds
  examples ``[b * batch_size, (b + 1) * batch_size)`` whatever the world size W.
- The batches still to do are dealt round-robin: rank r takes the r-th, (r + W)-th, ... of
  them (on a fresh run: batches r, r + W, r + 2W, ...).
- Each rank appends one JSON line per finished batch (the record ``score_all`` keeps: per-example
  values of every metric, |R_e|, |V_e|) to its own file ``<partial>.rank{r}.jsonl`` (``<partial>``
  without a ``.jsonl`` suffix), flushed and fsynced as it goes.
- At the end the records are gathered to rank 0 (over a gloo group, whatever the backend) and
  merged in global batch order, then aggregated exactly as ``score_all`` does (means of
  per-example values, ratios of sums): the same floats in the same order, so the same result.
- A rerun after a crash (same ``--partial``, any world size) reads every ``<partial>.rank*.jsonl``
  it can see (and a single-process ``<partial>`` file): the finished batches are the union over
  all of them and are not recomputed; only the missing ones are dealt out again. A torn last
  line (a rank killed mid-write) is ignored and its batch redone.

Backend: NCCL when the ranks run on CUDA, gloo on CPU (``--backend auto``). Each rank holds a
full model replica on ``cuda:LOCAL_RANK``, or, with ``--gpus-per-rank k`` and a model too big
for one GPU, a ``device_map="auto"`` replica over GPUs ``[k * LOCAL_RANK, k * (LOCAL_RANK + 1))``
(run ``--nproc_per_node = n_gpus / k``).

``ablation_curve_distributed`` shards an ablation sweep the same way: its (job, batch) units are
dealt round-robin, each unit's (correct, log-prob sum, n) is gathered and summed per job in
batch order, which reproduces ``ablation.ablation_curve``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from corelens.head_scores import HeadScores
from corelens.ram import (
    MEAN_METRICS,
    RATIO_METRICS,
    RamMetric,
    RamParams,
    batch_record,
    merge_records,
)

#: Testing aid: ``"<rank>:<n>"`` makes that rank exit (status 17) right after writing its n-th
#: batch record, as a crash would. Never set it in real runs.
FAIL_ENV = "CORELENS_DIST_FAIL_AFTER"


# ------------------------------------------------------------------------------ process group
def init(backend: str = "auto", gpus_per_rank: int = 1) -> tuple[int, int]:
    """Join the ``torchrun`` process group (or run alone when not under ``torchrun``).

    ``backend="auto"``: NCCL when CUDA is available, else gloo (under NCCL the current CUDA
    device becomes the rank's first GPU). Returns (rank, world_size)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or not dist.is_available():
        return 0, 1
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(_first_gpu(int(os.environ.get("LOCAL_RANK", 0)), gpus_per_rank))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _first_gpu(local_rank: int, gpus_per_rank: int = 1) -> int:
    return local_rank * gpus_per_rank


_GLOO: Any = None


def _group() -> Any:
    """A gloo group for the (small, CPU-side) object exchanges, whatever the main backend."""
    global _GLOO
    if _GLOO is None:
        _GLOO = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _GLOO


def _shutdown() -> None:
    global _GLOO
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _GLOO = None


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj: Any) -> list[Any]:
    rank, world = _world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=_group())
    return out


def _gather_to_0(obj: Any) -> list[Any] | None:
    rank, world = _world()
    if world == 1:
        return [obj]
    out: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=_group())
    return out


# ----------------------------------------------------------------------------- partial files
def rank_file(partial: str | Path, rank: int) -> Path:
    """``<partial>.rank{r}.jsonl`` (a ``.jsonl`` suffix of ``partial`` is dropped first)."""
    p = Path(partial)
    stem = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    return p.with_name(f"{stem}.rank{rank}.jsonl")


def partial_files(partial: str | Path) -> list[Path]:
    """Every partial file of a run: all ranks' files of any world size, and ``partial`` itself
    (a single-process ``score_all`` file has the same records)."""
    p = Path(partial)
    stem = p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.name
    files = sorted(p.parent.glob(f"{stem}.rank*.jsonl")) if p.parent.is_dir() else []
    return ([p] if p.is_file() else []) + files


def read_records(files: Sequence[Path], key: str = "batch",
                 convert: Any = None) -> dict[Any, dict[str, Any]]:
    """Records by ``key`` from JSONL files; unparsable lines (a torn write) are skipped.
    ``convert(record)``, if given, is applied to each record as it is read."""
    done: dict[Any, dict[str, Any]] = {}
    for f in files:
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn by a crash mid-write: that unit is redone
            k = rec[key] if not isinstance(rec[key], list) else tuple(rec[key])
            if k not in done:
                done[k] = convert(rec) if convert is not None else rec
    return done


class _Writer:
    """Appends records to one rank's file, each flushed and fsynced before the next batch."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.written = 0
        fail = os.environ.get(FAIL_ENV, "")
        r, n = fail.split(":") if fail else ("-1", "0")
        self._fail_after = int(n) if int(r) == _world()[0] else None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_file() and path.stat().st_size:
                with path.open("rb") as f:
                    f.seek(-1, os.SEEK_END)
                    torn = f.read(1) != b"\n"
                if torn:  # keep the next record on its own line
                    with path.open("a") as f:
                        f.write("\n")

    def write(self, rec: dict[str, Any]) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.written += 1
        if self._fail_after is not None and self.written >= self._fail_after:
            os._exit(17)


def _check_run(done: dict[Any, dict[str, Any]], batch_size: int, n_examples: int,
               params: dict[str, Any]) -> None:
    for rec in done.values():
        bs, n, p = rec.get("batch_size"), rec.get("n_examples"), rec.get("params")
        if ((bs is not None and bs != batch_size) or (n is not None and n != n_examples)
                or (p is not None and p != params)):
            raise ValueError(
                f"the partial files hold batches of another run (batch size {bs}, {n} "
                f"examples, params {p}; this run: {batch_size}, {n_examples}, {params}): use "
                "a new --partial")


def _compact(rec: dict[str, Any]) -> dict[str, Any]:
    """A scoring record with its lists as float32 tensors (the very conversion ``merge_records``
    makes, so nothing changes): 4 bytes a value in memory and in the gather, not ~32."""
    out = dict(rec)
    out["values"] = {k: torch.tensor(v) for k, v in rec["values"].items()}
    out["n_evidence"], out["n_vision"] = (torch.tensor(rec["n_evidence"]),
                                          torch.tensor(rec["n_vision"]))
    return out


def _deal(done_ids: list[set[Any]], all_ids: Sequence[Any], rank: int, world: int) -> list[Any]:
    """The units this rank runs: the missing ones, dealt round-robin in global order."""
    done = set().union(*done_ids)
    todo = [u for u in all_ids if u not in done]
    return todo[rank::world]


# ------------------------------------------------------------------------------- RAM scoring
def score_all_distributed(
    model: Any,
    examples: Sequence[Any],
    *,
    batch_size: int = 8,
    params: RamParams | None = None,
    partial: str | Path | None = None,
    dataset: str = "",
    progress: bool = True,
) -> dict[str, HeadScores] | None:
    """``ram.score_all`` over the ranks of the current process group (see the module doc).

    Every rank calls it with the same ``examples`` (same order), ``batch_size`` and ``params``.
    Returns ``{metric: HeadScores}`` on rank 0 — equal to ``score_all`` on one process — and
    None on the other ranks. Without a process group it runs alone (world size 1).
    ``partial``: where the per-rank files go (``<partial>.rank{r}.jsonl``); reruns resume."""
    params = params or RamParams()
    rank, world = _world()
    n_batches = math.ceil(len(examples) / batch_size)
    seen = read_records(partial_files(partial), convert=_compact) if partial is not None else {}
    _check_run(seen, batch_size, len(examples), asdict(params))
    done_ids = _all_gather(set(seen))
    mine = _deal(done_ids, range(n_batches), rank, world)
    writer = _Writer(rank_file(partial, rank) if partial is not None else None)
    metric = RamMetric(model, params)
    new: dict[int, dict[str, Any]] = {}
    for b in tqdm(mine, desc=f"scoring heads (rank {rank}/{world})", unit="batch",
                  disable=not progress or rank != 0):
        rec = batch_record(model, metric, examples[b * batch_size:(b + 1) * batch_size], b)
        rec.update(batch_size=batch_size, n_examples=len(examples), params=asdict(params))
        writer.write(rec)
        new[b] = _compact(rec)
    # what each rank sends: its new records, and old ones it is the first rank to have seen
    owned = {b: rec for b, rec in seen.items()
             if min(r for r, ids in enumerate(done_ids) if b in ids) == rank}
    owned.update(new)
    del seen, new
    gathered = _gather_to_0(owned)
    if gathered is None:
        return None
    recs: dict[int, dict[str, Any]] = {}
    for part in gathered:
        recs.update(part)
    missing = [b for b in range(n_batches) if b not in recs]
    if missing:
        raise RuntimeError(f"batches {missing[:10]} were neither found nor computed")
    name = getattr(model.cfg, "model_name", "") or ""
    return merge_records([recs[b] for b in range(n_batches)], params, model=str(name),
                         dataset=dataset)


# ---------------------------------------------------------------------------- ablation sweep
def ablation_curve_distributed(
    model: Any,
    examples: Sequence[Any],
    scores: Any,
    fracs: Sequence[float] = (0.02, 0.05, 0.1, 0.2),
    baselines: Sequence[str] = ("random", "bottom"),
    seeds: Sequence[int] = tuple(range(8)),
    *,
    method: str = "zero",
    batch_size: int = 16,
    reference: Any = None,
    partial: str | Path | None = None,
    progress: bool = True,
) -> Any:
    """``ablation.ablation_curve`` with its (job, batch) units dealt over the ranks.

    Same arguments (plus ``partial``, resumed like scoring). Returns the ``AblationCurve`` on
    rank 0, None elsewhere."""
    from corelens.ablation import AblationCurve, ablation_jobs, score_batch

    rank, world = _world()
    starts = list(range(0, len(examples), batch_size))
    ks, jobs = ablation_jobs(model.cfg.n_layers, model.cfg.n_heads, scores.rank(), fracs,
                             baselines, seeds)  # the job list of ablation_curve, in its order
    units = [(j, b) for j in range(len(jobs)) for b in range(len(starts))]
    seen = read_records(partial_files(partial), key="unit") if partial is not None else {}
    for rec in seen.values():
        if rec.get("jobs") != len(jobs) or rec.get("batch_size") != batch_size:
            raise ValueError("the partial files hold units of another sweep: use a new --partial")
    done_ids = _all_gather(set(seen))
    mine = _deal(done_ids, units, rank, world)
    writer = _Writer(rank_file(partial, rank) if partial is not None else None)
    batches: dict[int, Any] = {}
    new: dict[tuple[int, int], dict[str, Any]] = {}
    for j, b in tqdm(mine, desc=f"ablation curve (rank {rank}/{world})", unit="unit",
                     disable=not progress or rank != 0):
        if b not in batches:
            batches[b] = model.prepare_examples(examples[starts[b]:starts[b] + batch_size])
        correct, lp_sum, n = score_batch(model, batches[b], jobs[j][2], method, reference)
        rec = {"unit": [j, b], "correct": correct, "logprob": lp_sum, "n": n,
               "jobs": len(jobs), "batch_size": batch_size}
        writer.write(rec)
        new[(j, b)] = rec
    owned = {u: rec for u, rec in seen.items()
             if min(r for r, ids in enumerate(done_ids) if u in ids) == rank}
    owned.update(new)
    gathered = _gather_to_0(owned)
    if gathered is None:
        return None
    recs: dict[tuple[int, int], dict[str, Any]] = {}
    for part in gathered:
        recs.update(part)
    acc: dict[str, Any] = {"top": [None] * len(ks), "bottom": [None] * len(ks),
                           "random_seeds": [[] for _ in ks]}
    lps: dict[str, Any] = {"top": [None] * len(ks), "bottom": [None] * len(ks),
                           "random_seeds": [[] for _ in ks]}
    for j, (kind, i, _) in enumerate(jobs):
        correct, logprob, n = 0.0, 0.0, 0
        for b in range(len(starts)):  # batch order, as _score_batches sums
            rec = recs[(j, b)]
            correct += rec["correct"]
            logprob += rec["logprob"]
            n += rec["n"]
        a, lp = correct / n, logprob / n
        if kind == "none":
            acc["none"], lps["none"] = a, lp
        elif kind.startswith("random"):
            acc["random_seeds"][i].append(a)
            lps["random_seeds"][i].append(lp)
        else:
            acc[kind][i], lps[kind][i] = a, lp
    return AblationCurve(list(fracs), ks, method, getattr(scores, "metric", ""), len(examples),
                         {"accuracy": acc, "logprob": lps})


# -------------------------------------------------------------------------------- entry point
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="corelens score --distributed",
        description="Data-parallel RAM scoring; launch with torchrun "
                    "(torchrun --nproc_per_node N -m corelens.distributed ...).")
    p.add_argument("--model", required=True, help="model folder (offline) or hub id")
    p.add_argument("--data", required=True, help="grounded examples, corelens JSONL "
                   "(corelens.loaders.load_jsonl)")
    p.add_argument("--out", required=True, help="output JSON: the --metric HeadScores, or with "
                   "--metric all a {metric: HeadScores dict} JSON")
    p.add_argument("--metric", default="ram",
                   choices=list(MEAN_METRICS + RATIO_METRICS) + ["all"])
    p.add_argument("--batch-size", type=int, default=8, help="examples per global batch")
    p.add_argument("--partial", default=None, help="partial-results prefix: ranks append to "
                   "<partial>.rank{r}.jsonl; rerun with the same value to resume "
                   "(default: <out>.partial)")
    p.add_argument("--tau", type=float, default=RamParams.tau)
    p.add_argument("--query", default=RamParams.query, choices=["answer", "last_prompt"])
    p.add_argument("--mass-floor", type=float, default=RamParams.mass_floor)
    p.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the "
                   "checkpoint's)")
    p.add_argument("--device", default=None, help="device of each rank's replica (default: "
                   "cuda:<first gpu of the rank> when CUDA is available, else cpu)")
    p.add_argument("--gpus-per-rank", type=int, default=1, help="k > 1: each rank loads the "
                   "model with device_map='auto' over its own k GPUs (models that do not fit one)")
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank")
    p.add_argument("--dataset", default=None, help="dataset name recorded in the scores "
                   "(default: the data file's name)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main_score(argv: Sequence[str] | None = None) -> int:
    """``corelens score --distributed``: score every head of a model on a JSONL set with RAM &
    co., data-parallel over the ``torchrun`` ranks (alone without ``torchrun``). Rank 0 writes
    ``--out``. Returns the exit status."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from corelens.loaders import load_jsonl
    from corelens.model import HookedMLLM

    rank, world = init(args.backend, args.gpus_per_rank)
    try:
        local = int(os.environ.get("LOCAL_RANK", 0))
        kw: dict[str, Any] = {}
        if args.gpus_per_rank > 1:
            first = _first_gpu(local, args.gpus_per_rank)
            gpus = range(first, first + args.gpus_per_rank)
            kw["device_map"] = "auto"
            # 85 % for weights: the rest stays free for the activations of a batch
            kw["max_memory"] = {g: int(0.85 * torch.cuda.get_device_properties(g).total_memory)
                                for g in gpus}
            device = None
        else:
            device = args.device or (f"cuda:{_first_gpu(local)}" if torch.cuda.is_available()
                                     else "cpu")
        model = HookedMLLM.from_pretrained(args.model, device=device, dtype=args.dtype, **kw)
        examples = load_jsonl(args.data)
        params = RamParams(tau=args.tau, query=args.query, mass_floor=args.mass_floor)
        partial = args.partial if args.partial is not None else f"{args.out}.partial"
        result = score_all_distributed(
            model, examples, batch_size=args.batch_size, params=params, partial=partial,
            dataset=args.dataset if args.dataset is not None else Path(args.data).name,
            progress=not args.no_progress)
        if result is not None:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            if args.metric == "all":
                out.write_text(json.dumps({k: v.to_dict() for k, v in result.items()}, indent=1))
            else:
                if args.metric not in result:
                    print(f"metric {args.metric!r} was not computed (no distractor boxes?); "
                          f"have: {sorted(result)}", file=sys.stderr)
                    return 2
                result[args.metric].save(out)
            print(f"wrote {out} ({len(examples)} examples, {world} rank(s))")
        if world > 1:
            dist.barrier(group=_group())
    finally:
        _shutdown()
    return 0


def _ablation_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="corelens ablate --distributed",
        description="Data-parallel ablation curve (top-k vs random-k vs bottom-k heads); "
                    "launch with torchrun (... -m corelens.distributed ablation ...).")
    p.add_argument("--model", required=True, help="model folder (offline) or hub id")
    p.add_argument("--data", required=True, help="grounded examples, corelens JSONL")
    p.add_argument("--scores", required=True, help="HeadScores JSON to rank heads by")
    p.add_argument("--out", required=True, help="output JSON (AblationCurve.save)")
    p.add_argument("--fracs", default="0.02,0.05,0.1,0.2", help="comma-separated fractions")
    p.add_argument("--seeds", type=int, default=8, help="random-head draws per fraction")
    p.add_argument("--baselines", default="random,bottom")
    p.add_argument("--method", default="zero", choices=["zero", "mean", "resample", "knockout"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--partial", default=None, help="partial-results prefix (default: "
                   "<out>.partial); rerun with the same value to resume")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p


def main_ablation(argv: Sequence[str] | None = None) -> int:
    """``corelens ablate --distributed``: ``ablation_curve`` with its (job, batch) units dealt
    over the ``torchrun`` ranks; rank 0 writes ``--out``. Returns the exit status."""
    args = _ablation_parser().parse_args(list(argv) if argv is not None else None)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from corelens.loaders import load_jsonl
    from corelens.model import HookedMLLM

    rank, world = init(args.backend)
    try:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = args.device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
        model = HookedMLLM.from_pretrained(args.model, device=device, dtype=args.dtype)
        curve = ablation_curve_distributed(
            model, load_jsonl(args.data), HeadScores.load(args.scores),
            fracs=[float(f) for f in args.fracs.split(",")],
            baselines=[b for b in args.baselines.split(",") if b],
            seeds=tuple(range(args.seeds)), method=args.method, batch_size=args.batch_size,
            partial=args.partial if args.partial is not None else f"{args.out}.partial",
            progress=not args.no_progress)
        if curve is not None:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            curve.save(args.out)
            print(f"wrote {args.out} ({world} rank(s))")
        if world > 1:
            dist.barrier(group=_group())
    finally:
        _shutdown()
    return 0


def _main(argv: Sequence[str]) -> int:
    if argv and argv[0] == "ablation":
        return main_ablation(argv[1:])
    return main_score(argv[1:] if argv and argv[0] == "score" else argv)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

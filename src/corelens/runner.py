"""One resumable, shardable loop for long runs: head scoring and ablation curves use it, on one
process and under ``torchrun`` alike.

A run is a list of *units* (a batch, a (job, batch) pair...), each computed by a function that
returns a JSON-able record. ``run_units``:

- reads the records of finished units from the run's partial files and skips those units;
- deals the missing units round-robin over the ranks of the process group (rank r takes the
  r-th, (r + W)-th, ... of them; one process alone takes them all);
- appends each new record to its rank's file as it finishes, flushed and fsynced: on one process
  without ``torchrun`` the file is ``partial`` itself, under ``torchrun`` it is
  ``<partial>.rank{r}.jsonl`` (``<partial>`` without a ``.jsonl`` suffix);
- gathers every record to rank 0 (over a gloo group, whatever the backend) and returns them by
  unit there, None on the other ranks.

A rerun after a crash (same ``partial``, any world size) reads every ``<partial>.rank*.jsonl`` and
``partial`` itself: the finished units are the union over all of them. A torn last line (a
process killed mid-write) is ignored and its unit redone. Each record carries the run's
identity (``run=``: batch size, number of examples, parameters...): partial files of another
run are refused, never mixed in.

Backend: NCCL when the ranks run on CUDA, gloo on CPU (``init(backend="auto")``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

#: Testing aid: ``"<rank>:<n>"`` makes that rank exit (status 17) right after writing its n-th
#: record, as a crash would. Never set it in real runs.
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
        torch.cuda.set_device(first_gpu(int(os.environ.get("LOCAL_RANK", 0)), gpus_per_rank))
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def first_gpu(local_rank: int, gpus_per_rank: int = 1) -> int:
    """The first GPU of a rank that owns ``gpus_per_rank`` consecutive GPUs."""
    return local_rank * gpus_per_rank


_GLOO: Any = None


def _group() -> Any:
    """A gloo group for the (small, CPU-side) object exchanges, whatever the main backend."""
    global _GLOO
    if _GLOO is None:
        _GLOO = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _GLOO


def barrier() -> None:
    """Wait for every rank (no-op alone)."""
    if world()[1] > 1:
        dist.barrier(group=_group())


def shutdown() -> None:
    """Leave the process group, if any."""
    global _GLOO
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _GLOO = None


def world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(obj: Any) -> list[Any]:
    if world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, obj, group=_group())
    return out


def _gather_to_0(obj: Any) -> list[Any] | None:
    rank, size = world()
    if size == 1:
        return [obj]
    out: list[Any] | None = [None] * size if rank == 0 else None
    dist.gather_object(obj, out, dst=0, group=_group())
    return out


# ----------------------------------------------------------------------------- partial files
def _stem(p: Path) -> str:
    return p.name[: -len(".jsonl")] if p.name.endswith(".jsonl") else p.name


def rank_file(partial: str | Path, rank: int) -> Path:
    """``<partial>.rank{r}.jsonl`` (a ``.jsonl`` suffix of ``partial`` is dropped first)."""
    p = Path(partial)
    return p.with_name(f"{_stem(p)}.rank{rank}.jsonl")


def partial_files(partial: str | Path) -> list[Path]:
    """Every partial file of a run: ``partial`` itself (one process) and all ranks' files of
    any world size."""
    p = Path(partial)
    files = sorted(p.parent.glob(f"{_stem(p)}.rank*.jsonl")) if p.parent.is_dir() else []
    return ([p] if p.is_file() else []) + files


def _unit_key(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value


def read_records(files: Sequence[Path]) -> dict[Hashable, dict[str, Any]]:
    """Records by unit from JSONL files; unparsable lines (a torn write) are skipped."""
    done: dict[Hashable, dict[str, Any]] = {}
    for f in files:
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn by a crash mid-write: that unit is redone
            done.setdefault(_unit_key(rec["unit"]), rec)
    return done


class _Writer:
    """Appends records to one file, each flushed and fsynced before the next unit."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.written = 0
        fail = os.environ.get(FAIL_ENV, "")
        r, n = fail.split(":") if fail else ("-1", "0")
        self._fail_after = int(n) if int(r) == world()[0] else None
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


# ------------------------------------------------------------------------------------ the loop
def run_units(
    units: Sequence[Hashable],
    compute: Callable[[Any], dict[str, Any]],
    *,
    partial: str | Path | None = None,
    run: dict[str, Any] | None = None,
    compact: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    desc: str = "",
    progress: bool = True,
) -> dict[Hashable, dict[str, Any]] | None:
    """Compute every unit once (see the module doc): ``{unit: record}`` on rank 0, None on the
    other ranks.

    ``compute(unit)`` returns the unit's JSON-able record; ``run`` is stored in every record and
    must match on resume; ``compact(record)``, if given, converts a record as it is kept in
    memory and sent to rank 0 (e.g. lists to float32 tensors)."""
    rank, size = world()
    run = run or {}
    keep = compact or (lambda r: r)
    seen = read_records(partial_files(partial)) if partial is not None else {}
    for rec in seen.values():
        if rec.get("run") != run:
            raise ValueError(
                f"the partial files of {partial} hold units of another run ({rec.get('run')}; "
                f"this run: {run}): use a new partial path")
    seen = {u: keep(r) for u, r in seen.items()}
    done_ids = _all_gather(set(seen))
    finished = set().union(*done_ids)
    mine = [u for u in units if u not in finished][rank::size]
    path = None
    if partial is not None:
        grouped = dist.is_available() and dist.is_initialized()
        path = Path(partial) if size == 1 and not grouped else rank_file(partial, rank)
    writer = _Writer(path)
    new: dict[Hashable, dict[str, Any]] = {}
    label = f"{desc} (rank {rank}/{size})" if size > 1 else desc
    for u in tqdm(mine, desc=label, unit="unit", disable=not progress or rank != 0):
        rec = compute(u)
        rec.update(unit=list(u) if isinstance(u, tuple) else u, run=run)
        writer.write(rec)
        new[u] = keep(rec)
    # what each rank sends: its new records, and old ones it is the first rank to have seen
    owned = {u: rec for u, rec in seen.items()
             if min(r for r, ids in enumerate(done_ids) if u in ids) == rank}
    owned.update(new)
    del seen, new
    gathered = _gather_to_0(owned)
    if gathered is None:
        return None
    out: dict[Hashable, dict[str, Any]] = {}
    for part in gathered:
        out.update(part)
    missing = [u for u in units if u not in out]
    if missing:
        raise RuntimeError(f"units {missing[:10]} were neither found nor computed")
    return out

"""What ``corelens score`` and ``corelens ablate`` share: the model replica of this rank."""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Any, Iterator

import torch

from corelens import runner
from corelens.core.model import HookedMLLM
from corelens.runner import first_gpu


def add_rank_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--distributed", action="store_true", help="accepted for older scripts: "
                   "under torchrun the run is data-parallel anyway")
    p.add_argument("--partial", default=None, help="partial-results file: appended as units "
                   "finish (under torchrun: <partial>.rank{r}.jsonl per rank); rerun with the "
                   "same value to resume (default: <out>.partial)")
    p.add_argument("--dtype", default=None, help="model dtype, e.g. bfloat16 (default: the "
                   "checkpoint's)")
    p.add_argument("--device", default=None, help="device of each rank's replica (default: "
                   "cuda:<first gpu of the rank> when CUDA is available, else cpu)")
    p.add_argument("--gpus-per-rank", type=int, default=1, help="k > 1: each rank loads the "
                   "model with device_map='auto' over its own k GPUs (models that do not fit one)")
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "gloo"])
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank")
    p.add_argument("--no-progress", action="store_true")


def load_replica(args: argparse.Namespace) -> Any:
    """This rank's ``HookedMLLM``: on its own GPU, over its own k GPUs, or on the CPU."""
    local = int(os.environ.get("LOCAL_RANK", 0))
    kw: dict[str, Any] = {}
    device = None
    if args.gpus_per_rank > 1:
        first = first_gpu(local, args.gpus_per_rank)
        kw["device_map"] = "auto"
        # 85 % for weights: the rest stays free for the activations of a batch
        kw["max_memory"] = {g: int(0.85 * torch.cuda.get_device_properties(g).total_memory)
                            for g in range(first, first + args.gpus_per_rank)}
    else:
        device = args.device or (f"cuda:{first_gpu(local)}" if torch.cuda.is_available()
                                 else "cpu")
    return HookedMLLM.from_pretrained(args.model, device=device, dtype=args.dtype, **kw)


@contextlib.contextmanager
def rank_session(args: argparse.Namespace) -> Iterator[tuple[Any, int]]:
    """Join the ``torchrun`` group (alone without one), load this rank's replica; yield
    (model, world size); wait for every rank, then leave the group."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    _, world = runner.init(args.backend, args.gpus_per_rank)
    try:
        yield load_replica(args), world
        runner.barrier()
    finally:
        runner.shutdown()

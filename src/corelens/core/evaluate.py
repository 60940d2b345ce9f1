"""``evaluate``: teacher-forced answer accuracy and log-probs of a model on grounded examples."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from corelens.errors import InputError


@dataclass
class EvalResult:
    """Per-example results of ``evaluate``.

    ``logprobs[e]``: the answer's log-probability, summed over its tokens (teacher forcing);
    ``correct[e]``: the greedy argmax at every query position equals the answer token there;
    ``predictions[e]``: those argmax tokens, decoded. ``logprobs`` is ``Float[Tensor, "n"]``
    and ``correct`` ``Bool[Tensor, "n"]``, one entry per example; ``accuracy`` and
    ``mean_logprob`` are their means.

    Example:
        ```python
        from corelens import evaluate, zoo

        model = zoo.load("toy-llava")
        result = evaluate(model, zoo.examples("toy-llava", 8, seed=0), progress=False)
        result.accuracy, result.mean_logprob  # floats: means over the 8 examples
        result.correct  # Bool[Tensor, "n"]: [8]
        result.predictions[:2], result.answers[:2]  # decoded argmax vs the answers
        ```
    """

    logprobs: Float[Tensor, " n"]
    correct: Tensor
    predictions: list[str]
    answers: list[str]
    ids: list[str | None] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean()) if len(self.correct) else float("nan")

    @property
    def mean_logprob(self) -> float:
        return float(self.logprobs.mean()) if len(self.logprobs) else float("nan")

    def __len__(self) -> int:
        return len(self.answers)

    def __repr__(self) -> str:
        return (f"EvalResult(n={len(self)}, accuracy={self.accuracy:.4f}, "
                f"mean_logprob={self.mean_logprob:.4f})")


@torch.no_grad()
def evaluate(model: Any, examples: Sequence[Any], batch_size: int = 32,
             progress: bool = True) -> EvalResult:
    """Run ``model`` (a ``HookedMLLM``; active hooks and ablations apply) on ``examples``
    (``GroundedExample``s) in batches and score each answer under teacher forcing.

    Returns an ``EvalResult``: per example the answer's summed log-prob (``logprobs``,
    ``Float[Tensor, "n"]``) and whether the greedy tokens are the answer (``correct``,
    ``Bool[Tensor, "n"]``).

    Example:
        ```python
        from corelens import ablate, evaluate, zoo

        model = zoo.load("toy-llava")
        examples = zoo.examples("toy-llava", 32, seed=0)
        evaluate(model, examples, progress=False).accuracy  # the toy model: 1.0
        with ablate(model, [(0, 1), (0, 2)]):  # hooks and ablations apply inside
            evaluate(model, examples, progress=False).accuracy
        ```
    """
    from tqdm import tqdm

    examples = list(examples)
    logprobs, correct, preds, answers, ids = [], [], [], [], []
    starts = range(0, len(examples), batch_size)
    for i in tqdm(starts, desc="evaluate", unit="batch", disable=not progress):
        chunk = examples[i:i + batch_size]
        batch = model.prepare_examples(chunk)
        lp, ok, arg = score_logits(model(batch, logits_to_keep=batch.logits_to_keep), batch)
        logprobs += list(lp.cpu())
        correct += ok.tolist()
        preds += [model.tokenizer.decode(a.tolist()) for a in arg]
        answers += [str(ex.answer) for ex in chunk]
        ids += [ex.id for ex in chunk]
    return EvalResult(torch.stack(logprobs) if logprobs else torch.zeros(0),
                      torch.tensor(correct, dtype=torch.bool), preds, answers, ids)


def query_metric(metric: Callable) -> Callable:
    """Mark ``metric(logits, batch)`` as reading logits only at ``batch.query_positions``:
    forwards run for it compute the logits there only (``logits_to_keep``)."""
    metric.reads_query_positions_only = True  # type: ignore[attr-defined]
    return metric


def logits_to_keep(metric: Callable | None, batch: Any) -> int:
    """HF's ``logits_to_keep`` for a forward of ``batch`` read by ``metric``: the final
    positions holding the query positions for a ``query_metric``, else 0 (every position)."""
    return batch.logits_to_keep if getattr(metric, "reads_query_positions_only", False) else 0


def window_offset(seq_len: int, kept: int, positions: Tensor) -> int:
    """Where position 0 of logits over the last ``kept`` of ``seq_len`` positions (a forward
    with ``logits_to_keep=kept``) sits in the sequence; an ``InputError`` if ``positions`` reach
    before it (they would index from the end silently)."""
    offset = seq_len - kept
    if offset and int(positions.min()) < offset:
        raise InputError(f"the logits cover the last {kept} of {seq_len} positions, not "
                         f"position {int(positions.min())}: run the forward with "
                         "logits_to_keep=batch.logits_to_keep (or 0 for all)")
    return offset


def rows_at(logits: Float[Tensor, "batch k vocab"], batch: Any, example: int | Tensor,
            positions: Tensor) -> Float[Tensor, "n vocab"]:
    """``logits[example, positions]`` for logits over the whole sequence or over its last
    ``k`` positions only (a forward with ``logits_to_keep=k``)."""
    return logits[example, positions - window_offset(batch.seq_len, logits.shape[1], positions)]


def metric_value(model: Any, batch: Any, metric: Callable) -> float:
    """``metric(logits, batch)`` of the unpatched forward, averaged over the batch (logits
    only where a ``query_metric`` reads them)."""
    with torch.no_grad():
        logits = model(batch, logits_to_keep=logits_to_keep(metric, batch))
    return float(metric(logits, batch).mean())


@query_metric
def score_logits(logits: Tensor, batch: Any) -> tuple[Float[Tensor, " n"], Tensor, list[Tensor]]:
    """Per example of ``batch``: the answer's log-prob summed over its tokens (teacher
    forcing), whether the argmax at every query position is the answer token, and that argmax.
    ``logits`` may cover only the final ``batch.logits_to_keep`` positions."""
    logprobs, correct, argmax = [], [], []
    for e, (q, a) in enumerate(zip(batch.query_positions, batch.answer_tokens)):
        q, a = q.to(logits.device), a.to(logits.device)
        rows = torch.log_softmax(rows_at(logits, batch, e, q).float(), dim=-1)  # [n_ans, vocab]
        logprobs.append(rows.gather(-1, a[:, None]).sum())
        arg = rows.argmax(-1)
        correct.append(bool((arg == a).all()))
        argmax.append(arg.cpu())
    return torch.stack(logprobs), torch.tensor(correct, dtype=torch.bool), argmax

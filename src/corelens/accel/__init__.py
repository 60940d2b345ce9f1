"""CoRe-guided hybrid attention, and its baselines (full attention, FastV, random heads).

``HybridAttention(model, heads)`` runs the decoder with two kinds of heads:

- **full heads** — the CoRe heads (a list of ``(layer, query head)``, e.g.
  ``HeadScores.top(0.1)``) attend to every token, exactly like the model's own attention. Under
  GQA the cache's unit is a KV head: a KV head keeps every token if ANY of its query heads is a
  CoRe head (a *full group*); the group's other query heads are streaming heads like any other,
  reading the streaming key set from the group's full cache (in prefill they skip the vision
  keys in compute; in decoding the group's cache is read once for all of its query heads).
  ``HybridAttention.from_scores(..., kv_budget=, frac=)`` plans the groups to a KV budget.
- **streaming heads** — every other head. For EVERY query row ``i`` (vision rows included in
  prefill; ``i`` = index in the sequence, padding included), a streaming head sees exactly the
  keys ``j`` that the model's own attention lets row ``i`` see (causal, not padding; Gemma 3:
  also later tokens of ``i``'s own image block, and only ``j > i - sliding_window`` on a
  sliding-window layer) and that are

  1. a sink: one of the first ``n_sink`` non-padding tokens of the example;
  2. in the window: ``|i - j| <= window`` (under a causal mask: the query itself and the
     ``window`` tokens before it; inside a Gemma 3 image block also the ``window`` tokens after
     it, as its own attention is bidirectional there);
  3. a text token: any token that is not an image-feature token of the batch's ``VisionLayout``
     (delimiters, prompt, answer and generated tokens are all text);

  plus, if ``n_pooled > 0`` (causal models without sliding windows only), ``n_pooled``
  summaries of each example's vision tokens (minus sinks): those tokens, in sequence order,
  split into ``n_pooled`` contiguous chunks; a summary's key / value is the mean of its chunk's
  (rotated) keys / values, its score gets ``+ log(chunk size)`` (it stands for that many
  tokens), and row ``i`` sees it once the chunk's last token is ``<= i``. A summary is seen in
  addition to any of its tokens that are in the window.

  So on a sliding-window layer a streaming head sees the sinks and text only while they are
  inside the layer's own window: it never sees a key its full-attention self would not.

The saving is real: streaming heads are computed over a gathered key set (sinks + text +
summaries, then the window as a band: queries in blocks of ``window`` rows against a slab of
``2 * window`` keys, ``3 * window`` with bidirectional image blocks), never as full attention
with a mask: one SDPA call per layer for all of them (the slabs built once per KV head). In
cached decoding (``generate`` / ``prefill`` + ``decode_step``) the vision keys / values are
stored only for full KV heads (with the pooled summaries, if any, for their streaming query
heads); streaming KV heads keep sinks, text, summaries and the last ``window`` prompt tokens.
A step folds each KV group's query heads into rows: each cache is read once per group.
Sliding-window layers hold only what the next token can still see (original index
``> i - sliding_window``): the others are freed, as in Gemma's own cache.

Baselines: ``full`` (the model as is), ``HybridAttention.random`` (random KV heads at the same
KV-head budget) and ``FastV`` (after layer ``k``, drop ``ratio`` of the vision tokens that get
the least attention from the last prompt position, averaged over heads; the later layers never
compute them, and their KV cache never holds them).

Supported families: ``PREFILL_FAMILIES`` (hybrid prefill and FastV prefill) and
``DECODE_FAMILIES`` (hybrid and FastV cached decoding): every registered family. FastV decodes
on its own ``FastVCache`` (each cached key keeps its original sequence index, so Gemma 3's
sliding windows apply by position on a pruned layer, and expired keys are freed). Under
M-RoPE (Qwen-VL) a generated token's position id is the prompt's largest id + 1 (+ 1 per
step), the same in all three rows, as HF's ``rope_deltas`` give; FastV's kept tokens keep their
own (3-D) ids, and Qwen3-VL's DeepStack features reach only the kept tokens after the pruning layer.

Example:
    ```python
    from corelens import evaluate, zoo
    from corelens.accel import FastV, HybridAttention
    from corelens.scores.ram import score_all

    model = zoo.load("toy-llava-deep")
    examples = zoo.examples("toy-llava-deep", 32, seed=0)
    core = score_all(model, examples, progress=False)["ram"].top(frac=0.1)
    hybrid = HybridAttention(model, core, n_sink=4, window=8)
    with hybrid.attach():  # CoRe heads full, the others streaming
        evaluate(model, examples, progress=False).accuracy
    with FastV(model, k=2, ratio=0.5).attach():  # the baseline: half the vision tokens dropped
        evaluate(model, examples, progress=False).accuracy
    tokens = hybrid.generate(model.prepare_examples(examples[:2]), max_new_tokens=3)
    tokens.shape  # Int[Tensor, "batch new"]: [2, 3]
    ```
"""

from corelens.accel.cache import FastVCache, HybridCache, cache_nbytes
from corelens.accel.fastv import FastV
from corelens.accel.hybrid import DECODE_FAMILIES, PREFILL_FAMILIES, HybridAttention

__all__ = ["DECODE_FAMILIES", "PREFILL_FAMILIES", "FastV", "FastVCache", "HybridAttention",
           "HybridCache", "cache_nbytes"]

"""``Intervention``: what reads or changes a model's forwards while it is attached.

``RamMetric`` (reads the attention rows of the query positions), ``HybridAttention`` and
``FastV`` (change which keys each head sees) all implement it, so code that runs "the model under
X" -- ``corelens accelerate``'s variants, the report -- takes any of them:

    with intervention.attach(batch):   # or attach() to follow every batch the model runs on
        model(batch)

Ablation and patching are context managers over hook edits (``ablate(model, heads)``, the
``Edit`` lists of ``corelens.interventions.core``): the same lifetime, without an object.
"""

from __future__ import annotations

from typing import Any, ContextManager, Protocol, runtime_checkable

from corelens.data.batch import MultimodalBatch


@runtime_checkable
class Intervention(Protocol):
    def attach(self, batch: MultimodalBatch | None = None) -> ContextManager[Any]:
        """Active within the ``with`` block: for ``batch``, or (where the intervention can
        plan per batch; ``RamMetric`` cannot) for each ``MultimodalBatch`` the model runs on."""
        ...

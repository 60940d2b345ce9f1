"""Gradient-based attribution: AtP, AtP* (QK fix, GradDrop), EAP and EAP-IG.

Same conventions as ``corelens.patching``: the *target* run is the one differentiated, the
*source* supplies the patched activations, ``metric(logits, batch) -> [batch]`` is averaged over
examples, and every forward carries the whole ``MultimodalBatch`` (images, position ids).

Nodes (``attribute_heads``): ``"z"`` a head's output (what ``patch_heads`` patches), ``"q"`` a
query head's query input (``hook_q``), ``"k"`` / ``"v"`` a KV head's key / value input (one per
KV group under GQA).

- AtP (Nanda 2023; Kramar et al. 2024): grad(metric at target) . (a_source - a_target), summed
  over positions and features — a first-order estimate of ``patch_heads(..., node) - baseline``.
- AtP* (Kramar et al. 2024) adds (a) the QK fix: for a q (k) node the attention pattern of the
  head (of every head of the KV group) is recomputed exactly with the source's queries (keys)
  and only the step from the pattern to the metric is linearised,
  ``sum grad_pattern . (pattern_patched - pattern_target)``; and (b) GradDrop: for each layer l
  an estimate c_l with the gradient through layer l's residual contributions (attention and MLP
  outputs) zeroed, combined per example as ``sum_l |c_l| / (L - 1)`` and averaged over
  examples — a magnitude (nodes in layer l get c_l = 0, hence L - 1). All L backward passes
  run as one batched backward (``repeat_batch``).
- EAP (Syed et al. 2023): edges sender -> receiver, senders = the decoder's input embeddings
  (text and vision tokens), every head's output (z_h W_O_h), every MLP output; receivers = each
  query head's q input, each KV head's k and v inputs, each MLP's input, the logits. Score =
  (a_u^source - a_u^target) . dM/d(input of v): the gradient at ``hook_q`` / ``hook_k`` /
  ``hook_v`` / ``mlp.hook_in`` pulled back through that layer's norm and the head's slice of
  W_Q / W_K / W_V alone (a local autograd step per layer), so no split-qkv model is needed.
- EAP-IG (Hanna et al. 2024): the same with dM/d(input of v) averaged over ``steps`` runs whose
  decoder input embeddings lie on the straight line from the source's to the target's,
  ``x_k = x_s + (k / m)(x_t - x_s)``, k = 1..m (m = 1 is EAP); the m runs form one batch.

Architectures whose attention / MLP output passes through a norm before the residual add
(Gemma3's sandwich norms) have no per-head residual contribution: EAP refuses them.
"""
from corelens.interventions.attribution.common import Node
from corelens.interventions.attribution.edges import Edge, EdgeScores, edge_attribution
from corelens.interventions.attribution.nodes import atp_star, attribute_heads

__all__ = ["Edge", "EdgeScores", "Node", "atp_star", "attribute_heads", "edge_attribution"]

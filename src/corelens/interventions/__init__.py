"""Causal interventions: the shared core (``core``), activation / path patching
(``patching``), gradient attribution (``attribution``) and ablation (``ablation``)."""

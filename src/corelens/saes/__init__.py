"""Sparse autoencoders on a ``HookedMLLM``, in SAELens's format and with its semantics.

SAELens (which pins ``transformer-lens<4``) cannot be imported beside TransformerLens 4, so
corelens reads and writes its SAE folders itself (``SAE.load`` / ``SAE.save``: ``cfg.json`` +
``sae_weights.safetensors``; standard, topk and jumprelu SAEs) and splices SAEs into the model
at any hook point, decoder or vision tower, as SAELens's ``HookedSAETransformer`` does::

    sae = SAE.load("path/to/sae_folder")              # an SAE trained with SAELens, or here
    logits, cache = run_with_cache_with_saes(model, batch, [sae], positions="vision")
    feats = cache[sae.cfg.metadata.hook_name + ".hook_sae_acts_post"]  # [batch, vision, d_sae]

``model.add_sae`` / ``reset_saes`` / ``run_with_saes`` / ``run_with_cache_with_saes`` are the
same functions as methods of ``HookedMLLM``. ``ActivationStore`` streams a model's activations
for grounded examples with each token's role (vision token with its image / row / col, text,
answer), shuffled in a bounded buffer and resumable; ``train_sae`` trains a standard or top-k SAE
on it with SAELens's objective (``train.py`` says why SAELens's own trainer cannot run here).
"""

from corelens.saes.attach import (
    add_sae,
    attached_saes,
    reset_saes,
    run_with_cache_with_saes,
    run_with_hooks_with_saes,
    run_with_saes,
    saes,
)
from corelens.saes.config import SAEConfig, SAEMetadata
from corelens.saes.sae import SAE, JumpReLUSAE, StandardSAE, TopKSAE
from corelens.saes.store import ActivationStore, activations
from corelens.saes.train import TrainResult, evaluate, train_sae

__all__ = ["ActivationStore", "JumpReLUSAE", "SAE", "SAEConfig", "SAEMetadata", "StandardSAE",
           "TopKSAE", "TrainResult", "activations", "evaluate", "train_sae",
           "add_sae", "attached_saes", "reset_saes", "run_with_cache_with_saes",
           "run_with_hooks_with_saes", "run_with_saes", "saes"]

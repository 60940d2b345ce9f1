"""The plain-HF reference analysis (``corelens.zoo.reference``): interventions checked by hand."""

from __future__ import annotations

import torch

from corelens import zoo
from corelens.zoo.reference import _batches, load_plain, zero_layers


def test_zeroing_every_layer_leaves_the_embeddings_to_the_unembedding():
    torch.set_num_threads(1)
    hf, proc = load_plain(zoo.path("toy-llava"))
    (b,) = _batches(hf, proc, zoo.examples("toy-llava", 2, seed=3), 2)
    n = hf.config.text_config.num_hidden_layers
    with torch.no_grad(), zero_layers(hf, list(range(n))):
        out = hf(input_ids=b.input_ids, **b.model_kwargs(), output_hidden_states=True)
        logits = out.logits
    # every block adds nothing: the last hidden state (before the norm) is the input embedding,
    # image features included, and the logits are the unembedded, normed embeddings
    embeds = out.hidden_states[0]
    lm = hf.model.language_model
    assert torch.allclose(hf.lm_head(lm.norm(embeds)), logits, atol=1e-5)
    with torch.no_grad():
        plain = hf(input_ids=b.input_ids, **b.model_kwargs()).logits
    assert (plain - logits).abs().max() > 1e-2  # and zeroing changed something
    with torch.no_grad(), zero_layers(hf, [0]):  # hooks removed afterwards
        pass
    with torch.no_grad():
        again = hf(input_ids=b.input_ids, **b.model_kwargs()).logits
    assert torch.equal(plain, again)

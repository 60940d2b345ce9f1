"""The data model: grounded examples in (``examples``, ``loaders``), and what the model gets out
of them (``batch.MultimodalBatch``) with the place of every vision token (``layout``)."""

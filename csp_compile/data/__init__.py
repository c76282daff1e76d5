"""The shipped tiny VLM's synthetic task (``lookup``) and model (``model``)."""

from csp_compile.data.lookup import (
    IMAGE_SIZE,
    IMAGE_TOKENS,
    NUM_RECORDS,
    SPLIT_SEEDS,
    VOCAB,
    Example,
    Vocab,
    collate,
    make_dataset,
    make_example,
    render_glyph,
    render_tokens,
    token_name,
)
from csp_compile.data.model import SHIPPED_MODEL_DIR, build_model, load_model

__all__ = [
    "IMAGE_SIZE",
    "IMAGE_TOKENS",
    "NUM_RECORDS",
    "SPLIT_SEEDS",
    "VOCAB",
    "Example",
    "Vocab",
    "collate",
    "make_dataset",
    "make_example",
    "render_glyph",
    "render_tokens",
    "token_name",
    "SHIPPED_MODEL_DIR",
    "build_model",
    "load_model",
]

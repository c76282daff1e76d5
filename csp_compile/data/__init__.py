"""The shipped tiny VLMs' synthetic tasks (``lookup``, the default; ``grid``, glyph-grid reading)
and models (``model``). The names exported here are the lookup task's; the grid task's are in
``csp_compile.data.grid``; ``csp_compile.tasks`` names both."""

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
from csp_compile.data.model import GRID_MODEL_DIR, SHIPPED_MODEL_DIR, build_grid_model, build_model, load_model

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
    "GRID_MODEL_DIR",
    "SHIPPED_MODEL_DIR",
    "build_grid_model",
    "build_model",
    "load_model",
]

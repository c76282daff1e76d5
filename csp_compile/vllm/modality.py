"""Per-token modality ids of a vLLM request, from its multimodal placeholder ranges.

docs/design.md §2's ids: 0 text, 1 image, 2 video, 3 audio. A position is non-text when it lies in a
feature's ``PlaceholderRange`` (``offset``, ``length``) and, where the range has an ``is_embed``
mask, that mask is True there (positions of a range that carry no embedding, e.g. break tokens,
are text). Tokens generated after the prompt are text.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

__all__ = ["MODALITY_IDS", "modality_ids"]

MODALITY_IDS = {"image": 1, "video": 2, "audio": 3}


def modality_ids(mm_features: Iterable[Any] | None, length: int) -> torch.Tensor:
    """(length,) int64 modality ids for a request whose features (objects with ``modality`` and
    ``mm_position``, vLLM's ``MultiModalFeatureSpec``) are ``mm_features``. ValueError for an
    unknown modality name."""
    ids = torch.zeros(length, dtype=torch.int64)
    for feature in mm_features or ():
        if feature.modality not in MODALITY_IDS:
            raise ValueError(f"csp_compile.vllm: unknown modality {feature.modality!r}: known {sorted(MODALITY_IDS)}")
        position = feature.mm_position
        start, stop = position.offset, min(position.offset + position.length, length)
        if stop <= start:
            continue
        span = torch.full((stop - start,), MODALITY_IDS[feature.modality], dtype=torch.int64)
        if position.is_embed is not None:
            span = torch.where(position.is_embed[: stop - start].to(torch.bool), span, 0)
        ids[start:stop] = span
    return ids

"""The masks of a call on an evicted cache: the model's masks with the physical slots' validity.

After eviction a ``LogicalLayer`` holds ``P`` slots at mask columns ``T - P .. T - 1`` of a logical
length ``T`` (``cache``); every kept slot precedes every new query, so only padding hides a slot.
transformers builds the masks either from a 2-D padding mask (``offset_attention_mask`` writes the
slots' validity into its slot columns) or, for models with one mask per layer type, as prebuilt
4-D masks (``with_slot_columns`` writes it into the evicted type's). ``masks_over_slots`` picks.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["causal_slot_mask", "masks_over_slots", "offset_attention_mask", "with_slot_columns"]


def masks_over_slots(masks: Any, slot_valid: torch.Tensor, logical_length: int, new_tokens: int,
                     evicted_types: set[str]) -> Any:
    """The language model's ``attention_mask`` argument for a call of ``new_tokens`` tokens on a cache of
    ``logical_length`` tokens whose evicted layers hold slots of validity ``slot_valid`` (b, P): a 2-D
    padding mask (or None) mapped by ``offset_attention_mask``; a dict of per-layer-type masks with the
    ``evicted_types`` ones rewritten; a single 4-D mask rewritten (``with_slot_columns``)."""
    if isinstance(masks, dict):
        return {**masks, **{kind: with_slot_columns(masks.get(kind), slot_valid) for kind in evicted_types}}
    if masks is None or masks.dim() == 2:
        if masks is None:
            masks = torch.ones(slot_valid.shape[0], logical_length + new_tokens, dtype=torch.int64,
                               device=slot_valid.device)
        return offset_attention_mask(masks, slot_valid, logical_length)
    return with_slot_columns(masks, slot_valid)


def offset_attention_mask(attention_mask: torch.Tensor, slot_valid: torch.Tensor, logical_length: int) -> torch.Tensor:
    """The 2-D padding mask a ``LogicalLayer`` reads: same shape as the logical ``attention_mask``
    (b, T + q), with the columns ``T - P .. T - 1`` (where the masks put the P physical slots)
    replaced by ``slot_valid`` (b, P); the new tokens' columns stay as given."""
    physical = slot_valid.shape[-1]
    if attention_mask.dim() != 2 or attention_mask.shape[-1] < logical_length:
        raise ValueError(
            f"attention_mask must be (batch, >= {logical_length}) when continuing from a cache of {logical_length} tokens: "
            f"got {tuple(attention_mask.shape)}"
        )
    start = logical_length - physical
    return torch.cat(
        [attention_mask[:, :start], slot_valid.to(attention_mask.dtype), attention_mask[:, logical_length:]], dim=-1
    )


def with_slot_columns(mask: torch.Tensor | None, slot_valid: torch.Tensor) -> torch.Tensor:
    """The model's (b|1, 1, q, P + q) mask of an evicted layer type with its first P (slot) columns set
    to ``slot_valid`` (b, P): kept slots all precede the queries, so only padding hides one. ``mask``
    None (SDPA's causal shortcut) becomes the equivalent bool mask."""
    batch, physical = slot_valid.shape
    if mask is None:
        return causal_slot_mask(slot_valid)
    mask = mask.expand(batch, *mask.shape[1:]).clone()
    if mask.dtype == torch.bool:
        mask[..., :physical] = slot_valid[:, None, None, :]
    else:
        blocked = torch.finfo(mask.dtype).min
        mask[..., :physical] = torch.where(slot_valid[:, None, None, :], 0.0, blocked).to(mask.dtype)
    return mask


def causal_slot_mask(slot_valid: torch.Tensor) -> torch.Tensor:
    """The bool (b, 1, 1, P + 1) mask of one decode query over ``slot_valid`` slots and itself."""
    ones = torch.ones(slot_valid.shape[0], 1, dtype=torch.bool, device=slot_valid.device)
    return torch.cat([slot_valid.bool(), ones], dim=-1)[:, None, None, :]

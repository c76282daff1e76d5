"""Eviction state of one optimised model: what each layer kept and the cache's logical length.

After prefill eviction the cache holds ``P`` physical slots per layer while the prompt had ``T``
logical positions. Positions (RoPE, M-RoPE) stay logical because ``generate`` keeps passing
``cache_position``/``position_ids``; the 2-D padding mask, which transformers reads at physical
slots, is rewritten by ``physical_attention_mask``. The logical offset is explicit state here,
never inferred from the cache's length (DESIGN §6).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer


class UnsupportedCacheError(TypeError):
    """The cache passed to an optimised model cannot be evicted."""


@dataclass
class LayerEviction:
    """What one layer kept at prefill: ``kept`` (b, hkv, P) prompt positions (-1 = empty slot),
    ``slot_valid`` (b, P) True where the slot holds a real token."""

    kept: torch.Tensor
    slot_valid: torch.Tensor


@dataclass
class EvictionState:
    """Per-model eviction bookkeeping, reset at every prefill."""

    prompt_length: int | None = None  # T: logical prompt length of the last prefill
    physical_length: int | None = None  # P: slots the evicted layers hold after that prefill
    layers: dict[int, LayerEviction] = field(default_factory=dict)

    def reset(self) -> None:
        self.prompt_length = self.physical_length = None
        self.layers.clear()

    @property
    def evicted(self) -> bool:
        return self.physical_length is not None and self.physical_length < (self.prompt_length or 0)

    def slot_valid(self) -> torch.Tensor:
        """(b, P): a slot is real if it is real in every evicted layer (all layers keep the same
        count per sequence, so the layers agree)."""
        masks = [layer.slot_valid for layer in self.layers.values()]
        return torch.stack(masks).all(dim=0)


def physical_attention_mask(attention_mask: torch.Tensor, slot_valid: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """The 2-D mask over physical cache slots: ``slot_valid`` for the evicted prompt, then the
    logical mask's columns after the prompt (tokens generated or appended since)."""
    if attention_mask.dim() != 2 or attention_mask.shape[-1] < prompt_length:
        raise ValueError(
            f"attention_mask must be (batch, >= {prompt_length}) after a prefill of {prompt_length} tokens: "
            f"got {tuple(attention_mask.shape)}"
        )
    after_prompt = attention_mask[:, prompt_length:]
    return torch.cat([slot_valid.to(after_prompt.dtype), after_prompt], dim=-1)


def check_cache(cache: object) -> None:
    """Raise ``UnsupportedCacheError`` unless ``cache`` is None or a plain, on-device ``DynamicCache``."""
    if cache is None:
        return
    if not isinstance(cache, Cache):
        raise UnsupportedCacheError(
            f"past_key_values of type {type(cache).__name__} is not supported: pass a transformers DynamicCache "
            "(or nothing; generate creates one)"
        )
    allowed = (DynamicLayer, DynamicSlidingWindowLayer)
    bad = sorted({type(layer).__name__ for layer in cache.layers if type(layer) not in allowed})
    if not isinstance(cache, DynamicCache) or bad or getattr(cache, "offloading", False):
        raise UnsupportedCacheError(
            f"{type(cache).__name__} with layers {bad or '-'} cannot be evicted: CSP supports DynamicCache with "
            "DynamicLayer / DynamicSlidingWindowLayer layers (no quantized, offloaded or static caches yet)"
        )

"""The evicting cache: full-attention layers that know their logical length, and what each slot holds.

After eviction a layer holds ``P`` physical slots while it has seen ``T`` logical tokens. A
``LogicalLayer`` (a transformers ``DynamicLayer``) reports ``T`` where transformers asks for the
sequence length (so ``generate`` feeds only new tokens, at logical positions, on a second turn) and
sizes masks as ``P + q`` keys at offset ``T - P``: every kept slot precedes every new query, so the
causal rule stays right for a multi-token turn. Its ``slots`` (a ``SlotMap``) say which logical
position, modality and padding each slot holds; the cache's ``TokenLog`` has the modality and
padding of every logical token. The logical offset is explicit state of the cache, never inferred
from its length (docs/design.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

_TOKEN_LOG = "_csp_token_log"


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


class LogicalLayer(DynamicLayer):
    """A full-attention ``DynamicLayer`` whose physical slots may be fewer than the tokens it has seen.

    ``cumulative_length`` counts logical tokens (``get_seq_length``); ``keys.shape[-2]`` is the
    physical slot count. Masks are sized ``P + q`` at offset ``T - P`` (all kept slots precede the new
    queries); ``slots`` describes the first ``slots.physical`` slots, later slots are tokens appended
    since, in logical order.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cumulative_length = 0
        self.slots: SlotMap | None = None
        self.recent_queries: torch.Tensor | None = None  # (b, hq, <= window, D) of the last tokens

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        self.cumulative_length += key_states.shape[-2]
        return super().update(key_states, value_states, *args, **kwargs)

    @property
    def physical_length(self) -> int:
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def remember_queries(self, rows: torch.Tensor, window: int, *, restart: bool = False) -> None:
        """Keep the last ``window`` query rows (b, hq, r, D) of the tokens seen: ``rows`` appended to
        those kept (or replacing them with ``restart``)."""
        joined = rows if restart or self.recent_queries is None else torch.cat([self.recent_queries, rows], dim=2)
        self.recent_queries = joined[:, :, -window:]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        physical = self.physical_length
        return physical + query_length, self.cumulative_length - physical

    def reset(self) -> None:
        super().reset()
        self.slots = self.recent_queries = None

    def crop(self, tokens_to_remove: int) -> None:
        before = self.physical_length
        if self.slots is not None and tokens_to_remove < 0 and before + tokens_to_remove < self.slots.physical:
            raise NotImplementedError(
                f"csp: cannot crop {-tokens_to_remove} tokens from a pruned cache layer: only the "
                f"{before - self.slots.physical} tokens after its kept slots can be removed"
            )
        super().crop(tokens_to_remove)
        self.cumulative_length -= before - self.physical_length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.slots is not None:
            self.slots = self.slots.select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.slots is not None:
            self.slots = self.slots.repeat_interleave(repeats)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.slots is not None:
            self.slots = self.slots.select(beam_idx)


@dataclass
class SlotMap:
    """What the first ``physical`` slots of a ``LogicalLayer`` hold: ``positions`` (b, hkv, P) logical
    position (-1 = empty slot), ``modality`` (b, hkv, P) ids, ``valid`` (b, P) True at real tokens;
    with adaptive budgets (heads keeping different counts) ``head_valid`` (b, hkv, P) says it per head
    and ``valid`` is all True (the per-head masks of ``passes.head_validity`` decide)."""

    positions: torch.Tensor
    modality: torch.Tensor
    valid: torch.Tensor
    head_valid: torch.Tensor | None = None

    @property
    def physical(self) -> int:
        return self.positions.shape[-1]

    def select(self, indices: torch.Tensor) -> "SlotMap":
        indices = indices.to(self.positions.device)
        return SlotMap(*(None if t is None else t[indices] for t in self._tensors()))

    def repeat_interleave(self, repeats: int) -> "SlotMap":
        return SlotMap(*(None if t is None else t.repeat_interleave(repeats, dim=0) for t in self._tensors()))

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.positions, self.modality, self.valid, self.head_valid

    def extended(self, start: int, modality: torch.Tensor, valid: torch.Tensor) -> "SlotMap":
        """With ``modality``/``valid`` (b, a) appended: the tokens at logical ``start .. start + a - 1``."""
        b, hkv, _ = self.positions.shape
        count = modality.shape[-1]
        positions = torch.arange(start, start + count, device=self.positions.device).expand(b, hkv, count)
        return SlotMap(
            torch.cat([self.positions, positions], dim=-1),
            torch.cat([self.modality, modality.to(self.modality)[:, None, :].expand(b, hkv, count)], dim=-1),
            torch.cat([self.valid, valid.to(self.valid)], dim=-1),
        )

    def gather(self, indices: torch.Tensor, slot_valid: torch.Tensor) -> "SlotMap":
        """The slots ``indices`` (b, hkv, P') picks (-1 = empty) with validity ``slot_valid`` (b, P')."""
        safe = indices.clamp(min=0)
        positions = torch.where(indices >= 0, self.positions.gather(2, safe), -1)
        modality = torch.where(indices >= 0, self.modality.gather(2, safe), 0)
        return SlotMap(positions, modality, slot_valid)


@dataclass
class TokenLog:
    """Modality ids and padding of every logical token a cache has seen, as appended per forward."""

    chunks: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    length: int = 0
    decoded: int = 0  # single-token calls since the last prefill or new turn

    def append(self, modality: torch.Tensor, valid: torch.Tensor) -> None:
        self.chunks.append((modality.to(torch.int64), valid.to(torch.bool)))
        self.length += modality.shape[-1]

    def columns(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(modality, valid), each (b, stop - start), of logical tokens ``start .. stop - 1``."""
        if stop > self.length or start < 0:
            raise RuntimeError(f"csp: the cache's token log covers {self.length} tokens, asked for {start}..{stop}")
        if len(self.chunks) > 1:
            self.chunks = [tuple(torch.cat(parts, dim=-1) for parts in zip(*self.chunks))]
        modality, valid = self.chunks[0]
        return modality[:, start:stop], valid[:, start:stop]

    def real_counts(self) -> torch.Tensor:
        """(b,) real (unpadded) tokens seen per sequence."""
        return self.columns(0, self.length)[1].sum(-1)


def token_log(cache: Cache, *, reset: bool = False) -> TokenLog:
    """The ``TokenLog`` a cache carries (a new one when absent or ``reset``)."""
    log = getattr(cache, _TOKEN_LOG, None)
    if log is None or reset:
        log = TokenLog()
        setattr(cache, _TOKEN_LOG, log)
    return log


def adopt_logical_layers(cache: Cache) -> list[int]:
    """Turn every plain full-attention ``DynamicLayer`` of ``cache`` into a ``LogicalLayer`` (in place,
    same tensors; a layer that was never pruned has logical = physical length). Returns the indices
    of the cache's ``LogicalLayer`` s."""
    indices = []
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            logical = LogicalLayer()
            logical.__dict__.update(layer.__dict__)
            logical.cumulative_length = layer.get_seq_length()
            logical.slots = logical.recent_queries = None
            cache.layers[index] = logical
        if isinstance(cache.layers[index], LogicalLayer):
            indices.append(index)
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = LogicalLayer
    return indices


def synced_slots(layer: LogicalLayer, log: TokenLog) -> SlotMap:
    """``layer.slots`` extended over the slots appended since (decoded or appended tokens)."""
    if layer.slots is None:
        raise RuntimeError("csp: this cache layer has no slot map (it was not filled by an optimised model)")
    appended = layer.physical_length - layer.slots.physical
    if appended == 0:
        return layer.slots
    start = layer.cumulative_length - appended
    return layer.slots.extended(start, *log.columns(start, layer.cumulative_length))


def slot_validity(layer: LogicalLayer, log: TokenLog) -> torch.Tensor:
    """(b, P) True where the layer's physical slot holds a real token."""
    if layer.slots is None:
        return log.columns(layer.cumulative_length - layer.physical_length, layer.cumulative_length)[1]
    appended = layer.physical_length - layer.slots.physical
    start = layer.cumulative_length - appended
    return torch.cat([layer.slots.valid, log.columns(start, layer.cumulative_length)[1]], dim=-1)


def check_cache(cache: object) -> None:
    """Raise ``UnsupportedCacheError`` unless ``cache`` is None or a plain, on-device ``DynamicCache``."""
    if cache is None:
        return
    if not isinstance(cache, Cache):
        raise UnsupportedCacheError(
            f"past_key_values of type {type(cache).__name__} is not supported: pass a transformers DynamicCache "
            "(or nothing; generate creates one)"
        )
    allowed = (DynamicLayer, LogicalLayer, DynamicSlidingWindowLayer)
    bad = sorted({type(layer).__name__ for layer in cache.layers if type(layer) not in allowed})
    if not isinstance(cache, DynamicCache) or bad or getattr(cache, "offloading", False):
        raise UnsupportedCacheError(
            f"{type(cache).__name__} with layers {bad or '-'} cannot be evicted: CSP supports DynamicCache with "
            "DynamicLayer / DynamicSlidingWindowLayer layers (no quantized, offloaded or static caches yet)"
        )

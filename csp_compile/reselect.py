"""Re-selection over a non-empty cache: [kept slots + new tokens] -> B of the logical total.

Used after a new turn (``on_new_turn="evict"``), after each chunk of a chunked prefill and at a
decode-time compression. Each evicting layer holds its kept slots followed by the tokens appended
since. The observation window is the last ``W = min(window, B)`` real tokens whose post-RoPE
queries the caller passes (a new turn's own last tokens; for chunks and decode compressions the
last ``window`` tokens across calls, buffered on the cache); ``B`` follows docs/design.md §2 with ``L`` =
the sequence's logical real-token count. Scores are the policy's reference score functions on a
problem folded per KV head (kept slots differ per head, so their modality and padding do too):
batch ``b * hkv``, one KV head, the key axis in logical order, causal in that order (every kept slot
precedes every later token). The result has the prefill's layout: left-aligned, empty slots first,
the same count per sequence in every layer and KV head.
"""

from __future__ import annotations

import torch

from csp_compile.cache import SlotMap
from csp_compile.config import CSPConfig
from csp_compile.policies import get_policy
from csp_compile.scoring import AttentionInputs
from csp_compile.selection import Selection, budgets_for, gather_kept, left_aligned, select_from_scores


def reselect(
    window_query: torch.Tensor,
    keys: torch.Tensor,
    slots: SlotMap,
    real_counts: torch.Tensor,
    config: CSPConfig,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slots to keep: (indices (b, hkv, P') into the current slots, -1 = empty; slot_valid (b, P')).

    window_query (b, hq, w, D): queries of the last ``w`` tokens (the last ``w`` slots); keys
    (b, hkv, P + q, D); ``slots`` describes every current slot; real_counts (b,) logical real
    tokens seen per sequence.
    """
    b, hq, w, dim = window_query.shape
    _, hkv, length, _ = keys.shape
    group = hq // hkv
    if slots.physical != length:
        raise ValueError(f"csp: slot map covers {slots.physical} slots, the cache layer holds {length}")
    available = slots.valid.sum(-1).cpu()
    budgets = budgets_for(real_counts.cpu(), config)[0]
    kept = available if get_policy(config.policy).score is None else torch.minimum(budgets, available)
    # the window: the last real tokens with a query (a chunk of a left-padded prompt may end in padding-only rows)
    tail = slots.valid[:, length - w:].flip(-1).to(torch.int64).cumprod(-1).sum(-1).cpu()
    window = torch.minimum(torch.clamp(kept, max=config.window), tail)

    query = keys.new_zeros(b, hkv, group, length, dim, dtype=window_query.dtype)
    query[..., length - w:, :] = window_query.reshape(b, hkv, group, w, dim)
    rows = torch.arange(length, device=keys.device) >= length - w
    fold = b * hkv
    valid = slots.valid[:, None, :].expand(b, hkv, length).reshape(fold, length)
    inputs = AttentionInputs(
        query=query.reshape(fold, group, length, dim),
        key=keys.reshape(fold, 1, length, dim),
        modality=slots.modality.reshape(fold, length),
        valid=valid,
        positions=slots.positions.reshape(fold, length),
        mask=None,  # causal in slot order = logical order
        scale=float(scale),
        window=window.repeat_interleave(hkv).to(keys.device),
        query_valid=valid & rows[None, :],
    )
    selection = select_from_scores(inputs, config, budgets=kept.repeat_interleave(hkv).to(keys.device))
    per_sequence = Selection(
        indices=selection.indices.reshape(b, hkv, -1),
        num_kept=kept.to(keys.device),
        num_secondary=selection.num_secondary.reshape(b, hkv),
        keep_mask=selection.keep_mask.reshape(b, hkv, length),
    )
    return left_aligned(per_sequence, int(kept.max()))


def apply_reselection(layer, slots: SlotMap, indices: torch.Tensor, slot_valid: torch.Tensor) -> None:
    """Gather ``layer``'s keys/values and ``slots`` to the kept ``indices`` (in place on the layer)."""
    layer.keys = gather_kept(layer.keys, indices, slot_valid)
    layer.values = gather_kept(layer.values, indices, slot_valid)
    layer.slots = slots.gather(indices, slot_valid)

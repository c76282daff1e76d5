"""``select_kept``: the reference selection of docs/design.md §2, from one layer's Q/K to kept positions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csp_compile.adaptive import head_counts, is_adaptive, layer_picks, slot_factor
from csp_compile.config import CSPConfig
from csp_compile.policies import PolicyScores, get_policy
from csp_compile.scoring import AttentionInputs, default_scale, rank_desc


@dataclass(frozen=True)
class Selection:
    """Kept prompt positions of one layer.

    indices: (b, hkv, max kept) int64, ascending per row, padded with -1 at the end where a
        sequence (or, with adaptive head budgets, a head) keeps fewer than the longest one.
    num_kept: (b,) int64 kept per sequence (B of the contract, on its real length); (b, hkv) per KV
        head with adaptive budgets (``CSPConfig.layer_budget`` / ``head_budget``).
    num_secondary: (b, hkv) picks taken from the secondary (for CSP: cross) score.
    keep_mask: (b, hkv, L) bool, the same selection as a mask.
    """

    indices: torch.Tensor
    num_kept: torch.Tensor
    num_secondary: torch.Tensor
    keep_mask: torch.Tensor


def select_kept(
    query: torch.Tensor,
    key: torch.Tensor,
    modality: torch.Tensor,
    config: CSPConfig | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    layer: tuple[int, int] = (0, 1),
) -> Selection:
    """Choose the prompt positions each KV head keeps at prefill (the selection contract).

    query (b, hq, L, D) and key (b, hkv, L, D) are the layer's post-RoPE projections; modality
    (b, L) the per-token modality ids; attention_mask (b, L) 1 for real tokens, 0 for (left)
    padding; mask the model's own attention mask (bool True = attend, or additive),
    broadcastable to (b, hq, L, L), or None for causal; scale defaults to 1/sqrt(D); layer = (this
    layer's rank among the evicting layers, their count), read by adaptive budgets only.
    """
    config = config or CSPConfig()
    inputs = make_attention_inputs(query, key, modality, config, attention_mask=attention_mask, mask=mask, scale=scale)
    return select_from_scores(inputs, config, layer=layer)


def select_from_scores(
    inputs: AttentionInputs, config: CSPConfig, scores: PolicyScores | None = None, *, budgets: torch.Tensor | None = None,
    layer: tuple[int, int] = (0, 1),
) -> Selection:
    """``select_kept``'s budgets, split and top-k on ``inputs``, ranking by ``scores`` (the policy's
    own, e.g. from a fused scorer) or, when None, by the policy's reference score function.
    ``budgets`` (b,) overrides B per sequence (default: the contract's B of its real length)."""
    keep, num_kept, num_secondary = select_keep_mask(inputs, config, scores, budgets=budgets, layer=layer)
    return _as_selection(keep, num_kept, num_secondary)


def select_keep_mask(
    inputs: AttentionInputs, config: CSPConfig, scores: PolicyScores | None = None, *, budgets: torch.Tensor | None = None,
    layer: tuple[int, int] = (0, 1), rank_limit: int | torch.SymInt | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``select_from_scores`` as (keep (b, hkv, L) bool, num_kept, num_secondary (b, hkv)): tensor ops
    only, no host sync, so it traces into a compiled graph when the policy's score function does.
    num_kept is (b,) per sequence, or (b, hkv) per KV head with adaptive budgets (``adaptive``), which
    also read ``layer`` = (this layer's rank among the evicting layers, their count). rank_limit: with
    ``budgets`` given, a bound on them (the rankings stop there), or None (everything is ranked)."""
    lengths = inputs.valid.sum(-1)
    policy = get_policy(config.policy)
    if policy.score is None:
        keep = inputs.valid[:, None, :].expand(-1, inputs.kv_heads, -1)
        num_kept = lengths[:, None].expand(-1, inputs.kv_heads) if is_adaptive(config) else lengths
        return keep, num_kept, torch.zeros(keep.shape[:2], dtype=torch.int64, device=keep.device)
    limit = rank_limit
    if budgets is None:
        budgets = budgets_for(lengths, config)[0]
        limit = kept_slots(inputs.length, config)  # >= W + every head's picks of these budgets
    window = inputs.window
    k_uniform = (budgets.to(window.device) - window).clamp(min=0)
    scores = policy.score(inputs, config) if scores is None else scores
    candidates = inputs.candidates()
    k_layer = layer_picks(k_uniform, candidates.sum(-1), *layer, config)
    k_total = head_counts(allocation_score(scores), candidates, k_layer, k_uniform, config, limit)  # (b, hkv)
    k_secondary = policy.split(scores, inputs, config, k_total)
    keep = pick_top(scores, candidates, k_total, k_secondary, limit)
    positions = torch.arange(inputs.length, device=keep.device)
    in_window = positions[None, :] >= (inputs.length - window)[:, None]
    num_kept = k_total + window[:, None] if is_adaptive(config) else budgets
    return keep | in_window[:, None, :], num_kept, k_secondary


def allocation_score(scores: PolicyScores) -> torch.Tensor:
    """(b, hkv, L) what adaptive per-head budgets compare across heads: primary + secondary score."""
    return scores.primary if scores.secondary is None else scores.primary + scores.secondary


def budgets_for(real: torch.Tensor, config: CSPConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, W) per sequence, each (b,) int64, for ``real`` (b,) real-token counts: ``resolve_budget``
    as tensor ops (``torch.round`` is half to even, as Python's ``round``)."""
    real = real.to(torch.int64)
    if isinstance(config.budget, float):
        rounded = torch.round(real.to(torch.float64) * config.budget).to(torch.int64)
        kept = torch.minimum(real, rounded.clamp(min=config.window))
    else:
        kept = real.clamp(max=config.budget)
    return kept, kept.clamp(max=config.window)


def kept_slots(length: int | torch.SymInt, config: CSPConfig) -> int | torch.SymInt:
    """P: cache slots per sequence after a prefill of a (padded) prompt of ``length`` tokens: the
    contract's B of ``length`` (``resolve_budget``), or ``length`` for the "full" policy; with adaptive
    budgets ``W + 2K`` (``adaptive.slot_factor``), capped at ``length``. Sym ops, so a symbolic length
    gives a backed expression of it (``round`` of a SymFloat is half to even, as Python's)."""
    if config.policy == "full":
        return length
    if isinstance(config.budget, float):
        budget = torch.sym_min(length, torch.sym_max(config.window, round(config.budget * length)))
    else:
        budget = torch.sym_min(length, config.budget)
    factor = slot_factor(config)
    if factor == 1:
        return budget
    window = torch.sym_min(config.window, budget)
    return torch.sym_min(length, window + factor * (budget - window))


def left_aligned(selection: Selection, slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache layout of ``selection`` over ``slots`` physical slots (``kept_layout``)."""
    if int(selection.num_kept.max()) > slots:
        raise AssertionError(f"the selection keeps {int(selection.num_kept.max())} > {slots} slots")
    return kept_layout(selection.keep_mask, selection.num_kept, slots)


def kept_layout(keep: torch.Tensor, num_kept: torch.Tensor, slots: int | torch.SymInt) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache layout of a keep mask (b, hkv, L) keeping ``num_kept`` <= ``slots`` per KV head, (b,)
    or (b, hkv): (indices (b, hkv, slots) ascending with -1 in the leading empty slots, slot_valid of
    ``num_kept``'s shape plus ``slots``); a sequence keeping n fills the last n slots, like left padding,
    so at full budget the layout equals the prompt's. Tensor ops only (traceable)."""
    length = keep.shape[-1]
    positions = torch.arange(length, device=keep.device)
    largest = torch.topk(torch.where(keep, positions, -1), slots, dim=-1).values  # kept descending, then -1
    indices = largest.flip(-1).contiguous()
    slot = torch.arange(slots, device=keep.device)
    return indices, slot >= (slots - num_kept.to(keep.device))[..., None]


def gather_kept(states: torch.Tensor, indices: torch.Tensor, slot_valid: torch.Tensor) -> torch.Tensor:
    """Cache states (b, hkv, L, D) at ``left_aligned`` slot ``indices`` (b, hkv, P); zeros at empty slots
    (``slot_valid`` (b, P), or (b, hkv, P) with per-head counts)."""
    safe = indices.clamp(min=0)[..., None].expand(-1, -1, -1, states.shape[-1])
    valid = slot_valid[:, None, :, None] if slot_valid.dim() == 2 else slot_valid[..., None]
    return torch.where(valid, states.gather(2, safe), 0)


def check_query_key(query: torch.Tensor, key: torch.Tensor) -> tuple[int, int, int, int]:
    """(b, hq, L, D) of one layer's post-RoPE query (b, hq, L, D) and key (b, hkv, L, D); ValueError
    naming what does not fit (rank, batch / length / dim mismatch, heads, dtype)."""
    if query.dim() != 4 or key.dim() != 4:
        raise ValueError(f"query and key must be 4-D (b, heads, L, D): got {tuple(query.shape)} and {tuple(key.shape)}")
    b, hq, length, dim = query.shape
    if key.shape[0] != b or key.shape[2:] != (length, dim):
        raise ValueError(f"key shape {tuple(key.shape)} does not match query shape {tuple(query.shape)} in batch, L or D")
    if length < 1 or key.shape[1] < 1 or hq % key.shape[1]:
        raise ValueError(f"query heads ({hq}) must be a positive multiple of key heads ({key.shape[1]}), L >= 1")
    if not query.is_floating_point() or not key.is_floating_point():
        raise ValueError(f"query/key must be floating point: got {query.dtype}, {key.dtype}")
    return b, hq, length, dim


def make_attention_inputs(
    query: torch.Tensor,
    key: torch.Tensor,
    modality: torch.Tensor,
    config: CSPConfig,
    *,
    attention_mask: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> AttentionInputs:
    """Validate the arguments of ``select_kept`` and bundle them; errors name the argument."""
    b, hq, length, dim = check_query_key(query, key)
    if modality.shape != (b, length) or modality.is_floating_point() or modality.dtype == torch.bool:
        raise ValueError(f"modality must be an integer tensor of shape {(b, length)}: got {modality.dtype} {tuple(modality.shape)}")
    valid = _valid_tokens(attention_mask, b, length, query.device)
    _check_mask(mask, b, hq, length)
    window = budgets_for(valid.sum(-1), config)[1]
    positions = torch.arange(length, device=query.device)
    window_pad = ~valid & (positions[None, :] >= (length - window)[:, None])
    if bool(window_pad.any()):
        raise ValueError("attention_mask has padding inside the last `window` positions: pad on the left")
    return AttentionInputs(
        query=query,
        key=key,
        modality=modality.to(torch.int64),
        valid=valid,
        mask=mask,
        scale=default_scale(dim) if scale is None else float(scale),
        window=window,
    )


def pick_top(scores: PolicyScores, candidates: torch.Tensor, k_total: torch.Tensor, k_secondary: torch.Tensor,
             limit: int | torch.SymInt | None = None) -> torch.Tensor:
    """(b, hkv, L) bool, per KV head (``k_total``, ``k_secondary`` (b, hkv)): top ``k_total - k_secondary`` candidates by the primary score, then the top
    ``k_secondary`` of the remaining candidates by the secondary score. Ties go to the earlier position.
    ``limit``: a bound on ``k_total`` (ranks are computed only that far), or None."""
    cand = candidates[:, None, :].expand_as(scores.primary)
    k_primary = (k_total - k_secondary)[..., None]
    taken = cand & (rank_desc(scores.primary, cand, limit) < k_primary)
    if scores.secondary is None:
        return taken
    rest = cand & ~taken
    return taken | (rest & (rank_desc(scores.secondary, rest, limit) < k_secondary[..., None]))


def _as_selection(keep: torch.Tensor, num_kept: torch.Tensor, num_secondary: torch.Tensor) -> Selection:
    length = keep.shape[-1]
    positions = torch.arange(length, device=keep.device).expand_as(keep)
    ordered = torch.sort(torch.where(keep, positions, length), dim=-1).values
    width = int(num_kept.max()) if num_kept.numel() else 0
    indices = ordered[..., :width]
    indices = torch.where(indices == length, -1, indices)
    return Selection(indices=indices, num_kept=num_kept.to(torch.int64), num_secondary=num_secondary, keep_mask=keep)


def _valid_tokens(attention_mask: torch.Tensor | None, b: int, length: int, device: torch.device) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones(b, length, dtype=torch.bool, device=device)
    if attention_mask.shape != (b, length):
        raise ValueError(f"attention_mask must have shape {(b, length)}: got {tuple(attention_mask.shape)}")
    return attention_mask.to(device) != 0


def _check_mask(mask: torch.Tensor | None, b: int, hq: int, length: int) -> None:
    if mask is None:
        return
    if mask.dim() != 4 or mask.shape[-2:] != (length, length) or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, hq):
        raise ValueError(f"mask must broadcast as (b, heads, L, L) = {(b, hq, length, length)}: got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"mask must be bool (True = attend) or additive float: got {mask.dtype}")

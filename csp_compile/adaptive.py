"""Adaptive budgets: how many of a layer's non-window picks each layer and each KV head gets.

``layer_budget="pyramid"`` (PyramidKV, Cai et al. 2024, the schedule of its reference code
``PyramidKVCluster``, beta = 20): layer ``l`` of ``n`` evicting layers keeps
``K_l = K_max - l * ((K_max - K_min) // (n - 1))`` with ``K_min = K // 20`` and ``K_max = 2K - K_min``
(when ``K_max`` reaches the candidate count it becomes that count and ``K_min = 2K - K_max``): more in
lower layers, the same total up to the rounding of the step.

``head_budget="adaptive"`` (AdaKV, Feng et al. 2024, as kvpress' ``AdaKVPress``): the layer's
``hkv * K_l`` picks go to the (KV head, candidate) pairs with the highest allocation score across the
layer's heads, each head first guaranteed its own top ``floor(0.2 * K_l)`` (the safeguard) and allowed
at most its top ``2K`` (the cache stays rectangular, ``W + 2K`` slots; shorter heads are padded).
The allocation score is the policy's primary score plus its secondary (CSP: self + cross, the window's
whole attention); the head's own policy then chooses its ``k_h`` picks (CSP splits them self/cross).

Everything is tensor ops (no host sync), traced into the prefill graph like the rest of the selection.
"""

from __future__ import annotations

import torch

from csp_compile.config import CSPConfig
from csp_compile.scoring import rank_desc

__all__ = ["ADAKV_SAFEGUARD", "PYRAMID_BETA", "head_counts", "is_adaptive", "layer_picks", "slot_factor"]

PYRAMID_BETA = 20  # PyramidKV's reference default
ADAKV_SAFEGUARD = 0.2  # kvpress AdaKVPress' alpha_safeguard: each head keeps at least this share of K
HEAD_CAP = 2  # a head keeps at most HEAD_CAP * K picks: the rectangular cache's width


def is_adaptive(config: CSPConfig) -> bool:
    """Whether ``config`` gives layers or heads different counts (a rectangular, padded cache)."""
    return config.layer_budget != "uniform" or config.head_budget != "uniform"


def slot_factor(config: CSPConfig) -> int:
    """Non-window slots per head, as a multiple of the uniform K: 1, or ``HEAD_CAP`` when adaptive."""
    return HEAD_CAP if is_adaptive(config) else 1


def layer_picks(k: torch.Tensor, candidates: torch.Tensor, layer: int, layers: int, config: CSPConfig) -> torch.Tensor:
    """(b,) non-window picks of evicting layer ``layer`` of ``layers`` for a uniform ``k`` (b,) and
    ``candidates`` (b,) candidate counts: ``k`` itself unless ``layer_budget="pyramid"``."""
    if config.layer_budget == "uniform" or layers < 2:
        return k
    k_min = k // PYRAMID_BETA
    k_max = 2 * k - k_min
    over = k_max >= candidates  # as the reference: `if max_num >= q_len - window_size`
    k_max = torch.where(over, candidates, k_max)
    k_min = torch.where(over, 2 * k - candidates, k_min).clamp(min=0)
    step = (k_max - k_min) // (layers - 1)
    return (k_max - layer * step).clamp(min=0)


def head_counts(allocation: torch.Tensor, candidates: torch.Tensor, k_layer: torch.Tensor, k_uniform: torch.Tensor,
                config: CSPConfig, limit: int | torch.SymInt | None = None) -> torch.Tensor:
    """(b, hkv) picks per KV head. allocation (b, hkv, L) scores; candidates (b, L) bool; k_layer (b,)
    the layer's picks per head on average (its total is ``hkv * k_layer``); k_uniform (b,) the config's
    uniform K (the cap is ``HEAD_CAP * k_uniform``); limit a bound on any head's picks, or None.
    Uniform heads: ``k_layer`` each."""
    b, hkv, length = allocation.shape
    if config.head_budget == "uniform":
        return k_layer[:, None].expand(b, hkv)
    eligible = candidates[:, None, :].expand(b, hkv, length)
    rank = rank_desc(allocation, eligible, limit)  # per head
    floor = torch.floor(k_layer.to(torch.float64) * ADAKV_SAFEGUARD).to(torch.int64)
    cap = HEAD_CAP * k_uniform
    guaranteed = eligible & (rank < floor[:, None, None])
    allowed = eligible & (rank < cap[:, None, None])
    boosted = torch.where(guaranteed, torch.inf, allocation)
    flat_limit = None if limit is None else hkv * limit
    flat_rank = rank_desc(boosted.reshape(b, hkv * length), allowed.reshape(b, hkv * length), flat_limit)
    taken = (flat_rank < (hkv * k_layer)[:, None]).reshape(b, hkv, length) & allowed
    return taken.sum(-1)

"""The plugin's per-layer selection: ``select_kept``'s kept positions of one request, compiled once.

vLLM hands each layer one request's post-RoPE Q/K at a time, with a kept count that depends on the
prompt's length (``layout.plan_eviction``). Run eagerly, the selection's ~70 small ops cost about
1.7 ms per layer at 2048 tokens on one core, most of the plugin's prefill overhead; here the
project's own traceable selection (``select_keep_mask`` + ``kept_layout``, what the rewrite emits
into a prefill graph) is compiled by Inductor with the length and the kept count symbolic, so one
compile per (policy settings, scale) serves every request (the first call compiles: ~15 s on two
cores, seconds once Inductor's on-disk cache holds it). Policies that cannot be traced
(``Policy.traceable`` False: H2O, LOOK-M, random) run the same function eagerly. No vLLM import:
testable without vLLM.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

from csp_compile.config import CSPConfig
from csp_compile.policies import get_policy
from csp_compile.scoring import AttentionInputs
from csp_compile.selection import kept_layout, select_keep_mask

__all__ = ["kept_indices", "kept_indices_eager"]

_CANONICAL_BUDGET = 1.0  # the budget travels as ``kept``: configs differing only in budget share a compile


def kept_indices_eager(query: torch.Tensor, key: torch.Tensor, modality: torch.Tensor, kept: int, *,
                       config: CSPConfig, scale: float) -> torch.Tensor:
    """(hkv, kept) int64, each KV head's kept positions ascending: ``select_kept(query[None], key[None],
    modality[None], config.replace(budget=kept), scale=scale).indices[0]`` for 1 <= kept <= L (= L
    for the "full" policy, which keeps everything).
    query (hq, L, D), key (hkv, L, D) post-RoPE (any strides); modality (L,) int ids. Tensor ops only."""
    length = key.shape[-2]
    budgets = torch.full((1,), kept, dtype=torch.int64, device=key.device)
    inputs = AttentionInputs(
        query=query[None], key=key[None], modality=modality[None].to(torch.int64),
        valid=torch.ones(1, length, dtype=torch.bool, device=key.device), mask=None, scale=scale,
        window=budgets.clamp(max=config.window), rows=torch.sym_min(config.window, length),
    )
    keep, num_kept, _ = select_keep_mask(inputs, config, budgets=budgets, rank_limit=kept)
    return kept_layout(keep, num_kept, kept)[0][0]


@functools.lru_cache(maxsize=16)
def _compiled(config: CSPConfig, scale: float) -> Callable[..., torch.Tensor]:
    def select(query: torch.Tensor, key: torch.Tensor, modality: torch.Tensor, kept: int) -> torch.Tensor:
        return kept_indices_eager(query, key, modality, kept, config=config, scale=scale)

    return torch.compile(select, dynamic=True, fullgraph=True)


def kept_indices(query: torch.Tensor, key: torch.Tensor, modality: torch.Tensor, kept: int, *,
                 config: CSPConfig, scale: float) -> torch.Tensor:
    """``kept_indices_eager``, compiled by Inductor for traceable policies (one compile per policy
    settings and scale). ValueError when ``kept`` is not in 1 .. L (L only, for the "full" policy)."""
    length = key.shape[-2]
    if not 1 <= kept <= length:
        raise ValueError(f"kept={kept}: allowed 1 .. {length} (the request's prompt length)")
    if config.policy == "full" and kept != length:
        raise ValueError(f"kept={kept}: the 'full' policy keeps all {length} tokens")
    if not get_policy(config.policy).traceable:
        return kept_indices_eager(query, key, modality, kept, config=config, scale=scale)
    return _compiled(config.replace(budget=_CANONICAL_BUDGET), float(scale))(query, key, modality, kept)

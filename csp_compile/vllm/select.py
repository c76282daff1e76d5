"""The plugin's selection: ``select_kept``'s kept positions of one request in every layer, compiled once.

vLLM hands each layer one request's post-RoPE Q/K at a time, with a kept count that depends on the
prompt's length (``layout.plan_eviction``). Run eagerly, the selection's ~70 small ops cost about
1.7 ms per layer at 2048 tokens on one core, most of the plugin's prefill overhead; here the
project's own traceable selection (``select_keep_mask`` + ``kept_layout``, what the rewrite emits
into a prefill graph) is compiled by Inductor with the length and the kept count symbolic, so one
compile per (policy settings, scale) serves every request (the first call compiles: ~15 s on two
cores, seconds once Inductor's on-disk cache holds it), and the backend calls it once per request
and step with every layer's Q/K, so the per-call cost (guards, a cold start after the model's
own work) is paid once, not per layer. Policies that cannot be traced
(``Policy.traceable`` False: H2O, LOOK-M, random) run the same function eagerly. No vLLM import:
testable without vLLM.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from csp_compile.config import CSPConfig
from csp_compile.policies import get_policy
from csp_compile.scoring import AttentionInputs
from csp_compile.selection import kept_layout, select_keep_mask

__all__ = ["kept_indices", "kept_indices_eager"]

_CANONICAL_BUDGET = 1.0  # the budget travels as ``kept``: configs differing only in budget share a compile


def kept_indices_eager(query: torch.Tensor, key: torch.Tensor, modality: torch.Tensor, kept: int, *,
                       config: CSPConfig, scale: float) -> torch.Tensor:
    """(n, hkv, kept) int64, each KV head's kept positions ascending, for n independent layers of one
    request: row i is ``select_kept(query[i:i+1], key[i:i+1], modality[None], config.replace(budget=kept),
    scale=scale).indices[0]``, for 1 <= kept <= L (= L for the "full" policy, which keeps everything);
    for "random" only with n = 1 (its draws differ per batch row).
    query (n, hq, L, D), key (n, hkv, L, D) post-RoPE; modality (L,) int ids. Tensor ops only."""
    layers, length = key.shape[0], key.shape[-2]
    budgets = torch.full((layers,), kept, dtype=torch.int64, device=key.device)
    inputs = AttentionInputs(
        query=query, key=key, modality=modality.to(torch.int64).expand(layers, length),
        valid=torch.ones(layers, length, dtype=torch.bool, device=key.device), mask=None, scale=scale,
        window=budgets.clamp(max=config.window), rows=torch.sym_min(config.window, length),
    )
    keep, num_kept, _ = select_keep_mask(inputs, config, budgets=budgets, rank_limit=kept)
    return kept_layout(keep, num_kept, kept)[0]


@functools.lru_cache(maxsize=16)
def _compiled(config: CSPConfig, scale: float) -> Callable[..., torch.Tensor]:
    def select(queries: list[torch.Tensor], keys: list[torch.Tensor], modality: torch.Tensor, kept: int) -> torch.Tensor:
        return kept_indices_eager(torch.stack(queries), torch.stack(keys), modality, kept, config=config, scale=scale)

    return torch.compile(select, dynamic=True, fullgraph=True)


def kept_indices(queries: Sequence[torch.Tensor], keys: Sequence[torch.Tensor], modality: torch.Tensor, kept: int, *,
                 config: CSPConfig, scale: float) -> torch.Tensor:
    """``kept_indices_eager`` of the layers ``queries[i]`` (hq, L, D) / ``keys[i]`` (hkv, L, D) (any
    strides; stacked inside), compiled by Inductor for traceable policies: one call and one compile (per
    policy settings, scale and layer count) for all the layers of a step. ValueError when ``kept`` is
    not in 1 .. L (L only, for the "full" policy) or the layers' shapes differ."""
    if not queries or len(queries) != len(keys) or len({(q.shape, k.shape) for q, k in zip(queries, keys)}) != 1:
        raise ValueError("kept_indices: one (query, key) pair per layer, all of the same shapes: got "
                         f"{[tuple(q.shape) for q in queries]} and {[tuple(k.shape) for k in keys]}")
    length = keys[0].shape[-2]
    if not 1 <= kept <= length:
        raise ValueError(f"kept={kept}: allowed 1 .. {length} (the request's prompt length)")
    if config.policy == "full" and kept != length:
        raise ValueError(f"kept={kept}: the 'full' policy keeps all {length} tokens")
    if not get_policy(config.policy).traceable:  # one layer at a time: "random" seeds its generator per call
        return torch.cat([kept_indices_eager(query[None], key[None], modality, kept, config=config, scale=scale)
                          for query, key in zip(queries, keys)])
    return _compiled(config.replace(budget=_CANONICAL_BUDGET), float(scale))(list(queries), list(keys), modality, kept)

"""Checks shared by the engine tests: the plugin's kept positions against ``select_kept``, and the
paged cache holding exactly the kept K/V in vLLM's own layout."""

from __future__ import annotations

import math
from typing import Any

import torch
from vllm import _custom_ops as ops

from csp_compile.config import CSPConfig
from csp_compile.scoring import resolve_budget
from csp_compile.selection import select_kept
from csp_compile.vllm import batch
from csp_compile.vllm.engine import BLOCK_SIZE


def attention_layer(llm: Any, name: str) -> Any:
    """The engine's attention layer called ``name`` (its ``kv_cache`` and ``isa``)."""
    runner = batch.view_for(llm.llm_engine.vllm_config).runner
    return runner.compilation_config.static_forward_context[name]


def assert_kept_equal_select_kept(llm: Any, record: tuple, config: CSPConfig) -> torch.Tensor:
    """One ``batch.RECORDER`` record: the plan's kept count is docs/design.md §2's B rounded up to the block
    congruence (``kept = L mod block_size``, fewer than a block over B); the plugin's kept indices
    equal ``select_kept`` on the recorded Q/K and modality with that count; and the cache blocks
    hold each KV head's kept K/V in ascending position from the first kept slot (writing the
    oracle's gather there again with vLLM's op changes no byte: the layout is the op's own).
    Returns the oracle's (kv_heads, kept) indices."""
    name, req_id, query, key, value, modality, plan, indices, slots = record
    wanted, _ = resolve_budget(plan.length, config)
    assert (plan.length - plan.kept) % BLOCK_SIZE == 0 and wanted <= plan.kept < wanted + BLOCK_SIZE, name
    oracle = select_kept(query.permute(1, 0, 2)[None], key.permute(1, 0, 2)[None], modality[None],
                         config.replace(budget=plan.kept), scale=1 / math.sqrt(key.shape[-1])).indices[0]
    assert torch.equal(indices, oracle), name
    layer = attention_layer(llm, name)
    cache = layer.kv_cache[0] if isinstance(layer.kv_cache, (list, tuple)) else layer.kv_cache
    block_ids = torch.unique(slots // cache.shape[2])
    index = oracle[..., None].expand(-1, -1, key.shape[-1])
    expected = cache.clone()
    k_view, v_view = expected.view(cache.shape[0], cache.shape[1], 2 * cache.shape[2], -1).chunk(2, dim=2)
    ops.cpu_attn_reshape_and_cache(key.permute(1, 0, 2).gather(1, index).permute(1, 0, 2).contiguous(),
                                   value.permute(1, 0, 2).gather(1, index).permute(1, 0, 2).contiguous(),
                                   k_view, v_view, slots, layer.isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    assert torch.equal(cache[block_ids], expected[block_ids]), name
    return oracle

"""The scheduler's side of CSP: free the blocks a request's prefill step compacted away.

``plugin.py`` wraps ``Scheduler._update_after_schedule`` (run at the end of every ``schedule()``)
with ``free_compacted_blocks``: a request scheduled from zero computed tokens to all of its tokens
in this step is exactly one the attention backend compacts in this step, with the same
``plan_eviction``; its first ``freed_blocks`` blocks of every full-attention KV cache group go
back to the pool, replaced by the null block (what vLLM does for tokens that left a sliding
window). Freeing at schedule time is safe: steps run in order, so a later step that reuses a
block writes it only after this step's attention has read it.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

from csp_compile.config import CSPConfig
from csp_compile.vllm.layout import plan_eviction

__all__ = ["free_compacted_blocks", "fresh_prefills"]


def fresh_prefills(scheduler: Any, scheduler_output: Any) -> list[str]:
    """Ids of the requests this step prefills from zero computed tokens (call before the
    scheduler advances ``num_computed_tokens``)."""
    return [req_id for req_id in scheduler_output.num_scheduled_tokens
            if scheduler.requests[req_id].num_computed_tokens == 0]


def free_compacted_blocks(scheduler: Any, scheduler_output: Any, fresh: list[str], config: CSPConfig) -> dict[str, int]:
    """Free the leading blocks of every request in ``fresh`` that this step prefills whole;
    returns {req_id: blocks freed per KV cache group}. ValueError when the engine has no
    full-attention KV cache group (CSP would silently compact nothing)."""
    freed: dict[str, int] = {}
    managers = [m for m in scheduler.kv_cache_manager.coordinator.single_type_managers
                if type(m) is FullAttentionManager]
    if not managers:
        raise ValueError("csp_compile.vllm: the engine has no full-attention KV cache group for CSP to compact "
                         "(every layer has a sliding window or another kind of attention)")
    for req_id in fresh:
        request = scheduler.requests[req_id]
        scheduled = scheduler_output.num_scheduled_tokens[req_id]
        if scheduled != request.num_tokens or scheduled < 2:
            continue
        for manager in managers:
            plan = plan_eviction(scheduled, config, manager.block_size)
            if plan.freed_blocks:
                manager._remove_blocks_in_range(req_id, 0, plan.freed_blocks)
                freed[req_id] = plan.freed_blocks
    return freed

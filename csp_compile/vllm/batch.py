"""The worker's view of the running batch: which request each row is, and what it evicted.

vLLM's attention metadata has no request ids, so ``plugin.py`` wraps the model runner's
``__init__`` to hand the runner to its engine's view (``view_for(runner.vllm_config)``: the
attention impls and metadata builders of that runner see the same ``VllmConfig`` object, so
several engines in one process keep apart); rows of a step are ``runner.input_batch.req_ids`` in
order (final when metadata is built and attention runs). ``evicted_tokens[req_id]`` is set by the attention backend at the request's prefill step
and read by the metadata builder at every later step; a fresh prefill of the request (after a
preemption) drops it first.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["BatchView", "RECORDER", "view_for"]

# Test hook: each callable in RECORDER is called as recorder(layer_name, req_id, query (L, hq, D), key / value (L, hkv, D), modality (L,),
# plan, indices (hkv, kept), slots) at every compaction (slots: the cache slots written).
RECORDER: list[Callable[..., None]] = []


class BatchView:
    """State of one engine's worker: its runner and the tokens each request evicted."""

    def __init__(self) -> None:
        self.runner: Any = None
        self.evicted_tokens: dict[str, int] = {}

    def attach_runner(self, runner: Any) -> None:
        self.runner = runner
        self.evicted_tokens.clear()

    def req_ids(self, num_reqs: int) -> list[str]:
        """Request id of each of the first ``num_reqs`` rows of the current step."""
        if self.runner is None:
            raise RuntimeError("csp_compile.vllm: no model runner attached (the plugin was not registered "
                               "before the engine started)")
        return list(self.runner.input_batch.req_ids[:num_reqs])

    def request(self, req_id: str) -> Any:
        """The runner's ``CachedRequestState`` of ``req_id`` (``mm_features``, ``prompt_token_ids`` ...)."""
        return self.runner.requests[req_id]

    def offsets(self, req_ids: list[str], fresh: list[bool]) -> torch.Tensor | None:
        """(rows,) evicted leading tokens per row, or None when no row has any. Rows that are
        ``fresh`` prefills (nothing computed before this step) drop their stale record (a preempted
        request is recomputed from scratch). Records of requests that left the runner are dropped."""
        live = self.runner.requests
        for req_id in [r for r in self.evicted_tokens if r not in live]:
            del self.evicted_tokens[req_id]
        values = []
        for req_id, is_fresh in zip(req_ids, fresh):
            if is_fresh:
                self.evicted_tokens.pop(req_id, None)
            values.append(self.evicted_tokens.get(req_id, 0))
        if not any(values):
            return None
        return torch.tensor(values, dtype=torch.int32)


_VIEWS: dict[int, tuple[Any, BatchView]] = {}


def view_for(vllm_config: Any) -> BatchView:
    """The ``BatchView`` of the engine whose config object is ``vllm_config``."""
    entry = _VIEWS.get(id(vllm_config))
    if entry is None or entry[0] is not vllm_config:
        entry = _VIEWS[id(vllm_config)] = (vllm_config, BatchView())
    return entry[1]

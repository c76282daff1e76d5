"""Peak memory of one prefill, above what was allocated before it.

CUDA: ``torch.cuda.max_memory_allocated`` (caching allocator, reset before the prefill).
CPU: there is no allocator peak counter, and a process's peak RSS is dominated by compilation, so
the prefill (already compiled by a warm-up call) runs under ``torch.profiler`` with
``profile_memory=True``; every CPU tensor allocation and free is an allocation event of the
profiler's event tree, and the peak is the largest running sum of their sizes in time order. It counts torch tensor memory only (the KV cache,
activations, scores, masks, the kept K/V), not Python objects or the allocator's free pages.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile
from transformers import PreTrainedModel

from csp_compile.bench.prefill import prefill, sync

__all__ = ["METHOD", "peak_of", "peak_prefill_bytes"]

METHOD = {
    "cpu": "torch.profiler(profile_memory=True): peak of live torch CPU tensor bytes during the prefill, "
           "above those live before it",
    "cuda": "torch.cuda.max_memory_allocated during the prefill minus memory_allocated before it",
}


def peak_prefill_bytes(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> tuple[int, Any]:
    """(peak bytes above the start, the prefill output). Call after a warm-up prefill."""
    device = inputs["input_ids"].device
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        output = prefill(model, inputs)
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before, output
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        output = prefill(model, inputs)
    return peak_of(prof), output


def peak_of(prof: profile) -> int:
    """Peak live CPU tensor bytes of a ``profile(profile_memory=True)`` run, above those live at its start."""
    allocations = sorted((node for node in _walk(prof.profiler.kineto_results.experimental_event_tree())
                          if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu"),
                         key=lambda node: node.start_time_ns)
    live = peak = 0
    for node in allocations:  # + bytes allocated, - bytes freed (frees of blocks older than the prefill are not reported)
        live += node.extra_fields.alloc_size
        peak = max(peak, live)
    return peak


def _walk(nodes: Iterable[Any]) -> Iterator[Any]:
    for node in nodes:
        yield node
        yield from _walk(node.children)

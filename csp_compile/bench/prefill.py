"""Prefill: one forward of the whole Llava on a fresh ``DynamicCache`` (what ``generate`` does first),
timed after warm-up, and the KV bytes it leaves in the cache."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from transformers import DynamicCache, PreTrainedModel

__all__ = ["alternating_times", "cache_bytes", "prefill", "sync", "time_prefill"]


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def prefill(model: PreTrainedModel, inputs: dict[str, torch.Tensor]) -> Any:
    """The model's output for the prompt with a fresh cache; only the last position's logits."""
    cache = DynamicCache(config=model.config.get_text_config())
    with torch.no_grad():
        return model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)


def time_prefill(model: PreTrainedModel, inputs: dict[str, torch.Tensor], repeats: int,
                 warmup: int = 2) -> tuple[float, list[float]]:
    """(median seconds, all timings) of ``repeats`` prefills after ``warmup`` untimed ones (the first
    compiles)."""
    device = inputs["input_ids"].device
    for _ in range(warmup):
        prefill(model, inputs)
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        prefill(model, inputs)
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def alternating_times(models: dict[str, PreTrainedModel], inputs: dict[str, torch.Tensor], rounds: int,
                      warmup: int = 2, run: dict[str, Callable[[PreTrainedModel, dict], float]] | None = None
                      ) -> dict[str, list[float]]:
    """Seconds per prefill of each model over ``rounds`` rounds after ``warmup`` untimed prefills each (the
    first compiles), the models taking each place in the round order in turn (drifting machine speed hits
    all alike); round ``i`` of every model is one comparison. ``run[name](model, inputs)``, if given, runs
    (e.g. profiles) one prefill and returns its seconds."""
    names = list(models)
    for name in names:
        for _ in range(warmup):
            prefill(models[name], inputs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            if run is not None and name in run:
                times[name].append(run[name](models[name], inputs))
            else:
                times[name] += time_prefill(models[name], inputs, repeats=1, warmup=0)[1]
    return times


def cache_bytes(cache: Any) -> int:
    """Bytes of the K and V tensors a cache holds, summed over layers (what decoding reads)."""
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total

"""Decode: per-token time of ``generate`` after the prefill, and recompiles while decoding.

``StepClock`` is a logits processor: ``generate`` calls it once per produced token, right after
that token's forward, so the gaps between its calls are the decode steps (forward + sampling +
generate's bookkeeping). The first call follows the prefill; the first two decode steps may
compile (the cache length becomes dynamic on the second), so the reported step time is the median
of the later ones. Recompiles are new Dynamo graphs (``counters["stats"]["unique_graphs"]``)
between the end of the first decode step and the end of generation.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch._dynamo.utils import counters
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel

from csp_compile.bench.prefill import sync

__all__ = ["DecodeResult", "StepClock", "timed_decode"]

SKIPPED_STEPS = 2


def compiled_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


class StepClock(LogitsProcessor):
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = device
        self.stamps: list[float] = []
        self.graphs: list[int] = []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.stamps.append(time.perf_counter())
        self.graphs.append(compiled_graphs())
        return scores

    def decode_steps(self) -> list[float]:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return gaps[SKIPPED_STEPS:]

    def recompiles_after_first_step(self) -> int:
        # stamps[1] is taken right after the first decode step's forward.
        return self.graphs[-1] - self.graphs[1]


@dataclass(frozen=True)
class DecodeResult:
    step_s: float  # median per-token decode time
    steps_timed: int
    recompiles: int
    prompt_tokens: int


def timed_decode(model: PreTrainedModel, inputs: dict[str, torch.Tensor], new_tokens: int) -> DecodeResult:
    if new_tokens < SKIPPED_STEPS + 2:
        raise ValueError(f"new tokens must be >= {SKIPPED_STEPS + 2} (the first {SKIPPED_STEPS} decode steps compile)")
    clock = StepClock(inputs["input_ids"].device)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       logits_processor=LogitsProcessorList([clock]))
    steps = clock.decode_steps()
    return DecodeResult(statistics.median(steps), len(steps), clock.recompiles_after_first_step(),
                        inputs["input_ids"].shape[1])

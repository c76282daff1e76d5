"""Scoring micro-benchmark: one attention layer's CSP self/cross scores, three ways, same inputs.

- naive: the authors' way (arXiv 2412.04652 code): the full L x L score matrix in eager PyTorch,
  causal mask added as an L x L tensor, n-softmax over every row, then the last W rows split by
  modality and (for GQA) averaged per KV head.
- reference: ``csp_compile``'s plain-PyTorch reference (``policies.csp_scores``: window rows only).
- fused: what a rewritten prefill graph computes: the same score function over the window rows,
  given the attention kernel's log-sum-exp (a by-product of the attention, computed once here),
  compiled by Inductor.

All three return (self, cross) scores of shape (b, hkv, L); the result records the largest
difference of naive and fused from the reference, so a fast wrong kernel does not go unnoticed.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from csp_compile.config import CSPConfig
from csp_compile.policies import get_policy
from csp_compile.scoring import AttentionInputs, masked_scores
from csp_compile.selection import make_attention_inputs
from csp_compile.templates import choose_scoring, naive_scores

__all__ = ["ScoringCase", "ScoringResult", "fused_scorer", "make_case", "naive_scorer", "op_scoring", "time_scoring"]

Scorer = Callable[[], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class ScoringCase:
    """One layer's prefill: post-RoPE Q/K of the bench shape and the prompt's modality ids."""

    inputs: AttentionInputs
    config: CSPConfig


def make_case(modality: torch.Tensor, *, heads: int, kv_heads: int, head_dim: int, config: CSPConfig,
              dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0) -> ScoringCase:
    """Random Q (1, heads, L, D) / K (1, kv_heads, L, D) for the modality ids (1, L) of a bench prompt."""
    gen = torch.Generator().manual_seed(seed)
    length = modality.shape[-1]
    query = torch.randn(1, heads, length, head_dim, generator=gen).to(device=device, dtype=dtype)
    key = torch.randn(1, kv_heads, length, head_dim, generator=gen).to(device=device, dtype=dtype)
    inputs = make_attention_inputs(query, key, modality.to(device), config)
    return ScoringCase(inputs, config)


# --- the three scorers ---------------------------------------------------------------------------

def reference_scores(inputs: AttentionInputs, config: CSPConfig) -> tuple[torch.Tensor, torch.Tensor]:
    scores = get_policy("csp").score(inputs, config)
    return scores.primary, scores.secondary


def fused_scorer(case: ScoringCase) -> tuple[Scorer, str]:
    """(scorer, implementation name): ``csp_scores`` as the prefill graph runs it (R window rows, the
    attention's log-sum-exp), through ``torch.compile``; the first call compiles."""
    i = case.inputs
    rows = int(i.window.max())
    lse = torch.logsumexp(masked_scores(i, slice(i.length - rows, i.length)), dim=-1)

    def score(query: torch.Tensor, key: torch.Tensor, window_lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return reference_scores(dataclasses.replace(i, query=query, key=key, rows=rows, window_lse=window_lse),
                                case.config)

    compiled = torch.compile(score, fullgraph=True, dynamic=False)
    return (lambda: compiled(i.query, i.key, lse)), "inductor (csp_scores traced with the attention's log-sum-exp)"


def naive_scorer(case: ScoringCase) -> tuple[Scorer, str]:
    """The authors' way, ``csp_compile.templates.naive_scores``."""
    i = case.inputs

    def score() -> tuple[torch.Tensor, torch.Tensor]:
        result = naive_scores(i.query, i.key, i.modality, case.config, scale=i.scale)
        return result.primary, result.secondary

    return score, "csp_compile.templates.naive_scores"


def op_scoring() -> str:
    """How a rewritten layer selects for CSP (``choose_scoring``)."""
    return str(choose_scoring("csp"))


# --- timing ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScoringResult:
    naive_s: float
    reference_s: float
    fused_s: float
    naive_impl: str
    fused_impl: str
    naive_max_abs_diff: float  # vs the reference, over self and cross
    fused_max_abs_diff: float

    @property
    def naive_speedup(self) -> float:
        return self.naive_s / self.fused_s

    @property
    def reference_speedup(self) -> float:
        return self.reference_s / self.fused_s


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Scorer, device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _median_times(scorers: dict[str, Scorer], repeats: int, device: str) -> dict[str, float]:
    """Median seconds per scorer; the scorers take turns in each round, so drift in the machine's
    load (2 shared cores) hits them alike. One untimed warm-up call each first."""
    for fn in scorers.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in scorers}
    for _ in range(repeats):
        for name, fn in scorers.items():
            times[name].append(_timed(fn, device))
    return {name: statistics.median(values) for name, values in times.items()}


def _max_diff(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> float:
    return max(float((x.double() - y.double()).abs().max()) for x, y in zip(a, b))


def time_scoring(case: ScoringCase, repeats: int) -> ScoringResult:
    device = case.inputs.query.device.type
    with torch.no_grad():
        naive, naive_impl = naive_scorer(case)
        fused, fused_impl = fused_scorer(case)
        reference = lambda: reference_scores(case.inputs, case.config)  # noqa: E731
        expected = reference()
        naive_diff = _max_diff(naive(), expected)
        fused_diff = _max_diff(fused(), expected)
        fast = _median_times({"reference": reference, "fused": fused}, repeats, device)
        slow = _median_times({"naive": naive}, max(1, repeats // 3), device)
        return ScoringResult(
            naive_s=slow["naive"], reference_s=fast["reference"], fused_s=fast["fused"],
            naive_impl=naive_impl, fused_impl=fused_impl,
            naive_max_abs_diff=naive_diff, fused_max_abs_diff=fused_diff,
        )

"""Eviction policies: a score function plus a split rule (docs/design.md §2). One entry per policy.

A policy scores every position per KV head with a *primary* and optionally a *secondary* score;
its split rule says how many of the K non-window picks come from the secondary score (taken
among the candidates the primary picks left). CSP: primary = self, secondary = cross.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch


from csp_compile import scoring
from csp_compile.scoring import AttentionInputs

if TYPE_CHECKING:  # config validates policy names against this registry: no import cycle at run time
    from csp_compile.config import CSPConfig


@dataclass(frozen=True)
class PolicyScores:
    """Per-KV-head scores, each (b, hkv, L); higher = keep first."""

    primary: torch.Tensor
    secondary: torch.Tensor | None = None


ScoreFn = Callable[[AttentionInputs, "CSPConfig"], PolicyScores]
# (scores, inputs, config, k_total (b, hkv)) -> picks taken from the secondary score, (b, hkv) int64
SplitFn = Callable[[PolicyScores, AttentionInputs, "CSPConfig", torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Policy:
    """A registered eviction policy; ``score=None`` means nothing is evicted."""

    name: str
    description: str
    score: ScoreFn | None
    split: SplitFn
    traceable: bool = False  # score and split are tensor ops without host syncs: scored inside the compiled graph
    default_pool: str | None = None  # a window-scored policy's pooling when CSPConfig.pool is None; None: never pools


_POLICIES: dict[str, Policy] = {}


def register_policy(
    name: str, description: str, split: SplitFn | None = None, *, traceable: bool = False, pool: str | None = None,
) -> Callable[[ScoreFn], ScoreFn]:
    """Decorator registering a score function as policy ``name`` (split defaults to primary-only).
    ``traceable``: score and split use tensor ops only (no ``int(tensor)``, no Python loop over L), so
    the rewrite emits them into the prefill graph for Inductor; otherwise they run eagerly in an op.
    ``pool``: for a window-scored policy whose score function applies ``scoring.pool_scores``, its
    default pooling mode (``CSPConfig.pool``); None for a policy that never pools."""

    def wrap(score: ScoreFn) -> ScoreFn:
        if name in _POLICIES:
            raise ValueError(f"policy {name!r} is already registered")
        _POLICIES[name] = Policy(name, description, score, split or primary_only, traceable, pool)
        return score

    return wrap


def available_policies() -> tuple[str, ...]:
    """Names of all registered policies."""
    return tuple(_POLICIES)


def window_scored_policies() -> tuple[str, ...]:
    """Names of the policies that score with the window and take ``CSPConfig.pool``."""
    return tuple(name for name, policy in _POLICIES.items() if policy.default_pool is not None)


def get_policy(name: str) -> Policy:
    """The policy registered as ``name``; unknown names raise ValueError listing the known ones."""
    try:
        return _POLICIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown policy {name!r}: allowed one of {list(_POLICIES)}") from None


# --- split rules -------------------------------------------------------------------------------

def primary_only(scores: PolicyScores, inputs: AttentionInputs, config: CSPConfig, k_total: torch.Tensor) -> torch.Tensor:
    """All K picks from the primary score."""
    return torch.zeros_like(k_total)


def cross_ratio_split(scores: PolicyScores, inputs: AttentionInputs, config: CSPConfig, k_total: torch.Tensor) -> torch.Tensor:
    """``K_cross = round(K * cross_ratio)`` per KV head; 0 when no (window, candidate) pair differs."""
    population = scoring.cross_population(inputs)[:, None]  # (b, 1)
    rule = config.cross_ratio
    if rule == "population":
        ratio = population.expand(-1, inputs.kv_heads)
    elif rule == "mass":
        ratio = scoring.cross_mass(inputs, scores.primary, scores.secondary)
    elif rule == "auto":
        ratio = (population + scoring.cross_mass(inputs, scores.primary, scores.secondary)) / 2
    else:
        ratio = torch.full_like(population, float(rule)).expand(-1, inputs.kv_heads)
    ratio = torch.where(population > 0, ratio, 0.0)
    k_cross = torch.round(k_total.to(torch.float64) * ratio).to(torch.int64)
    return torch.minimum(k_cross.clamp(min=0), k_total)


def cross_give_back_split(scores: PolicyScores, inputs: AttentionInputs, config: CSPConfig, k_total: torch.Tensor) -> torch.Tensor:
    """``cross_ratio_split``, but never more cross picks than candidates with a cross score above 0: the rest
    of the quota goes back to the self ranking (docs/design.md §2 fills it with the earliest zero-score positions)."""
    scored = ((scores.secondary > 0) & inputs.candidates()[:, None, :]).sum(-1)
    return torch.minimum(cross_ratio_split(scores, inputs, config, k_total), scored)


def text_first_split(scores: PolicyScores, inputs: AttentionInputs, config: CSPConfig, k_total: torch.Tensor) -> torch.Tensor:
    """Text candidates first (primary), the rest of K by the secondary score."""
    text = (inputs.candidates() & (inputs.modality == 0)).sum(-1)
    return (k_total - text[:, None]).clamp(min=0)


_POLICIES["full"] = Policy("full", "no eviction: the whole prompt is kept", None, primary_only, traceable=True)


# --- score functions ---------------------------------------------------------------------------

@register_policy(
    "csp",
    "Cross-Self Pruning: n-softmax window attention split into self/cross modality parts",
    split=cross_ratio_split,
    traceable=True,
    pool="none",
)
def csp_scores(inputs: AttentionInputs, config: CSPConfig) -> PolicyScores:
    probs = scoring.window_probs(inputs, config.n)
    self_scores, cross_scores = scoring.modality_split(inputs, probs)
    self_scores, cross_scores = scoring.gqa_mean(self_scores, inputs.kv_heads), scoring.gqa_mean(cross_scores, inputs.kv_heads)
    if config.pooling == "none":
        return PolicyScores(self_scores, cross_scores)
    both = scoring.pool_scores(torch.cat([self_scores, cross_scores], dim=1), inputs, config)  # one pass for both
    return PolicyScores(*both.chunk(2, dim=1))


register_policy(
    "csp_giveback",
    "CSP with the cross quota no candidate's cross score fills given back to the self ranking (a study, issue 12)",
    split=cross_give_back_split,
    traceable=True,
    pool="none",
)(csp_scores)


@register_policy("snapkv", "SnapKV: softmax window attention summed over the window, average-pooled", traceable=True,
                 pool="1d")
def snapkv_scores(inputs: AttentionInputs, config: CSPConfig) -> PolicyScores:
    summed = scoring.window_probs(inputs, n=0.0).sum(dim=2)
    return PolicyScores(scoring.gqa_mean(scoring.pool_scores(summed, inputs, config), inputs.kv_heads))


@register_policy("h2o", "H2O: softmax attention accumulated over all prompt queries (heavy hitters)")
def h2o_scores(inputs: AttentionInputs, config: CSPConfig) -> PolicyScores:
    return PolicyScores(scoring.accumulated_attention(inputs))


@register_policy("streaming", "StreamingLLM: the first sink_tokens tokens plus the most recent ones", traceable=True)
def streaming_scores(inputs: AttentionInputs, config: CSPConfig) -> PolicyScores:
    order = torch.cumsum(inputs.valid.to(torch.int64), dim=-1) - 1  # index among real tokens
    sink = order < config.sink_tokens
    score = torch.where(sink, 2 * inputs.length - order, order).to(torch.float64)  # sinks: earliest first
    return PolicyScores(score[:, None, :].expand(-1, inputs.kv_heads, -1))


@register_policy(
    "lookm_text_prior",
    "LOOK-M text prior: text tokens kept first, the rest by accumulated attention",
    split=text_first_split,
)
def lookm_text_prior_scores(inputs: AttentionInputs, config: CSPConfig) -> PolicyScores:
    accumulated = scoring.accumulated_attention(inputs)
    text = (inputs.modality == 0)[:, None, :]
    return PolicyScores(accumulated.masked_fill(~text, float("-inf")), accumulated)


@register_policy("random", "uniformly random scores, seeded by config.seed (a floor for comparisons)")
def random_scores(inputs: AttentionInputs, config: CSPConfig) -> PolicyScores:
    generator = torch.Generator(device="cpu").manual_seed(config.seed)
    b, length = inputs.valid.shape
    score = torch.rand(b, inputs.kv_heads, length, generator=generator, dtype=torch.float64)
    return PolicyScores(score.to(inputs.key.device))

"""How a rewritten layer selects: "inductor" (traced into the prefill graph) or "reference" (an eager op).

``choose_scoring`` is the one decision, read by the rewrite (``passes.evict_prefill``) and by
``csp_compile.explain``: a policy whose score and split are traceable (``Policy.traceable``) becomes
aten ops in the prefill graph, fused by Inductor; any other runs ``prefill_selection`` eagerly in
``csp::select_reference``. ``CSP_SCORING=reference`` in the environment forces the eager op (for
tests and comparisons; read when a graph is compiled).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from csp_compile.policies import get_policy

__all__ = ["SCORING_ENV", "ScoringChoice", "choose_scoring"]

SCORING_ENV = "CSP_SCORING"
SCORING_MODES = ("auto", "reference")


@dataclass(frozen=True)
class ScoringChoice:
    """A layer's selection implementation ("inductor" or "reference") and why."""

    implementation: str
    reason: str

    @property
    def traced(self) -> bool:
        return self.implementation == "inductor"

    def __str__(self) -> str:
        return f"{self.implementation} ({self.reason})"


def choose_scoring(policy: str) -> ScoringChoice:
    """The selection implementation of ``policy`` under the current ``CSP_SCORING``."""
    mode = os.environ.get(SCORING_ENV, "auto") or "auto"
    if mode not in SCORING_MODES:
        raise ValueError(f"{SCORING_ENV}={mode!r}: allowed one of {list(SCORING_MODES)}")
    if mode == "reference":
        return ScoringChoice("reference", f"forced by {SCORING_ENV}=reference")
    if not get_policy(policy).traceable:
        return ScoringChoice("reference", f"policy {policy!r} is not traceable: scored eagerly in csp::select_reference")
    return ScoringChoice("inductor", "window scores as aten ops in the prefill graph, fused by Inductor; never L x L")

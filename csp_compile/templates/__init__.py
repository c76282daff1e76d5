"""Fused scoring/eviction kernels: Triton templates for GPUs, the fused window scorer for CPUs.

``score_window`` is the fused scorer (window rows only, never L x L), ``naive_scores`` the
authors' full L x L way (a benchmark baseline), ``choose_scoring`` which one a layer uses.
``triton_scoring`` is imported on demand (it needs Triton).
"""

from csp_compile.templates.cpu_scoring import FUSED_POLICIES, score_window
from csp_compile.templates.lowering import ScoringChoice, choose_scoring, select_with
from csp_compile.templates.naive_scoring import naive_scores

__all__ = ["FUSED_POLICIES", "ScoringChoice", "choose_scoring", "naive_scores", "score_window", "select_with"]

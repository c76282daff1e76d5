"""Which scorer a rewritten layer uses ("triton" / "cpu-fused" / "reference"), and the selection through it.

``choose_scoring`` is the one decision, read by ``csp::prefill_attention`` at run time and by
``csp_compile.explain``: Triton templates for CSP on CUDA (fp16/bf16/fp32, Triton installed), the
fused window scorer of ``cpu_scoring`` for CSP and SnapKV elsewhere, the reference score functions
for policies that need more than the window (H2O) or no attention at all. ``CSP_SCORING=reference``
in the environment forces the reference (for tests and comparisons).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from csp_compile.config import CSPConfig
from csp_compile.policies import PolicyScores
from csp_compile.selection import Selection, make_attention_inputs, select_from_scores, select_kept
from csp_compile.templates.cpu_scoring import FUSED_POLICIES, score_window

__all__ = ["SCORING_ENV", "ScoringChoice", "choose_scoring", "select_with"]

SCORING_ENV = "CSP_SCORING"
SCORING_MODES = ("auto", "reference")
_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_REFERENCE_REASONS = {
    "full": "policy 'full' evicts nothing: no scores",
    "h2o": "policy 'h2o' accumulates the attention of every prompt query, not only the window's",
    "lookm_text_prior": "policy 'lookm_text_prior' accumulates the attention of every prompt query",
    "streaming": "policy 'streaming' ranks by position: no attention to fuse",
    "random": "policy 'random' ranks by seeded noise: no attention to fuse",
}


@dataclass(frozen=True)
class ScoringChoice:
    """A layer's scoring implementation ("triton", "cpu-fused" or "reference") and why."""

    implementation: str
    reason: str

    def __str__(self) -> str:
        return f"{self.implementation} ({self.reason})"


def choose_scoring(device: torch.device | str, policy: str, dtype: torch.dtype = torch.float32) -> ScoringChoice:
    """The scorer for query/key tensors on ``device`` of ``dtype`` under ``policy``."""
    mode = os.environ.get(SCORING_ENV, "auto") or "auto"
    if mode not in SCORING_MODES:
        raise ValueError(f"{SCORING_ENV}={mode!r}: allowed one of {list(SCORING_MODES)}")
    if mode == "reference":
        return ScoringChoice("reference", f"forced by {SCORING_ENV}=reference")
    if policy not in FUSED_POLICIES:
        reason = _REFERENCE_REASONS.get(policy, f"policy {policy!r} has no fused scorer")
        return ScoringChoice("reference", reason)
    if torch.device(device).type == "cuda":
        if policy != "csp":
            return ScoringChoice("cpu-fused", f"no Triton template for policy {policy!r}: the fused torch scorer on CUDA")
        if dtype not in _TRITON_DTYPES:
            return ScoringChoice("cpu-fused", f"{dtype} is not a Triton template dtype: the fused torch scorer on CUDA")
        if importlib.util.find_spec("triton") is None:
            return ScoringChoice("cpu-fused", "Triton is not installed: the fused torch scorer on CUDA")
        return ScoringChoice("triton", "window_scores_triton on CUDA: key tiles, never L x L")
    return ScoringChoice("cpu-fused", "window queries only: (W x L) scores per head, never L x L")


def select_with(
    choice: ScoringChoice,
    query: torch.Tensor,
    key: torch.Tensor,
    modality: torch.Tensor,
    config: CSPConfig,
    *,
    attn_mask: torch.Tensor | None = None,
    attention_mask_2d: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = True,
) -> Selection:
    """``select_kept``'s selection of one layer, scored by ``choice``; arguments as ``score_window``'s
    (``attn_mask=None``: causal if ``is_causal`` else bidirectional)."""
    if choice.implementation == "reference":
        mask = attn_mask
        if mask is None and not is_causal:  # select_kept reads mask=None as causal
            length = query.shape[2]
            mask = torch.ones(1, 1, length, length, dtype=torch.bool, device=query.device)
        while mask is not None and mask.dim() < 4:
            mask = mask.unsqueeze(0)
        return select_kept(query, key, modality, config, attention_mask=attention_mask_2d, mask=mask, scale=scale)
    if choice.implementation == "triton":
        scores = _triton_scores(query, key, modality, config, attn_mask, attention_mask_2d, scale, is_causal)
    elif choice.implementation == "cpu-fused":
        scores = score_window(query, key, modality, config, attn_mask=attn_mask, attention_mask_2d=attention_mask_2d,
                              scale=scale, is_causal=is_causal)
    else:
        raise ValueError(f"unknown scoring implementation {choice.implementation!r}: allowed triton, cpu-fused, reference")
    inputs = make_attention_inputs(query, key, modality, config, attention_mask=attention_mask_2d, scale=scale)
    return select_from_scores(inputs, config, scores)


def _triton_scores(query, key, modality, config, attn_mask, attention_mask_2d, scale, is_causal) -> PolicyScores:
    """CSP (self, cross) by ``window_scores_triton`` (imported on first use: CUDA only)."""
    from csp_compile.templates.cpu_scoring import window_problem
    from csp_compile.templates.triton_scoring import window_scores_triton

    problem = window_problem(query, key, modality, config, attn_mask=attn_mask, attention_mask_2d=attention_mask_2d,
                             scale=scale, is_causal=is_causal)
    b, hq, hkv, w_max, length = problem.shape
    mask_rows = problem.mask_rows
    if mask_rows is None and not is_causal:  # the template reads None as causal
        mask_rows = torch.ones(1, 1, w_max, length, dtype=torch.bool, device=query.device)
    valid = problem.valid if problem.valid is not None else torch.ones(b, length, dtype=torch.bool, device=query.device)
    self_scores, cross_scores = window_scores_triton(
        query[:, :, length - w_max:], key, modality, valid, mask_rows, problem.scale, config.n, hkv,
    )
    return PolicyScores(self_scores, cross_scores)

"""Fused window scorer (the "cpu-fused" path): CSP / SnapKV scores from the W window queries only.

For each query head and window query, ``p = exp(s - lse) * sigmoid(lse - ln n)`` of every key
(n-softmax in log-sum-exp form; ``n = 0`` is softmax, rows that attend nothing give 0), with
``s = scale * <q, k> + mask``; ``p`` is summed over the window queries into self (same modality)
and cross parts and averaged over each KV head's query heads: exactly the reference
``csp_scores`` / ``snapkv_scores`` (DESIGN §2), vectorised over batch and heads. Only the
(W, L) rows of the mask are read; nothing L x L is ever built. Keys are processed in chunks
(two passes: the row LSE, then the scores) when one (b, hq, W, L) block would be too large.

Plain PyTorch ops on any device, in place on one scores block per chunk, eager by default: the block
is bound by its one matmul and one exp pass, and Inductor's version measured no faster on CPU (about
5 ms either way at 8 heads, L = 4096, W = 32, one thread) while costing a compile per process.
``CSP_SCORING_COMPILE=1`` compiles the per-chunk kernel with ``torch.compile`` (Inductor) instead.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from csp_compile.config import CSPConfig
from csp_compile.policies import PolicyScores
from csp_compile.scoring import default_scale, resolve_budget
from csp_compile.selection import check_query_key

__all__ = ["FUSED_POLICIES", "WindowProblem", "fused_policy_scores", "score_window", "window_problem", "window_sums"]

# Policies whose score is a function of the window queries' attention: the fused scorer computes them.
FUSED_POLICIES = ("csp", "snapkv")
# Elements of one (b, hq, W, chunk) block of scores; above it the key axis is chunked.
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class WindowProblem:
    """One layer's window-scoring inputs, validated (shapes: b, hq, hkv, Wmax, L, D; M modalities).

    query_window (b, hkv, group * Wmax, D) compute dtype, query head h = kv * group + g; key
    (b, hkv, L, D) compute dtype; mask_rows the model mask's window rows, bool or additive,
    broadcastable to (b, hq, Wmax, L), or None: causal if ``causal`` else bidirectional; valid (b, L)
    real tokens, or None without padding; row_live (b, Wmax) rows inside their sequence's window;
    query_groups (b, M, Wmax) / key_groups (b, M, L): which window queries / keys have the m-th of
    the M modalities present in the window; window (b,) each sequence's W.
    """

    query_window: torch.Tensor
    key: torch.Tensor
    mask_rows: torch.Tensor | None
    causal: bool
    valid: torch.Tensor | None
    row_live: torch.Tensor
    query_groups: torch.Tensor
    key_groups: torch.Tensor
    window: torch.Tensor
    scale: float
    group: int

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        """(b, hq, hkv, Wmax, L)."""
        b, hkv, rows, _ = self.query_window.shape
        return b, hkv * self.group, hkv, rows // self.group, self.key.shape[2]

    def candidates(self) -> torch.Tensor:
        """(b, L) real tokens before each sequence's window."""
        b, _, _, _, length = self.shape
        positions = torch.arange(length, device=self.key.device)
        before = positions[None, :] < (length - self.window)[:, None]
        return before if self.valid is None else before & self.valid


def window_problem(
    query: torch.Tensor,
    key: torch.Tensor,
    modality: torch.Tensor | None,
    config: CSPConfig,
    *,
    attn_mask: torch.Tensor | None = None,
    attention_mask_2d: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = True,
) -> WindowProblem:
    """Validate one layer's prefill tensors and cut out what window scoring reads (O(W * L))."""
    b, hq, length, dim = check_query_key(query, key)
    device = query.device
    if modality is None:
        modality = torch.zeros(b, length, dtype=torch.int64, device=device)
    if modality.shape != (b, length) or modality.is_floating_point() or modality.dtype == torch.bool:
        raise ValueError(f"modality must be an integer tensor of shape {(b, length)}: got {modality.dtype} {tuple(modality.shape)}")
    if attention_mask_2d is not None and attention_mask_2d.shape != (b, length):
        raise ValueError(f"attention_mask_2d must have shape {(b, length)}: got {tuple(attention_mask_2d.shape)}")
    valid = None if attention_mask_2d is None else attention_mask_2d.to(device) != 0
    real = [length] * b if valid is None else valid.sum(-1).tolist()
    window = torch.tensor([resolve_budget(int(n), config)[1] for n in real], dtype=torch.int64, device=device)
    w_max = max(int(window.max()), 1)
    row_live = torch.arange(w_max, device=device)[None, :] >= (w_max - window)[:, None]
    if valid is not None and bool((row_live & ~valid[:, length - w_max:]).any()):
        raise ValueError("attention_mask_2d has padding inside the last `window` positions: pad on the left")
    if valid is not None and bool(valid.all()):
        valid = None
    mask_rows = _mask_rows(attn_mask, b, hq, length, w_max)
    dtype = torch.promote_types(query.dtype, torch.float32)
    hkv = key.shape[1]
    group = hq // hkv
    query_window = query[:, :, length - w_max:].to(dtype).reshape(b, hkv, group * w_max, dim)
    modality = modality.to(device)
    present = torch.unique(modality[:, length - w_max:])  # (M,): at most Wmax ids
    query_groups = modality[:, None, length - w_max:] == present[None, :, None]
    key_groups = modality[:, None, :] == present[None, :, None]
    return WindowProblem(
        query_window=query_window, key=key.to(dtype), mask_rows=mask_rows, causal=is_causal, valid=valid,
        row_live=row_live, query_groups=query_groups, key_groups=key_groups, window=window,
        scale=default_scale(dim) if scale is None else float(scale), group=group,
    )


def _mask_rows(mask: torch.Tensor | None, b: int, hq: int, length: int, w_max: int) -> torch.Tensor | None:
    """The window rows of an SDPA-style mask, as a 4-D view (no copy)."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"attn_mask must be bool (True = attend) or additive float: got {mask.dtype}")
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if (mask.dim() != 4 or mask.shape[-1] != length or mask.shape[-2] not in (1, length)
            or mask.shape[0] not in (1, b) or mask.shape[1] not in (1, hq)):
        raise ValueError(f"attn_mask must broadcast as (b, heads, L, L) = {(b, hq, length, length)}: got {tuple(mask.shape)}")
    return mask[..., length - w_max:, :] if mask.shape[-2] == length else mask


# --- the kernel --------------------------------------------------------------------------------
# One (b, hq, Wmax, C) block of scores per key chunk, updated in place: scale, mask, one exp pass;
# the window sums per modality are one small matmul, (M query modalities x Wmax) @ (Wmax x C).

def _masked_scores(
    query_window: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    valid: torch.Tensor | None,
    window_rows: int,
    query_start: int,
    key_start: int,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """(b, hq, Wmax, C) scaled scores of the ``window_rows`` = Wmax window rows (row w = the query at
    position ``query_start + w``) against keys ``key_start ..``, -inf where not attended: model mask
    rows ``mask`` (.., Wmax or 1, C), else causal / bidirectional; padding keys (``valid`` (b, C))."""
    b, hkv, rows, _ = query_window.shape
    scores = torch.matmul(query_window, key.transpose(-1, -2))  # (b, hkv, group * Wmax, C): GQA, no repeat
    scores = scores.view(b, hkv * rows // window_rows, window_rows, -1).mul_(scale)
    if mask is None:
        if causal:  # only keys after the first window query can lie in a row's future
            first = max(query_start + 1 - key_start, 0)
            if first < scores.shape[-1]:
                q_pos = torch.arange(query_start, query_start + window_rows, device=scores.device)
                k_pos = torch.arange(key_start + first, key_start + scores.shape[-1], device=scores.device)
                scores[..., first:].masked_fill_(k_pos[None, :] > q_pos[:, None], float("-inf"))
    elif mask.dtype == torch.bool:
        scores.masked_fill_(~mask, float("-inf"))
    else:
        scores.add_(mask.to(scores.dtype))
    if valid is not None:
        scores.masked_fill_(~valid[:, None, None, :], float("-inf"))
    return scores


def _score_block(
    query_window: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    valid: torch.Tensor | None,
    query_groups: torch.Tensor,
    row_live: torch.Tensor,
    query_start: int,
    key_start: int,
    lse: torch.Tensor | None,
    scale: float,
    log_n: float | None,
    causal: bool,
) -> torch.Tensor:
    """(b, hq, M, C): for C keys, the n-softmax probabilities summed over the window queries of each
    of M query groups (``query_groups`` (b, M, Wmax) bool). ``lse`` (b, hq, Wmax, 1) of the whole
    rows, or None when these C keys are all the keys; ``log_n`` None = plain softmax."""
    scores = _masked_scores(query_window, key, mask, valid, row_live.shape[1], query_start, key_start, scale, causal)
    if lse is None:
        shift = scores.amax(dim=-1, keepdim=True)
        shift = torch.where(shift == float("-inf"), 0.0, shift)
        weights = scores.sub_(shift).exp_()
        lse = weights.sum(dim=-1, keepdim=True).log() + shift  # -inf where a row attends nothing
    else:
        shift = torch.where(lse == float("-inf"), 0.0, lse)
        weights = scores.sub_(shift).exp_()
    live = row_live[:, None, :, None] & (lse > float("-inf"))
    factor = torch.exp(shift - torch.where(live, lse, 0.0))  # exp(s - lse) = weights * factor
    if log_n is not None:
        factor = factor * torch.sigmoid(lse - log_n)
    factor = torch.where(live, factor, 0.0)
    rows = query_groups[:, None].to(weights.dtype) * factor.transpose(-1, -2)  # (b, hq, M, Wmax)
    return torch.matmul(rows, weights)


def _window_lse(problem: WindowProblem, chunk: int) -> torch.Tensor:
    """(b, hq, Wmax, 1) log-sum-exp of the window rows' masked scores, ``chunk`` keys at a time."""
    _, _, _, w_max, length = problem.shape
    lse = None
    for start in range(0, length, chunk):
        keys = slice(start, start + chunk)
        scores = _masked_scores(problem.query_window, problem.key[:, :, keys], _cols(problem.mask_rows, keys),
                                _cols(problem.valid, keys), w_max, length - w_max, start, problem.scale,
                                problem.causal)
        part = torch.logsumexp(scores, dim=-1, keepdim=True)
        lse = part if lse is None else torch.logaddexp(lse, part)
    return lse


def _window_rows_lse(lse: torch.Tensor, b: int, hq: int, w_max: int, length: int) -> torch.Tensor:
    """(b, hq, Wmax, 1) window rows of a caller's (b, hq, L) or (b, hq, Wmax) LSE."""
    if lse.dim() != 3 or lse.shape[:2] != (b, hq) or lse.shape[2] not in (w_max, length):
        raise ValueError(f"lse must have shape {(b, hq, length)} or {(b, hq, w_max)}: got {tuple(lse.shape)}")
    return lse[:, :, lse.shape[2] - w_max:, None]


def _cols(tensor: torch.Tensor | None, keys: slice) -> torch.Tensor | None:
    return None if tensor is None else tensor[..., keys]


_compiled_block = None


def _block_fn():
    """``_score_block``, through ``torch.compile`` when CSP_SCORING_COMPILE=1 (read per call)."""
    global _compiled_block
    if os.environ.get("CSP_SCORING_COMPILE") != "1":
        return _score_block
    if _compiled_block is None:
        _compiled_block = torch.compile(_score_block, dynamic=None, fullgraph=True)
    return _compiled_block


def window_sums(problem: WindowProblem, n: float, *, by_modality: bool = True, lse: torch.Tensor | None = None,
                chunk_elements: int | None = None) -> torch.Tensor:
    """(b, hq, M, L) n-softmax window attention each key gets, summed over the window queries of
    each of the M window modalities (``by_modality``) or over all of them (M = 1), compute dtype.
    ``lse`` (b, hq, L) or (b, hq, Wmax): the rows' log-sum-exp under the same mask and padding,
    reused when given, else computed here."""
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
        raise ValueError(f"n={n!r}: allowed a finite float >= 0")
    b, hq, _, w_max, length = problem.shape
    groups = problem.query_groups if by_modality else problem.row_live[:, None, :]
    chunk = max(1, (chunk_elements or CHUNK_ELEMENTS) // max(1, b * hq * w_max))
    log_n = math.log(n) if n > 0 else None
    block = _block_fn()
    if lse is not None:
        lse = _window_rows_lse(lse, b, hq, w_max, length).to(problem.key.dtype)
    elif chunk < length:
        lse = _window_lse(problem, chunk)
    parts = []
    for start in range(0, length, chunk):
        keys = slice(start, start + chunk)
        parts.append(block(problem.query_window, problem.key[:, :, keys], _cols(problem.mask_rows, keys),
                           _cols(problem.valid, keys), groups, problem.row_live, length - w_max, start, lse,
                           problem.scale, log_n, problem.causal))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


# --- policies ----------------------------------------------------------------------------------

def _gqa_mean(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    b, hq, length = scores.shape
    return scores.reshape(b, kv_heads, hq // kv_heads, length).mean(dim=2)


def fused_policy_scores(problem: WindowProblem, config: CSPConfig, lse: torch.Tensor | None = None) -> PolicyScores:
    """The policy's (b, hkv, L) scores from the window (``config.policy`` in FUSED_POLICIES), equal to
    the reference score function's; ``lse`` as in ``window_sums``."""
    hkv = problem.shape[2]
    if config.policy == "csp":
        sums = window_sums(problem, config.n, lse=lse)  # (b, hq, M, L)
        same = problem.key_groups[:, None]  # (b, 1, M, L): the key's own modality
        self_scores = torch.where(same, sums, 0.0).sum(dim=2)
        cross_scores = torch.where(same, 0.0, sums).sum(dim=2)
        return PolicyScores(_gqa_mean(self_scores, hkv), _gqa_mean(cross_scores, hkv))
    if config.policy == "snapkv":
        total = window_sums(problem, 0.0, by_modality=False, lse=lse)[:, :, 0]
        total = total * problem.candidates()[:, None, :]
        kernel = config.pool_kernel
        pooled = F.avg_pool1d(total, kernel, stride=1, padding=kernel // 2)
        return PolicyScores(_gqa_mean(pooled, hkv))
    raise ValueError(f"policy {config.policy!r} is not scored from the window: fused policies are {list(FUSED_POLICIES)}")


def score_window(
    query: torch.Tensor,
    key: torch.Tensor,
    modality: torch.Tensor | None,
    config: CSPConfig,
    *,
    attn_mask: torch.Tensor | None = None,
    attention_mask_2d: torch.Tensor | None = None,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    is_causal: bool = True,
) -> PolicyScores:
    """``config.policy``'s per-KV-head scores (b, hkv, L) of one layer by the fused window scorer.

    query (b, hq, L, D), key (b, hkv, L, D) post-RoPE; modality (b, L) ids or None (all text);
    attn_mask the model's SDPA mask (bool True = attend, or additive), broadcastable to
    (b, hq, L, L), or None: causal when ``is_causal`` else bidirectional; attention_mask_2d (b, L)
    1 = real token (left padding 0) or None; scale None = 1/sqrt(D); lse (b, hq, L) or
    (b, hq, Wmax) log-sum-exp of the rows under the same mask and padding, reused when given.
    Equal to the reference policy scores of ``select_kept`` (``mask=None`` there = causal).
    """
    if config.policy not in FUSED_POLICIES:
        raise ValueError(f"score_window: policy {config.policy!r} is not scored from the window: allowed {list(FUSED_POLICIES)}")
    problem = window_problem(query, key, modality, config, attn_mask=attn_mask, attention_mask_2d=attention_mask_2d,
                             scale=scale, is_causal=is_causal)
    return fused_policy_scores(problem, config, lse=lse)


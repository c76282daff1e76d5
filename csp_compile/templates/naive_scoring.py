"""The authors' way of scoring (a benchmark baseline): the full L x L n-softmax, then the window rows.

Same result as the reference CSP scores (docs/design.md §2), at O(L^2) time and memory per head: it
materialises the whole causal/model mask and every row's attention, and only then keeps the W
window rows. ``naive_scores`` exists to measure what the window-only scorers save.
"""

from __future__ import annotations

import torch

from csp_compile.config import CSPConfig
from csp_compile.nsoftmax import n_softmax
from csp_compile.policies import PolicyScores
from csp_compile.scoring import default_scale, resolve_budget
from csp_compile.selection import check_query_key

__all__ = ["naive_scores"]


def naive_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    modality: torch.Tensor | None,
    config: CSPConfig,
    *,
    attn_mask: torch.Tensor | None = None,
    attention_mask_2d: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = True,
) -> PolicyScores:
    """CSP (self, cross) scores (b, hkv, L) from the full L x L attention, eagerly; arguments as
    ``prefill_selection``'s (``config.n`` and ``config.window`` are used, the policy is CSP's)."""
    b, hq, length, dim = check_query_key(query, key)
    hkv = key.shape[1]
    modality = torch.zeros(b, length, dtype=torch.int64, device=query.device) if modality is None else modality
    valid = (torch.ones(b, length, dtype=torch.bool, device=query.device) if attention_mask_2d is None
             else attention_mask_2d != 0)
    dtype = torch.promote_types(query.dtype, torch.float32)
    scale = default_scale(dim) if scale is None else float(scale)
    k = key.to(dtype).repeat_interleave(hq // hkv, dim=1)
    scores = (query.to(dtype) @ k.transpose(-1, -2)) * scale  # (b, hq, L, L)
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=query.device)
    if attn_mask is None:
        if is_causal:
            causal = torch.ones(length, length, dtype=torch.bool, device=query.device).tril()
            scores = torch.where(causal, scores, neg_inf)
    elif attn_mask.dtype == torch.bool:
        scores = torch.where(attn_mask, scores, neg_inf)
    else:
        scores = scores + attn_mask.to(dtype)
    if not bool(valid.all()):
        scores = torch.where(valid[:, None, None, :], scores, neg_inf)
    probs = n_softmax(scores, n=config.n, dim=-1)  # every row, as the authors do
    window = torch.tensor([resolve_budget(int(n), config)[1] for n in valid.sum(-1).tolist()], device=query.device)
    w_max = int(window.max())
    rows = torch.arange(w_max, device=query.device)[None, :] >= (w_max - window)[:, None]
    probs = probs[:, :, length - w_max:] * rows[:, None, :, None]
    same = modality[:, length - w_max:, None] == modality[:, None, :]
    self_scores = torch.where(same[:, None], probs, 0.0).sum(2)
    cross_scores = torch.where(same[:, None], 0.0, probs).sum(2)
    return PolicyScores(self_scores.reshape(b, hkv, -1, length).mean(2), cross_scores.reshape(b, hkv, -1, length).mean(2))

"""n-softmax: ``exp(x_i) / (n + sum_j exp(x_j))``, through the stable log-sum-exp form."""

from __future__ import annotations

import math

import torch


def n_softmax(x: torch.Tensor, n: float = 1.0, dim: int = -1) -> torch.Tensor:
    """``softmax(x) * sigmoid(lse(x) - ln n)`` along ``dim``; ``n = 0`` is ``torch.softmax``.

    Rows that are entirely ``-inf`` give zeros, never NaN. Half-precision inputs are computed in
    float32 and returned in their own dtype.
    """
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n < 0:
        raise ValueError(f"n_softmax: n={n!r} is invalid: allowed a finite float >= 0")
    if not x.is_floating_point():
        raise ValueError(f"n_softmax: x has dtype {x.dtype}: allowed a floating-point tensor")
    return _n_softmax(x, n, dim)


def _n_softmax(x: torch.Tensor, n: float, dim: int) -> torch.Tensor:
    """``n_softmax`` without argument checks (inside traced scoring, where ``n`` is a constant of the pass)."""
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    lse = torch.logsumexp(work, dim=dim, keepdim=True)
    dead_row = lse == float("-inf")
    probs = torch.softmax(work, dim=dim).masked_fill(dead_row, 0.0)
    if n > 0:
        probs = probs * torch.sigmoid(lse - math.log(n))
    return probs.to(x.dtype)


def n_softmax_from_lse(x: torch.Tensor, lse: torch.Tensor, n: float = 1.0) -> torch.Tensor:
    """``n_softmax(x, n)`` along the last axis given the rows' ``lse = logsumexp(x, -1, keepdim=True)``
    (e.g. the attention kernel's normaliser), in ``x``'s dtype: ``exp(x - lse) * sigmoid(lse - ln n)``;
    rows with ``lse = -inf`` give zeros. Plain tensor ops, no host sync (traceable)."""
    dead_row = lse == float("-inf")
    probs = torch.exp(x - torch.where(dead_row, 0.0, lse).to(x.dtype))
    if n > 0:
        probs = probs * torch.sigmoid(lse - math.log(n)).to(x.dtype)
    return torch.where(dead_row, 0.0, probs)

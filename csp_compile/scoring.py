"""Reference scoring math in plain PyTorch (docs/design.md §2): the oracle every kernel is tested against.

Shapes: ``b`` batch, ``hq`` query heads, ``hkv`` KV heads, ``L`` prompt length (padded), ``D`` head
dim. Only blocks of query rows are ever scored (the window, or chunks of it for H2O): memory is
O(rows * L) per head, never L x L.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from csp_compile.nsoftmax import _n_softmax, n_softmax_from_lse

if TYPE_CHECKING:  # config imports the policy registry, which imports this module
    from csp_compile.config import CSPConfig


def resolve_budget(length: int, config: CSPConfig) -> tuple[int, int]:
    """``(B, W)`` for a prompt of ``length`` real tokens: kept tokens and window size.

    ``B = min(L, max(window, round(budget * L)))`` for a fractional budget (Python's round, half
    to even), ``min(L, budget)`` for an int budget; ``W = min(window, B)``.
    """
    if isinstance(config.budget, float):
        kept = min(length, max(config.window, round(config.budget * length)))
    else:
        kept = min(length, config.budget)
    return kept, min(config.window, kept)


@dataclass(frozen=True)
class AttentionInputs:
    """One attention layer's prefill, validated: what every policy scores.

    ``valid`` is False at padding; ``window`` is each sequence's W; the window is the last W
    positions of the sequence axis (padding, if any, must be on the left).
    """

    query: torch.Tensor  # (b, hq, L, D)
    key: torch.Tensor  # (b, hkv, L, D)
    modality: torch.Tensor  # (b, L) int64
    valid: torch.Tensor  # (b, L) bool
    mask: torch.Tensor | None  # bool (True = attend) or additive, broadcastable to (b, hq, L, L)
    scale: float
    window: torch.Tensor  # (b,) int64
    query_valid: torch.Tensor | None = None  # (b, L) rows that have a query; None = ``valid``
    rows: int | torch.SymInt | None = None  # trailing query rows scored as the window (>= every W); None = max W
    window_lse: torch.Tensor | None = None  # (b, hq, rows) those rows' log-sum-exp (the attention kernel's)
    accumulated: torch.Tensor | None = None  # (b, hkv, L) ``accumulated_attention`` when already computed
    positions: torch.Tensor | None = None  # (b, L) logical position of each key (a pruned cache); None = 0 .. L-1

    @property
    def length(self) -> int:
        return self.key.shape[-2]

    @property
    def kv_heads(self) -> int:
        return self.key.shape[1]

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.promote_types(self.query.dtype, torch.float32)

    def num_rows(self) -> int | torch.SymInt:
        """R: how many trailing query rows the window scoring reads (``rows``, else max W: a host sync)."""
        return int(self.window.max()) if self.rows is None else self.rows

    def window_rows(self) -> torch.Tensor:
        """(b, R) bool over the last R query rows: True where the row is in its sequence's window."""
        rows = self.num_rows()
        offsets = torch.arange(rows, device=self.window.device)
        return offsets[None, :] >= (rows - self.window)[:, None]

    def candidates(self) -> torch.Tensor:
        """(b, L) bool: real tokens before each sequence's window."""
        positions = torch.arange(self.length, device=self.valid.device)
        return self.valid & (positions[None, :] < (self.length - self.window)[:, None])


def masked_scores(inputs: AttentionInputs, rows: slice) -> torch.Tensor:
    """(b, hq, R, L) ``scale * <q, k> + mask`` of query rows ``rows`` over all keys, compute dtype,
    -inf where not attended (the mask, or causal when ``mask`` is None; padding keys)."""
    b, hq, length, dim = inputs.query.shape
    hkv = inputs.kv_heads
    dtype = inputs.compute_dtype
    q = inputs.query[:, :, rows].to(dtype)
    num_rows = q.shape[2]
    q = q.reshape(b, hkv, hq // hkv * num_rows, dim)  # a KV head's query group as one block of rows: K is not copied
    scores = (q @ inputs.key.to(dtype).transpose(-1, -2)).reshape(b, hq, num_rows, length) * inputs.scale
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=scores.device)
    if inputs.mask is None:
        query_pos = torch.arange(length, device=scores.device)[rows]
        key_pos = torch.arange(length, device=scores.device)
        scores = torch.where(key_pos[None, :] <= query_pos[:, None], scores, neg_inf)
    else:
        mask_rows = inputs.mask[..., rows, :] if inputs.mask.shape[-2] != 1 else inputs.mask
        if mask_rows.dtype == torch.bool:
            scores = torch.where(mask_rows, scores, neg_inf)
        else:
            scores = scores + mask_rows.to(dtype)
    return torch.where(inputs.valid[:, None, None, :], scores, neg_inf)


def attention_probs(inputs: AttentionInputs, rows: slice, n: float) -> torch.Tensor:
    """(b, hq, R, L) n-softmax attention of query rows ``rows`` over all keys, in compute dtype."""
    return _n_softmax(masked_scores(inputs, rows), n, -1)


def window_probs(inputs: AttentionInputs, n: float) -> torch.Tensor:
    """(b, hq, R, L) n-softmax attention of the last R query rows; rows outside a window are 0.
    With ``inputs.window_lse`` the rows' normaliser is that one (no second reduction over L)."""
    rows = inputs.num_rows()
    window = slice(inputs.length - rows, inputs.length)
    if inputs.window_lse is None:
        probs = attention_probs(inputs, window, n)
    else:
        probs = n_softmax_from_lse(masked_scores(inputs, window), inputs.window_lse[..., None], n)
    return torch.where(inputs.window_rows()[:, None, :, None], probs, 0.0)  # drops anything in a dead row


def modality_split(inputs: AttentionInputs, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum window attention ``probs`` (b, hq, W, L) per key into same-modality (self) and
    different-modality (cross) parts: two (b, hq, L) tensors."""
    w_max = probs.shape[2]
    query_modality = inputs.modality[:, inputs.length - w_max:]
    same = (query_modality[:, :, None] == inputs.modality[:, None, :])[:, None]  # (b, 1, W, L)
    return torch.where(same, probs, 0.0).sum(dim=2), torch.where(same, 0.0, probs).sum(dim=2)


def pool_scores(scores: torch.Tensor, inputs: AttentionInputs, config: CSPConfig) -> torch.Tensor:
    """(b, h, L) window scores smoothed over neighbouring keys by ``config.pooling``: "none" returns them
    as they are; "1d" and "image" first zero the window's keys (kept anyway), then "1d" averages each
    key over ``pool_kernel`` consecutive keys (zero-padded, SnapKV's), "image" averages each image or
    video token over its neighbours in the same image (``ImageGrid``) and leaves text as it is."""
    mode = config.pooling
    if mode == "none":
        return scores
    scores = scores * inputs.candidates()[:, None, :]
    kernel = config.pool_kernel
    if mode == "1d":
        return F.avg_pool1d(scores, kernel, stride=1, padding=kernel // 2)
    grid = ImageGrid.of(inputs, config.image_grid == "square")
    return grid.average(scores, kernel)


@dataclass(frozen=True)
class ImageGrid:
    """Where each key sits in its image: ``media`` (b, L) True at image / video tokens, ``start`` (b, L) the
    first index of its run (consecutive real tokens of one non-text modality at consecutive positions),
    ``side`` (b, L) the run's row length. A run whose length is a square number is a row-major square
    grid when asked for (``square``) and the keys are a whole prompt (``inputs.positions`` None); any
    other run is one row."""

    media: torch.Tensor
    start: torch.Tensor
    side: torch.Tensor

    @staticmethod
    def of(inputs: AttentionInputs, square: bool) -> "ImageGrid":
        b, length = inputs.valid.shape
        index = torch.arange(length, device=inputs.valid.device).expand(b, length)
        positions = index if inputs.positions is None else inputs.positions
        modality = inputs.modality
        media = inputs.valid & (modality != 0)
        follows = torch.zeros_like(media)  # continues the run of the key before it
        follows[:, 1:] = media[:, 1:] & media[:, :-1] & (modality[:, 1:] == modality[:, :-1]) \
            & (positions[:, 1:] == positions[:, :-1] + 1)
        ends = media & ~torch.cat([follows[:, 1:], torch.zeros_like(follows[:, :1])], dim=-1)
        start = torch.cummax(torch.where(media & ~follows, index, 0), dim=-1).values
        last = length - 1
        end = last - torch.cummax(torch.where(ends, last - index, 0).flip(-1), dim=-1).values.flip(-1)
        side = (end - start + 1).clamp(min=1)
        if square and inputs.positions is None:
            root = torch.floor(torch.sqrt(side.to(torch.float64)) + 0.5).to(torch.int64)
            side = torch.where(root * root == side, root, side)
        return ImageGrid(media, start, side)

    def _neighbours(self, steps: torch.Tensor, along_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(index (b, L, k) of the keys ``steps`` (k,) columns over (``along_row``) or rows down, True where
        that key is in the same run, and row or column, as the key itself)."""
        length = self.media.shape[-1]
        index = torch.arange(length, device=self.media.device)[None, :, None]
        offset = steps[None, None, :] if along_row else steps[None, None, :] * self.side[..., None]
        neighbour = (index + offset).expand(*self.start.shape, steps.shape[0])
        inside = (neighbour >= 0) & (neighbour < length)
        neighbour = neighbour.clamp(0, length - 1)
        flat = neighbour.flatten(1)

        def at(values: torch.Tensor) -> torch.Tensor:
            return values.gather(-1, flat).view_as(neighbour)

        present = self.media[..., None] & inside & at(self.media) & (at(self.start) == self.start[..., None])
        if along_row:  # down a column, a key of the same run is in the same column
            column = (index[..., 0] - self.start) % self.side
            present &= at(column) == column[..., None] + steps
        return neighbour, present

    def average(self, scores: torch.Tensor, kernel: int) -> torch.Tensor:
        """(b, h, L) each image / video token's mean over the ``kernel`` x ``kernel`` patch of its grid
        that exists (``kernel`` along a one-row run), text keys as they are: a box filter, along the row
        then down the column (two gathers of ``kernel`` neighbours per key)."""
        half = kernel // 2
        steps = torch.arange(-half, half + 1, device=scores.device)

        def summed(values: torch.Tensor, counts: torch.Tensor, along_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
            neighbour, present = self._neighbours(steps, along_row)
            b, length, k = neighbour.shape
            gathered = values.gather(-1, neighbour.flatten(1)[:, None, :].expand(-1, values.shape[1], -1))
            gathered = torch.where(present[:, None], gathered.view(b, -1, length, k), 0.0)
            return gathered.sum(-1), torch.where(present, counts.gather(-1, neighbour.flatten(1)).view_as(neighbour), 0).sum(-1)

        # float64 sums: a few float32 terms add exactly, so eager and compiled kernels agree whatever their order
        across, count = summed(scores.to(torch.float64), torch.ones_like(self.start), along_row=True)
        total, counted = summed(across, count, along_row=False)
        average = (total / counted.clamp(min=1)[:, None, :].to(torch.float64)).to(scores.dtype)
        return torch.where(self.media[:, None, :], average, scores)


def gqa_mean(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Average (b, hq, L) per-query-head scores over each KV head's group: (b, hkv, L)."""
    b, hq, length = scores.shape
    return scores.reshape(b, kv_heads, hq // kv_heads, length).mean(dim=2)


def accumulated_attention(inputs: AttentionInputs, chunk: int = 256) -> torch.Tensor:
    """(b, hkv, L) softmax attention each key receives, summed over every real prompt query
    (H2O's score), computed ``chunk`` query rows at a time; ``inputs.accumulated`` when given."""
    if inputs.accumulated is not None:
        return inputs.accumulated
    b, hq, length, _ = inputs.query.shape
    total = torch.zeros(b, hq, length, dtype=inputs.compute_dtype, device=inputs.query.device)
    for start in range(0, length, chunk):
        rows = slice(start, min(start + chunk, length))
        probs = attention_probs(inputs, rows, n=0.0)
        query_valid = inputs.valid if inputs.query_valid is None else inputs.query_valid
        probs = probs * query_valid[:, None, rows, None]
        total += probs.sum(dim=2)
    return gqa_mean(total, inputs.kv_heads)


def cross_population(inputs: AttentionInputs) -> torch.Tensor:
    """(b,) fraction of (window query, candidate key) pairs whose modalities differ."""
    rows = inputs.num_rows()
    query_modality = inputs.modality[:, inputs.length - rows:]
    pairs = inputs.window_rows()[:, :, None] & inputs.candidates()[:, None, :]
    differ = pairs & (query_modality[:, :, None] != inputs.modality[:, None, :])
    counts = pairs.sum(dim=(1, 2)).clamp(min=1)
    return differ.sum(dim=(1, 2)).to(torch.float64) / counts


def cross_mass(inputs: AttentionInputs, self_scores: torch.Tensor, cross_scores: torch.Tensor) -> torch.Tensor:
    """(b, hkv) share of the window's attention to candidates that is cross-modal."""
    candidates = inputs.candidates()[:, None, :]
    cross_sum = (cross_scores * candidates).sum(-1).to(torch.float64)
    self_sum = (self_scores * candidates).sum(-1).to(torch.float64)
    total = cross_sum + self_sum
    return torch.where(total > 0, cross_sum / total.clamp(min=torch.finfo(torch.float64).tiny), 0.0)


def default_scale(head_dim: int) -> float:
    """The usual ``1 / sqrt(head_dim)`` attention scale."""
    return 1.0 / math.sqrt(head_dim)


def rank_desc(score: torch.Tensor, eligible: torch.Tensor, limit: int | torch.SymInt | None = None) -> torch.Tensor:
    """Rank of each position (0 = best) with eligible positions first, then score descending,
    then position ascending (-0.0 ties +0.0). Exact below ``limit`` (default: the whole axis); every
    other position gets at least ``limit``, so compare only with counts <= ``limit``."""
    length = score.shape[-1]
    if score.dtype != torch.float32:
        return _rank_desc_two_sorts(score, eligible)
    k = length if limit is None else torch.sym_min(limit, length)
    order = torch.topk(_rank_key(score, eligible), k, dim=-1).indices  # keys are distinct: no ties
    ranks = torch.full(score.shape, length, dtype=torch.int64, device=score.device)
    return ranks.scatter_(-1, order, torch.arange(k, device=order.device).expand_as(order))


_POSITION_BITS = 30  # prompts shorter than 2**30 tokens


def _rank_key(score: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """int64 keys (..., L), distinct and ordered as ``rank_desc`` ranks: bit 62 eligible, bits 30..61
    the float32 score's order-preserving bit pattern, bits 0..29 the reversed position."""
    length = score.shape[-1]
    torch._check(length < 2**_POSITION_BITS, lambda: "rank_desc: at most 2**30 - 1 positions")
    bits = torch.where(score == 0, 0.0, score).view(torch.int32).to(torch.int64)  # -0.0 -> +0.0
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + 2**31  # in [0, 2**32), as the floats compare
    reversed_position = (2**_POSITION_BITS - 1) - torch.arange(length, device=score.device)
    return (eligible.to(torch.int64) << 62) | (ordered << _POSITION_BITS) | reversed_position


def _rank_desc_two_sorts(score: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """``rank_desc`` for any dtype (float64 scores do not fit one int64 key), all positions exact."""
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    eligible_sorted = eligible.gather(-1, order)
    order = order.gather(-1, torch.argsort(eligible_sorted.to(torch.int8), dim=-1, descending=True, stable=True))
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return ranks

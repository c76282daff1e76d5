"""One layer's kept-token selection at prefill, as the rewrite emits it into the prefill graph.

``prefill_selection`` builds the layer's ``AttentionInputs`` once and runs the policy's own score and
split functions (docs/design.md §2) and the top-k, returning the cache layout (``kept_layout``). For a
traceable policy (``Policy.traceable``: CSP, SnapKV, StreamingLLM, full) the rewrite calls it as a plain
function node, so AOTAutograd traces it into aten ops and Inductor fuses them (C++ on CPU, Triton on
CUDA): window ``Q K^T``, n-softmax from the attention kernel's log-sum-exp, the self/cross split, the
GQA mean and the ranking (the rewrite adds the K/V gathers after it). Every tensor is O(W x L) per head; nothing L x L, no host
sync. Other policies (H2O and LOOK-M read every query row; random draws from a seeded generator)
run the same function eagerly inside ``csp::select_reference``.
"""

from __future__ import annotations

from typing import Callable

import torch

from csp_compile.config import CSPConfig
from csp_compile.scoring import AttentionInputs, default_scale
from csp_compile.selection import budgets_for, kept_layout, kept_slots, select_keep_mask

__all__ = ["kept_slots", "prefill_selection", "selection_mask", "selection_node_target"]


def prefill_selection(
    query: torch.Tensor,
    key: torch.Tensor,
    window_lse: torch.Tensor | None,
    attn_mask: torch.Tensor | None,
    modality: torch.Tensor | None,
    padding: torch.Tensor | None,
    *,
    config: CSPConfig,
    scale: float | None,
    is_causal: bool,
    layer: tuple[int, int] = (0, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept indices (b, hkv, P) int64, slot_valid (b, P) bool, (b, hkv, P) with adaptive budgets) of one
    prefill layer, laid out by ``kept_layout``; ``layer`` = (rank among the evicting layers, their count). query (b, hq, L, D) / key (b, hkv, L, D) post-RoPE; window_lse (b, hq, R') the
    attention kernel's log-sum-exp of the last R' >= min(window, P) query rows, or None (then computed
    here: also when ``attn_mask`` is None, as the kernel's then counts padding keys); attn_mask / is_causal as the model passed them to SDPA (None and not causal =
    bidirectional); modality (b, L) ids or None (all text); padding (b, L) 1 = real, 0 = left padding,
    or None (none)."""
    b, _, length, dim = query.shape
    valid = torch.ones(b, length, dtype=torch.bool, device=query.device) if padding is None else padding != 0
    if modality is None:
        modality = torch.zeros(b, length, dtype=torch.int64, device=query.device)
    budgets, window = budgets_for(valid.sum(-1), config)
    slots = kept_slots(length, config)
    rows = torch.sym_min(config.window, slots)  # >= every sequence's W
    if window_lse is not None and attn_mask is not None:
        window_lse = window_lse[..., window_lse.shape[-1] - rows:]
    else:  # without a mask SDPA attended left padding too (HF passes a mask whenever there is padding)
        window_lse = None
    inputs = AttentionInputs(
        query=query, key=key, modality=modality.to(torch.int64), valid=valid,
        mask=selection_mask(attn_mask, is_causal, length, query.device),
        scale=default_scale(dim) if scale is None else float(scale),
        window=window, rows=rows, window_lse=window_lse,
    )
    keep, num_kept, _ = select_keep_mask(inputs, config, budgets=budgets, layer=layer, rank_limit=slots)
    return kept_layout(keep, num_kept, slots)


def selection_mask(attn_mask: torch.Tensor | None, is_causal: bool, length: int, device: torch.device) -> torch.Tensor | None:
    """The model's SDPA mask in ``AttentionInputs``' convention: 4-D, None = causal; a bidirectional
    call (no mask, not causal) becomes one all-True (1, 1, 1, L) row broadcast over the queries; a bool
    mask passed as its uint8 bytes (``ops.shared_mask_graph``) is bool again (traced, Inductor reads only
    the rows the scoring uses; eager, a view of the bytes)."""
    if attn_mask is None:
        return None if is_causal else torch.ones(1, 1, 1, length, dtype=torch.bool, device=device)
    if attn_mask.dtype == torch.uint8:  # eager (csp::select_reference): a view, not an L x L copy
        attn_mask = attn_mask != 0 if torch.compiler.is_compiling() else attn_mask.view(torch.bool)
    while attn_mask.dim() < 4:
        attn_mask = attn_mask.unsqueeze(0)
    return attn_mask


def selection_node_target(config: CSPConfig, scale: float, is_causal: bool, layer: tuple[int, int] = (0, 1)) -> Callable:
    """A function of the tensor arguments alone, for a ``call_function`` node of the prefill graph (the
    config, scale and layer rank are constants of the rewrite, bound here rather than written into the graph)."""

    def csp_prefill_selection(query, key, window_lse, attn_mask, modality, padding):
        return prefill_selection(query, key, window_lse, attn_mask, modality, padding,
                                 config=config, scale=scale, is_causal=is_causal, layer=layer)

    return csp_prefill_selection

"""The custom ops a rewritten prefill graph calls; everything else it emits is plain aten for Inductor.

``csp::attention`` is the model's attention call with its row log-sum-exp as a second output (the
n-softmax normaliser of the window rows, so the scoring need not reduce over L again; it does when the
model passed SDPA no mask, as that kernel's normaliser would count left-padding keys).
``csp::select_reference`` runs ``prefill_selection`` eagerly for the policies that cannot be traced
(their config travels as one encoded string, ``config_to_op_arg``). The layers of a graph share one
uint8 copy of a bool mask (``shared_mask_graph``). See ``passes.evict_prefill`` for where each is used.

Shapes: ``b`` batch, ``hq`` query heads, ``hkv`` KV heads, ``L`` padded prompt length, ``D`` head dim,
``P`` = ``kept_slots(L, config)``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Optional

import torch
import torch.nn.functional as F

from csp_compile.adaptive import is_adaptive
from csp_compile.config import CSPConfig
from csp_compile.internals import flash_attention_cpu_with_lse, realized_once, sdpa_picks_flash
from csp_compile.scoring import AttentionInputs, default_scale, masked_scores
from csp_compile.templates.prefill_selection import kept_slots, prefill_selection, selection_mask

__all__ = [
    "attention_with_lse",
    "config_from_op_arg",
    "config_to_op_arg",
    "kept_slots",
    "mask_is_causal_graph",
    "shared_mask_graph",
]


# --- config <-> one op argument ----------------------------------------------------------------

def config_to_op_arg(config: CSPConfig) -> str:
    """``config`` as one string argument of an op schema (JSON of its fields)."""
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


@functools.lru_cache(maxsize=256)
def config_from_op_arg(text: str) -> CSPConfig:
    """Inverse of ``config_to_op_arg`` (validated by ``CSPConfig``; cached, configs are frozen)."""
    return CSPConfig(**json.loads(text))


# --- the bool mask every layer shares ----------------------------------------------------------

def mask_is_causal_graph(attn_mask: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: whether the bool ``attn_mask`` (..., Lq, Lkv) is SDPA's ``is_causal`` mask
    (``ones(Lq, Lkv).tril()``, top-left aligned) restricted to the keys its last query row attends, i.e.
    causal apart from padding keys (left or right padding; all keys real: exactly causal). Pure torch ops:
    the rewrite traces it once per forward and Inductor fuses it into one reduction over the mask."""
    return torch.eq(attn_mask, torch.tril(torch.ones_like(attn_mask)) & attn_mask[..., -1:, :]).all()


def shared_mask_graph(attn_mask: torch.Tensor) -> torch.Tensor:
    """The bool ``attn_mask`` as one uint8 (0/1) buffer that every rewritten layer of a graph reads
    (``csp::attention`` views it as bool, no copy). Inductor would otherwise write the mask once per
    ``csp::attention``, and a bool one with its slow vectorised bool stores (~95 ms per 4096 x 4096 copy on
    one core); uint8 it writes about 4x faster."""
    return realized_once(attn_mask.to(torch.uint8))


# --- attention with its log-sum-exp --------------------------------------------------------------

def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' ``repeat_kv`` (expand + reshape), so the attention is bit-identical to the model's."""
    if n_rep == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


def _check(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError("csp::attention: query/key/value must be 4-D (b, heads, L, D): got "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if key.shape[:3] != value.shape[:3] or key.shape[0] != query.shape[0] or query.shape[2] != key.shape[2]:
        raise ValueError("csp::attention: a prefill from an empty cache needs query, key and value of the same "
                         f"batch and length: got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"csp::attention: {query.shape[1]} query heads is not a multiple of {key.shape[1]} KV heads")


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _rows_lse(query, key, attn_mask, scale, is_causal, rows: int) -> torch.Tensor:
    """(b, hq, rows) log-sum-exp of the last ``rows`` query rows' masked scores (``masked_scores``, K before
    any GQA repeat, no padding of its own: SDPA's view); O(rows x L): the fallback when SDPA does not
    run a kernel that returns it."""
    b, _, length, dim = query.shape
    inputs = AttentionInputs(
        query=query, key=key, modality=torch.zeros(b, length, dtype=torch.int64, device=query.device),
        valid=torch.ones(b, length, dtype=torch.bool, device=query.device),
        mask=selection_mask(attn_mask, is_causal, length, query.device),
        scale=default_scale(dim) if scale is None else float(scale),
        window=torch.full((b,), rows, dtype=torch.int64, device=query.device),
    )
    return torch.logsumexp(masked_scores(inputs, slice(length - rows, length)), dim=-1)


@torch.library.custom_op("csp::attention", mutates_args=(), device_types=None)
def attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    scale: Optional[float],
    is_causal: bool,
    enable_gqa: bool,
    mask_is_causal: Optional[torch.Tensor],
    lse_rows: int,
    after: list[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (b, hq, L, Dv) contiguous, log-sum-exp (b, hq, min(lse_rows, L)) of the last rows; a row
    that attends nothing, left padding, gets an arbitrary value (0 from the CPU flash kernel): such a
    row is never in a window, and the scoring drops rows outside each sequence's window).

    query (b, hq, L, D); key/value (b, hkv, L, D) before any GQA repeat; attn_mask / scale / is_causal
    exactly as the model passes them to SDPA, except that a bool mask may come as its uint8 (0/1) bytes
    (``shared_mask_graph``); enable_gqa as the model's SDPA call (else the model repeated K/V first: the
    op repeats them the same way). The output is bit-identical to the model's call: on CPU, where SDPA
    picks its flash kernel, the op calls that kernel itself (with SDPA's bool-to-additive mask
    conversion) and keeps its log-sum-exp; elsewhere it calls SDPA and computes the rows' log-sum-exp in
    O(rows x L). mask_is_causal: optional 0-d bool tensor, True when the bool ``attn_mask`` is causal apart
    from padding keys (``mask_is_causal_graph``): on CPU the flash kernel then runs with ``is_causal=True``
    and, if some keys are padding, an additive (b, 1, 1, L) mask of them, in place of the (b, 1, L, L)
    mask: bit-identical, and it skips the blocks above the diagonal. Not on CUDA, where the two select
    different kernels. after: tensors the op ignores, passed only to order it after their producers (the
    previous layer's gathered K/V, so Inductor frees that layer's whole K/V before this attention allocates).
    """
    _check(query, key, value)
    n_rep = query.shape[1] // key.shape[1]
    length = query.shape[2]
    rows = min(lse_rows, length)
    if attn_mask is not None and attn_mask.dtype == torch.uint8:
        attn_mask = attn_mask.view(torch.bool)
    kernel_mask, kernel_causal, key_padding = attn_mask, is_causal, None
    if attn_mask is not None and mask_is_causal is not None and query.device.type == "cpu" and bool(mask_is_causal):
        kept_keys = attn_mask[..., -1:, :]  # what the last row attends: every key that is not padding
        kernel_mask, kernel_causal = None, True
        key_padding = None if bool(kept_keys.all()) else kept_keys
    gqa = {"enable_gqa": True} if enable_gqa and n_rep > 1 else {}
    full_key, full_value = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    attn_key, attn_value = (key, value) if gqa else (full_key, full_value)  # what the model's SDPA call gets
    flash = sdpa_picks_flash(query, attn_key, attn_value, attn_mask=kernel_mask, dropout_p=0.0,
                             is_causal=kernel_causal, scale=scale, **gqa)
    same_dtype_mask = kernel_mask is None or kernel_mask.dtype in (torch.bool, query.dtype)
    if query.device.type == "cpu" and flash and same_dtype_mask:
        mask = kernel_mask if key_padding is None else key_padding
        if mask is not None and mask.dtype == torch.bool:  # what SDPA does with a bool mask
            mask = torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
        output, lse = flash_attention_cpu_with_lse(query, full_key, full_value, attn_mask=mask,
                                                   is_causal=kernel_causal, scale=scale)
        lse = lse[:, :, length - rows:].to(_lse_dtype(query.dtype))
    else:
        output = F.scaled_dot_product_attention(query, attn_key, attn_value, attn_mask=attn_mask, dropout_p=0.0,
                                                scale=scale, is_causal=is_causal, **gqa)
        lse = _rows_lse(query, key, attn_mask, scale, is_causal, rows)
    # The op promises contiguous outputs (the fake impl's layout; Inductor's on-disk cache keys do not
    # cover the fake impl, so graphs cached against one layout must always get it).
    return output.contiguous(), lse.contiguous()


@attention_op.register_fake
def _attention_fake(query, key, value, attn_mask, scale, is_causal, enable_gqa, mask_is_causal, lse_rows, after):
    _check(query, key, value)
    b, hq, length, _ = query.shape
    output = query.new_empty(b, hq, length, value.shape[-1])
    return output, query.new_empty(b, hq, torch.sym_min(lse_rows, length), dtype=_lse_dtype(query.dtype))


def attention_with_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    lse_rows: int,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    mask_is_causal: torch.Tensor | None = None,
    after: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.csp.attention`` with keyword arguments."""
    return torch.ops.csp.attention(query, key, value, attn_mask, scale, is_causal, enable_gqa, mask_is_causal,
                                   lse_rows, list(after or ()))


# --- selection for policies that cannot be traced ------------------------------------------------

@torch.library.custom_op("csp::select_reference", mutates_args=(), device_types=None)
def select_reference_op(
    query: torch.Tensor,
    key: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    modality: Optional[torch.Tensor],
    padding: Optional[torch.Tensor],
    scale: Optional[float],
    is_causal: bool,
    config: str,
    layer: int,
    layers: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``prefill_selection`` run eagerly (``config`` from ``config_to_op_arg``; evicting layer ``layer`` of
    ``layers``): (kept (b, hkv, P) int64, slot_valid (b, P) bool, (b, hkv, P) with adaptive budgets)."""
    return prefill_selection(query, key, None, attn_mask, modality, padding, config=config_from_op_arg(config),
                             scale=scale, is_causal=is_causal, layer=(layer, layers))


@select_reference_op.register_fake
def _select_reference_fake(query, key, attn_mask, modality, padding, scale, is_causal, config, layer, layers):
    b, hkv, length, _ = key.shape
    decoded = config_from_op_arg(config)
    slots = kept_slots(length, decoded)
    valid_shape = (b, hkv, slots) if is_adaptive(decoded) else (b, slots)
    return key.new_empty(b, hkv, slots, dtype=torch.int64), key.new_empty(valid_shape, dtype=torch.bool)

"""Triton templates: flash attention that also returns the row LSE, and fused CSP window scoring.

``window_scores_triton`` computes, for the W window queries of every query head, the n-softmax
probability ``p = exp(s - lse) * sigmoid(lse - ln n)`` of each key (``n = 0``: plain softmax), with
``s = scale * <q, k> + mask``; it sums ``p`` over the window queries into *self* (query modality ==
key modality) and *cross* parts and averages the query heads of each KV head (DESIGN §2). Keys are
processed one tile at a time: nothing larger than a (BLOCK_M, BLOCK_N) tile of scores ever exists.
``lse`` is taken from the caller (e.g. ``flash_attention_with_lse_triton``'s, sliced to the window
rows) or computed by a small online-max/sum kernel over key tiles.

Masks: ``None`` (causal for scoring: key position <= query position), bool (True = attend) or
additive float, broadcastable to the score shape; they are read through broadcast strides, never
materialised. Operands are read in their own dtype (fp16/bf16/fp32) and every sum runs in fp32.

The kernels need CUDA tensors, or the Triton interpreter (``TRITON_INTERPRET=1``, or
``CSP_TRITON_INTERPRET=1``, set before this module is imported; fp32 only there, so inputs are
upcast to fp32 first). Import this module only where Triton is installed (``csp-compile[triton]``).
"""

from __future__ import annotations

import math
import os

import torch

if os.environ.get("CSP_TRITON_INTERPRET") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "csp_compile.templates.triton_scoring needs Triton: pip install 'csp-compile[triton]'"
    ) from error

from csp_compile.scoring import AttentionInputs

__all__ = ["INTERPRET", "flash_attention_with_lse_triton", "window_scores", "window_scores_triton"]

# Whether the kernels below were built for the Triton interpreter (decided at decoration time).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# MASK_KIND of the kernels: how the score tile is masked.
_NO_MASK, _CAUSAL, _BOOL_MASK, _ADDITIVE_MASK = 0, 1, 2, 3


# --- kernels -----------------------------------------------------------------------------------
# Only Triton builtins and this module's own jit functions: ``tl.sum``/``tl.max``/``tl.zeros``/
# ``tl.sigmoid`` are jit functions decorated when triton is first imported, so under the interpreter
# they fail ("Cannot call @triton.jit'd outside of the scope of a kernel") whenever triton was imported
# before TRITON_INTERPRET was set (``import csp_compile`` already imports it).

@triton.jit
def _sum(x, axis: tl.constexpr):
    """``tl.sum`` of an fp32 tensor."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


@triton.jit
def _max(x, axis: tl.constexpr):
    """``tl.max`` of an fp32 tensor."""
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@triton.jit
def _masked_scores(q, k_t, scale, mask_ptrs, tile_in, q_pos, k_pos, MASK_KIND: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) fp32 scores ``scale * q @ k_t`` masked per MASK_KIND (-inf = not attended)."""
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * scale
    if MASK_KIND == 1:
        s = tl.where(k_pos[None, :] <= q_pos[:, None], s, float("-inf"))
    elif MASK_KIND == 2:
        allowed = tl.load(mask_ptrs, mask=tile_in, other=0)
        s = tl.where(allowed != 0, s, float("-inf"))
    elif MASK_KIND == 3:
        s += tl.load(mask_ptrs, mask=tile_in, other=0.0).to(tl.float32)
    return tl.where(tile_in, s, float("-inf"))


@triton.jit
def _window_lse_kernel(
    q_ptr, k_ptr, valid_ptr, mask_ptr, lse_ptr,
    s_qb, s_qh, s_qw, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vl,
    s_mb, s_mh, s_mw, s_ml,
    W, L, D, HQ, GROUP, scale,
    MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """LSE over the real, unmasked keys of BLOCK_M window rows of one (batch, query head):
    writes lse (b, hq, W) contiguous; -inf where a row attends nothing."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // HQ
    h = pid_bh % HQ
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < W
    q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_m[:, None] * s_qw + offs_d[None, :] * s_qd,
                mask=row_in[:, None] & (offs_d[None, :] < D), other=0.0)
    q_pos = L - W + offs_m
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    for start_n in range(0, L, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_in = offs_n < L
        k_t = tl.load(k_ptr + b * s_kb + (h // GROUP) * s_kh + offs_n[None, :] * s_kl + offs_d[:, None] * s_kd,
                      mask=key_in[None, :] & (offs_d[:, None] < D), other=0.0)
        real = tl.load(valid_ptr + b * s_vb + offs_n * s_vl, mask=key_in, other=0) != 0
        mask_ptrs = mask_ptr + b * s_mb + h * s_mh + offs_m[:, None] * s_mw + offs_n[None, :] * s_ml
        s = _masked_scores(q, k_t, scale, mask_ptrs, row_in[:, None] & (key_in & real)[None, :], q_pos, offs_n,
                           MASK_KIND, DOT_PRECISION)
        m_new = tl.maximum(m_i, _max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp(m_i - m_safe) + _sum(tl.exp(s - m_safe[:, None]), 1)
        m_i = m_new
    attended = l_i > 0
    lse = tl.where(attended, m_i + tl.log(tl.where(attended, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + pid_bh * W + offs_m, lse, mask=row_in)


@triton.jit
def _window_scores_kernel(
    q_ptr, k_ptr, modality_ptr, valid_ptr, mask_ptr, lse_ptr, self_ptr, cross_ptr,
    s_qb, s_qh, s_qw, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    s_tb, s_tl,
    s_vb, s_vl,
    s_mb, s_mh, s_mw, s_ml,
    s_lb, s_lh, s_lw,
    W, L, D, HKV, GROUP, scale, log_n,
    HAS_N: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Self/cross window attention of BLOCK_N keys of one (batch, KV head), summed over the window
    rows of its GROUP query heads and averaged: writes (b, hkv, L) contiguous outputs."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // HKV
    kv_head = pid_bh % HKV
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    key_in = offs_n < L
    k_t = tl.load(k_ptr + b * s_kb + kv_head * s_kh + offs_n[None, :] * s_kl + offs_d[:, None] * s_kd,
                  mask=key_in[None, :] & (offs_d[:, None] < D), other=0.0)
    key_modality = tl.load(modality_ptr + b * s_tb + offs_n * s_tl, mask=key_in, other=-1)
    real = tl.load(valid_ptr + b * s_vb + offs_n * s_vl, mask=key_in, other=0) != 0
    self_acc = tl.full([BLOCK_N], 0.0, tl.float32)
    cross_acc = tl.full([BLOCK_N], 0.0, tl.float32)
    for g in range(GROUP):
        h = kv_head * GROUP + g
        for start_m in range(0, W, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row_in = offs_m < W
            q_pos = L - W + offs_m
            q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_m[:, None] * s_qw + offs_d[None, :] * s_qd,
                        mask=row_in[:, None] & (offs_d[None, :] < D), other=0.0)
            mask_ptrs = mask_ptr + b * s_mb + h * s_mh + offs_m[:, None] * s_mw + offs_n[None, :] * s_ml
            s = _masked_scores(q, k_t, scale, mask_ptrs, row_in[:, None] & (key_in & real)[None, :], q_pos,
                               offs_n, MASK_KIND, DOT_PRECISION)
            lse = tl.load(lse_ptr + b * s_lb + h * s_lh + offs_m * s_lw, mask=row_in, other=float("-inf"))
            # Rows that attend nothing (lse = -inf) and padding rows (outside a shorter window) score 0.
            row_real = tl.load(valid_ptr + b * s_vb + q_pos * s_vl, mask=row_in, other=0) != 0
            live = row_real & (lse > float("-inf"))
            lse_safe = tl.where(live, lse, 0.0)
            p = tl.exp(s - lse_safe[:, None])
            if HAS_N:
                p = p / (1.0 + tl.exp(log_n - lse_safe))[:, None]  # sigmoid(lse - ln n)
            p = tl.where(live[:, None], p, 0.0)
            query_modality = tl.load(modality_ptr + b * s_tb + q_pos * s_tl, mask=row_in, other=-2)
            same = query_modality[:, None] == key_modality[None, :]
            self_acc += _sum(tl.where(same, p, 0.0), 0)
            cross_acc += _sum(tl.where(same, 0.0, p), 0)
    out = pid_bh * L + offs_n
    tl.store(self_ptr + out, self_acc / GROUP, mask=key_in)
    tl.store(cross_ptr + out, cross_acc / GROUP, mask=key_in)


@triton.jit
def _flash_attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr,
    s_qb, s_qh, s_ql, s_qd,
    s_kb, s_kh, s_kl, s_kd,
    s_vb, s_vh, s_vl, s_vd,
    s_mb, s_mh, s_mq, s_mk,
    LQ, LK, D, DV, HQ, GROUP, scale,
    MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Flash-attention forward of BLOCK_M query rows of one (batch, query head); GQA by head index.
    Writes out (b, hq, LQ, DV) and lse (b, hq, LQ), both contiguous; a row that attends nothing
    gets zeros and lse = -inf."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HQ
    h = pid_bh % HQ
    kv_head = h // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_in = offs_m < LQ
    q = tl.load(q_ptr + b * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :] * s_qd,
                mask=row_in[:, None] & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_DV], 0.0, tl.float32)
    if MASK_KIND == 1:  # causal (top-left aligned, as SDPA): later key tiles are never attended
        end_n = tl.minimum(LK, (pid_m + 1) * BLOCK_M)
    else:
        end_n = LK
    for start_n in range(0, end_n, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        key_in = offs_n < LK
        k_t = tl.load(k_ptr + b * s_kb + kv_head * s_kh + offs_n[None, :] * s_kl + offs_d[:, None] * s_kd,
                      mask=key_in[None, :] & (offs_d[:, None] < D), other=0.0)
        v = tl.load(v_ptr + b * s_vb + kv_head * s_vh + offs_n[:, None] * s_vl + offs_dv[None, :] * s_vd,
                    mask=key_in[:, None] & (offs_dv[None, :] < DV), other=0.0)
        mask_ptrs = mask_ptr + b * s_mb + h * s_mh + offs_m[:, None] * s_mq + offs_n[None, :] * s_mk
        s = _masked_scores(q, k_t, scale, mask_ptrs, row_in[:, None] & key_in[None, :], offs_m, offs_n,
                           MASK_KIND, DOT_PRECISION)
        m_new = tl.maximum(m_i, _max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + _sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    attended = l_i > 0
    out = acc / tl.where(attended, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + (pid_bh * LQ + offs_m[:, None]) * DV + offs_dv[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_in[:, None] & (offs_dv[None, :] < DV))
    lse = tl.where(attended, m_i + tl.log(tl.where(attended, l_i, 1.0)), float("-inf"))
    tl.store(lse_ptr + pid_bh * LQ + offs_m, lse, mask=row_in)


# --- launchers ---------------------------------------------------------------------------------

def _require_device(*tensors: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or anywhere under the interpreter."""
    if not INTERPRET and not all(t.is_cuda for t in tensors):
        devices = sorted({str(t.device) for t in tensors})
        raise RuntimeError(
            f"csp_compile Triton templates need CUDA tensors (got {devices}), or the Triton interpreter: "
            "set TRITON_INTERPRET=1 (or CSP_TRITON_INTERPRET=1) before importing "
            "csp_compile.templates.triton_scoring; on CPU use the reference/Inductor path instead"
        )


def _operands(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors in one dtype the kernels read: fp16/bf16/fp32 as given on GPU, fp32 otherwise
    (the interpreter computes correctly in fp32 only)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if INTERPRET or dtype not in (torch.float16, torch.bfloat16, torch.float32):
        dtype = torch.float32
    return [t.to(dtype) for t in tensors]


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots in full precision (tf32 would perturb rankings); half dtypes use tensor cores."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _head_block(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _check_block(name: str, value: int) -> None:
    if value < 16 or value & (value - 1):
        raise ValueError(f"{name}={value}: allowed a power of two >= 16 (tl.dot tile)")


def _mask_operand(mask: torch.Tensor | None, shape: tuple[int, ...], fallback: torch.Tensor, none_kind: int,
                  ) -> tuple[int, torch.Tensor, tuple[int, ...]]:
    """(MASK_KIND, tensor, 4 strides) for a mask broadcastable to ``shape``: read through broadcast
    strides (bool as uint8), never expanded in memory; ``None`` gives ``none_kind`` and zero strides."""
    if mask is None:
        return none_kind, fallback, (0, 0, 0, 0)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"mask must be bool (True = attend) or additive float: got {mask.dtype}")
    if INTERPRET and mask.is_floating_point():
        mask = mask.float()
    try:
        view = torch.broadcast_to(mask, shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to {shape}") from None
    if mask.dtype == torch.bool:
        return _BOOL_MASK, view.view(torch.uint8), view.stride()
    return _ADDITIVE_MASK, view, view.stride()


def window_scores_triton(
    query_window: torch.Tensor,
    key: torch.Tensor,
    modality: torch.Tensor,
    valid: torch.Tensor,
    mask_rows: torch.Tensor | None,
    scale: float,
    n: float,
    kv_heads: int,
    lse: torch.Tensor | None = None,
    *,
    block_m: int = 16,
    block_n: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CSP self/cross scores of every key, each (b, hkv, L) fp32, without an L x L tensor.

    query_window (b, hq, W, D): the queries of the last W prompt positions (post-RoPE);
    key (b, hkv, L, D); modality (b, L) int ids; valid (b, L) bool, False at (left) padding: padding
    keys are never attended and padding window rows score nothing (with left padding these are
    exactly the rows outside a shorter sequence's window, DESIGN §2); mask_rows the window rows of the
    model's mask, bool (True = attend) or additive, broadcastable to (b, hq, W, L), or None = causal
    (key position <= query position, the query of row w sitting at position L - W + w);
    n >= 0 of n-softmax; kv_heads = hkv (query head h belongs to KV head h // (hq / hkv));
    lse (b, hq, W) fp32: log-sum-exp of each window row's masked scores under the same mask *and*
    padding, or None to compute it here. Scores of query heads sharing a KV head are averaged.
    """
    _require_device(query_window, key, modality, valid)
    b, hq, w, dim = query_window.shape
    length = key.shape[2]
    if key.shape[0] != b or key.shape[1] != kv_heads or key.shape[3] != dim or hq % kv_heads:
        raise ValueError(f"query_window {tuple(query_window.shape)} and key {tuple(key.shape)} do not match "
                         f"(b, hq, W, D) / (b, kv_heads={kv_heads}, L, D) with hq a multiple of kv_heads")
    if not 1 <= w <= length or modality.shape != (b, length) or valid.shape != (b, length):
        raise ValueError(f"need 1 <= W ({w}) <= L ({length}) and modality/valid of shape {(b, length)}: "
                         f"got {tuple(modality.shape)}, {tuple(valid.shape)}")
    if not math.isfinite(n) or n < 0:
        raise ValueError(f"n={n!r}: allowed a finite float >= 0")
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    query_window, key = _operands(query_window, key)
    valid = valid.to(torch.uint8)
    kind, mask, mask_strides = _mask_operand(mask_rows, (b, hq, w, length), valid, _CAUSAL)
    group = hq // kv_heads
    precision = _dot_precision(key.dtype)
    blocks = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_head_block(dim), DOT_PRECISION=precision)
    if lse is None:
        lse = torch.empty(b, hq, w, dtype=torch.float32, device=key.device)
        _window_lse_kernel[(b * hq, triton.cdiv(w, block_m))](
            query_window, key, valid, mask, lse,
            *query_window.stride(), *key.stride(), *valid.stride(), *mask_strides,
            w, length, dim, hq, group, float(scale),
            MASK_KIND=kind, **blocks,
        )
    elif lse.shape != (b, hq, w):
        raise ValueError(f"lse must have shape {(b, hq, w)}: got {tuple(lse.shape)}")
    lse = lse.float()
    self_scores = torch.empty(b, kv_heads, length, dtype=torch.float32, device=key.device)
    cross_scores = torch.empty_like(self_scores)
    _window_scores_kernel[(b * kv_heads, triton.cdiv(length, block_n))](
        query_window, key, modality, valid, mask, lse, self_scores, cross_scores,
        *query_window.stride(), *key.stride(), *modality.stride(), *valid.stride(), *mask_strides, *lse.stride(),
        w, length, dim, kv_heads, group, float(scale), math.log(n) if n > 0 else 0.0,
        HAS_N=n > 0, MASK_KIND=kind, **blocks,
    )
    return self_scores, cross_scores


def flash_attention_with_lse_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    is_causal: bool,
    *,
    block_m: int = 64,
    block_n: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``scaled_dot_product_attention`` forward plus each row's log-sum-exp.

    q (b, hq, Lq, D); k (b, hkv, Lk, D) and v (b, hkv, Lk, Dv) with hq a multiple of hkv (GQA by
    index mapping, no repeat); mask bool (True = attend) or additive, broadcastable to
    (b, hq, Lq, Lk), or None; is_causal as SDPA's (top-left aligned, exclusive with mask); scale
    None = 1/sqrt(D). Returns out (b, hq, Lq, Dv) in q's dtype (fp32 under the interpreter) and
    lse (b, hq, Lq) fp32 of the masked scaled scores; rows that attend nothing get zeros and -inf.
    """
    _require_device(q, k, v)
    b, hq, lq, dim = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != dim or v.shape[:3] != k.shape[:3] or hq % hkv:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match "
                         "(b, hq, Lq, D), (b, hkv, Lk, D), (b, hkv, Lk, Dv) with hq a multiple of hkv")
    if mask is not None and is_causal:
        raise ValueError("pass either mask or is_causal=True, not both (as scaled_dot_product_attention)")
    _check_block("block_m", block_m)
    _check_block("block_n", block_n)
    q, k, v = _operands(q, k, v)
    kind, mask, mask_strides = _mask_operand(mask, (b, hq, lq, lk), q, _CAUSAL if is_causal else _NO_MASK)
    out = torch.empty(b, hq, lq, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    _flash_attention_kernel[(triton.cdiv(lq, block_m), b * hq)](
        q, k, v, mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *mask_strides,
        lq, lk, dim, v.shape[3], hq, hq // hkv, float(1.0 / math.sqrt(dim) if scale is None else scale),
        MASK_KIND=kind, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=_head_block(dim),
        BLOCK_DV=_head_block(v.shape[3]), DOT_PRECISION=_dot_precision(q.dtype),
    )
    return out, lse


def window_scores(inputs: AttentionInputs, n: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``csp_scores``' (self, cross), each (b, hkv, L) fp32, by the Triton templates.

    Raises RuntimeError unless the tensors are on CUDA or the Triton interpreter is on.
    """
    start = inputs.length - int(inputs.window.max())
    mask_rows = None if inputs.mask is None else inputs.mask[..., start:, :]
    return window_scores_triton(inputs.query[:, :, start:], inputs.key, inputs.modality, inputs.valid, mask_rows,
                                inputs.scale, n, inputs.kv_heads)

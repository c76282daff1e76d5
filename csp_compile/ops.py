"""Custom ops the compiled graph calls: attention at prefill fused with the kept-token selection.

``csp::prefill_attention`` replaces one language-model attention call of a prefill graph. It
returns the attention output exactly as the model's own ``scaled_dot_product_attention`` call
would (same mask, scale, GQA handling), plus what eviction needs: the kept positions per KV head
(DESIGN §2), the pruned K/V that go into the cache, and which cache slots are real.

The op is opaque to the compiler (``torch.library.custom_op`` + ``register_fake``). Its attention
is the model's own SDPA call (bit-identical output); its selection scores only the window rows,
by the implementation ``templates.lowering.choose_scoring`` picks for the tensors' device and the
policy (Triton templates on CUDA, the fused window scorer on CPU, the reference ``select_kept``
where a policy needs more than the window, or with ``CSP_SCORING=reference``). The config travels as scalars (an op schema has no dataclass type): build them with
``config_op_args`` and turn them back with ``config_from_op_args``.

Shapes: ``b`` batch, ``hq`` query heads, ``hkv`` KV heads, ``L`` padded prompt length, ``D`` head dim,
``P`` kept slots = ``kept_slots(L, config)`` (``B`` of the contract for the padded length, or ``L``
for the "full" policy). A sequence that keeps fewer than ``P`` tokens (left padding: its own ``B``
is computed on its real length) leaves its first slots empty, as left padding: index -1, zero K/V and
``slot_valid = False``.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from csp_compile.config import CROSS_RATIO_RULES, CSPConfig
from csp_compile.scoring import resolve_budget
from csp_compile.selection import gather_kept, left_aligned
from csp_compile.templates.lowering import choose_scoring, select_with

__all__ = [
    "config_from_op_args",
    "config_op_args",
    "kept_slots",
    "mask_is_causal_graph",
    "prefill_attention",
    "prefill_attention_op",
    "shared_mask_graph",
]


# --- config <-> op scalars ---------------------------------------------------------------------

def config_op_args(config: CSPConfig) -> dict:
    """The op's config arguments for ``config`` (keyword names of ``csp::prefill_attention``).

    budget: the fraction as a float, or the token count (as a float) when ``budget_is_fraction``
    is False; cross_ratio: a rule name ("auto", "population", "mass") or ``repr`` of the float.
    """
    fraction = isinstance(config.budget, float)
    return dict(
        budget=float(config.budget),
        budget_is_fraction=fraction,
        window=config.window,
        cross_ratio=config.cross_ratio if isinstance(config.cross_ratio, str) else repr(float(config.cross_ratio)),
        n=float(config.n),
        policy=config.policy,
        sink_tokens=config.sink_tokens,
        pool_kernel=config.pool_kernel,
        seed=config.seed,
    )


@functools.lru_cache(maxsize=256)
def config_from_op_args(
    budget: float,
    budget_is_fraction: bool,
    window: int,
    cross_ratio: str,
    n: float,
    policy: str,
    sink_tokens: int,
    pool_kernel: int,
    seed: int,
) -> CSPConfig:
    """Inverse of ``config_op_args`` (validated; cached, configs are frozen)."""
    if budget_is_fraction:
        budget_value: float | int = float(budget)
    else:
        if float(budget) != int(budget):
            raise ValueError(f"csp::prefill_attention: a token budget must be integral, got {budget!r}")
        budget_value = int(budget)
    ratio: float | str = cross_ratio if cross_ratio in CROSS_RATIO_RULES else float(cross_ratio)
    return CSPConfig(
        budget=budget_value, window=window, cross_ratio=ratio, n=n, policy=policy,
        sink_tokens=sink_tokens, pool_kernel=pool_kernel, seed=seed,
    )


def kept_slots(length: int, config: CSPConfig) -> int:
    """P: cache slots per sequence after prefill of a (padded) prompt of ``length`` tokens."""
    if config.policy == "full":
        return length
    return resolve_budget(length, config)[0]


def _symbolic_kept_slots(length: torch.SymInt, config: CSPConfig) -> torch.SymInt:
    """``kept_slots`` of a symbolic length (a prefill graph compiled with a dynamic prompt length):
    the same formula as ``resolve_budget`` in sym ops, so P stays a backed expression of L
    (``round`` of a SymFloat is round-half-to-even, as Python's)."""
    if config.policy == "full":
        return length
    if isinstance(config.budget, float):
        return torch.sym_min(length, torch.sym_max(config.window, round(config.budget * length)))
    return torch.sym_min(length, config.budget)


# --- the op ------------------------------------------------------------------------------------

def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' ``repeat_kv`` (expand + reshape), so the attention is bit-identical to the model's."""
    if n_rep == 1:
        return x
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


def _check(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, modality: torch.Tensor | None) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            "csp::prefill_attention: query/key/value must be 4-D (b, heads, L, D): got "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    b, hq, lq, _ = query.shape
    if key.shape[:3] != value.shape[:3] or key.shape[0] != b or lq != key.shape[2]:
        raise ValueError(
            "csp::prefill_attention: a prefill from an empty cache needs query, key and value of the same "
            f"batch and length: got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if hq % key.shape[1]:
        raise ValueError(f"csp::prefill_attention: {hq} query heads is not a multiple of {key.shape[1]} KV heads")
    if modality is not None and modality.shape != (b, lq):
        raise ValueError(f"csp::prefill_attention: modality must be {(b, lq)}: got {tuple(modality.shape)}")


def mask_is_causal_graph(attn_mask: torch.Tensor) -> torch.Tensor:
    """0-d bool tensor: whether the bool ``attn_mask`` (..., Lq, Lkv) is exactly SDPA's ``is_causal`` mask
    (``ones(Lq, Lkv).tril()``, top-left aligned). Pure torch ops: the rewrite traces it once per forward and
    Inductor compiles it to one vectorised reduction (~10 ms at L = 4096 on one core)."""
    return torch.eq(attn_mask, torch.tril(torch.ones_like(attn_mask))).all()


@torch.library.custom_op("csp::shared_mask", mutates_args=(), device_types=None)
def shared_mask_op(mask_bytes: torch.Tensor) -> torch.Tensor:
    """A bool mask stored as uint8 (0/1), returned as a new contiguous bool tensor (a bit-exact copy)."""
    out = torch.empty(mask_bytes.shape, dtype=torch.bool, device=mask_bytes.device)
    return out.copy_(mask_bytes.view(torch.bool))


@shared_mask_op.register_fake
def _shared_mask_fake(mask_bytes):
    return torch.empty(mask_bytes.shape, dtype=torch.bool, device=mask_bytes.device)


def shared_mask_graph(attn_mask: torch.Tensor) -> torch.Tensor:
    """The bool ``attn_mask``, equal, as one buffer that every rewritten layer of a graph reads.

    Inductor would otherwise write the (b, 1, L, L) mask once per ``csp::prefill_attention`` (an opaque
    op's input is copied out per user when it is an unrealized pointwise), with its slow vectorised bool
    stores (~95 ms per 4096 x 4096 copy on one core): here Inductor writes it once as uint8 (~4x faster)
    and ``csp::shared_mask`` turns that into bool with one memcpy-like copy."""
    return torch.ops.csp.shared_mask(attn_mask.to(torch.uint8))


@torch.library.custom_op("csp::prefill_attention", mutates_args=(), device_types=None)
def prefill_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor],
    modality: Optional[torch.Tensor],
    attention_mask_2d: Optional[torch.Tensor],
    scale: Optional[float],
    is_causal: bool,
    enable_gqa: bool,
    budget: float,
    budget_is_fraction: bool,
    window: int,
    cross_ratio: str,
    n: float,
    policy: str,
    sink_tokens: int,
    pool_kernel: int,
    seed: int,
    mask_is_causal: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill attention + kept-token selection of one layer.

    query (b, hq, L, D); key/value (b, hkv, L, D) *before* any GQA repeat (the tensors the cache
    stores); attn_mask / scale / is_causal exactly as the model passes them to SDPA; enable_gqa
    True when the model called SDPA with ``enable_gqa=True``, False when it repeated K/V first
    (the op repeats them the same way); modality (b, L) int, or None = all text; attention_mask_2d (b, L) 1 = real
    token, 0 = left padding, or None (no padding). mask_is_causal: optional 0-d bool tensor, True when
    ``attn_mask`` is exactly SDPA's causal mask (``ones_like(attn_mask).tril()``; the rewrite computes it once
    per forward, ``mask_is_causal_graph``): on CPU the attention then runs with ``is_causal=True`` instead of
    the mask. Bit-identical (the CPU flash kernel serves both; a fully masked block adds exact zeros, checked for
    fp32/bf16/fp16/fp64), without converting the mask to float in every layer, and it skips the blocks above
    the diagonal. Not on CUDA, where a mask and ``is_causal`` select different kernels.

    Returns (attn_output (b, hq, L, Dv), kept_indices (b, hkv, P) int64 ascending after -1 in the leading empty slots,
    pruned_key (b, hkv, P, D), pruned_value (b, hkv, P, Dv), slot_valid (b, P) bool).
    """
    _check(query, key, value, modality)
    config = config_from_op_args(budget, budget_is_fraction, window, cross_ratio, n, policy, sink_tokens,
                                 pool_kernel, seed)
    n_rep = query.shape[1] // key.shape[1]
    if enable_gqa or n_rep == 1:
        attn_key, attn_value, gqa = key, value, {"enable_gqa": True} if n_rep > 1 else {}
    else:
        attn_key, attn_value, gqa = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep), {}
    sdpa_mask, sdpa_causal = attn_mask, is_causal
    if attn_mask is not None and mask_is_causal is not None and query.device.type == "cpu" and bool(mask_is_causal):
        sdpa_mask, sdpa_causal = None, True
    output = F.scaled_dot_product_attention(
        query, attn_key, attn_value, attn_mask=sdpa_mask, dropout_p=0.0, scale=scale, is_causal=sdpa_causal, **gqa
    )

    b, hkv, length, _ = key.shape
    if modality is None:
        modality = torch.zeros(query.shape[0], query.shape[2], dtype=torch.int64, device=query.device)
    # Scores from the window rows only (choose_scoring: Triton on CUDA, the fused scorer on CPU,
    # the reference for policies that need more); the attention output above stays the model's own.
    choice = choose_scoring(query.device, config.policy, query.dtype)
    selection = select_with(choice, query, key, modality, config, attn_mask=attn_mask,
                            attention_mask_2d=attention_mask_2d, scale=scale, is_causal=is_causal)
    indices, slot_valid = left_aligned(selection, kept_slots(length, config))
    indices = indices.to(device=key.device, dtype=torch.int64)
    pruned_key, pruned_value = gather_kept(key, indices, slot_valid), gather_kept(value, indices, slot_valid)
    # SDPA's CPU kernels return a (b, L, h, D)-strided output; the op promises contiguous outputs
    # (the fake impl's layout), and the copy is bit-exact. Returning SDPA's layout instead would save
    # this copy and the model's transpose copy after the op (~2.7 ms per layer at L = 4096, hq = 4,
    # D = 64: under 1% of a prefill), but Inductor's on-disk cache keys do not cover the fake impl:
    # graphs cached against the contiguous layout would then fail their stride asserts.
    return output.contiguous(), indices, pruned_key.contiguous(), pruned_value.contiguous(), slot_valid


@prefill_attention_op.register_fake
def _prefill_attention_fake(
    query, key, value, attn_mask, modality, attention_mask_2d, scale, is_causal, enable_gqa,
    budget, budget_is_fraction, window, cross_ratio, n, policy, sink_tokens, pool_kernel, seed,
    mask_is_causal=None,
):
    _check(query, key, value, modality)
    b, hq, length, _ = query.shape
    hkv = key.shape[1]
    # Under dynamic=True Dynamo may hand the int/float config scalars in as SymInt/SymFloat:
    # specialize them (they are constants of the pass; the backend inserts them as literals).
    config = config_from_op_args(float(budget), bool(budget_is_fraction), int(window), cross_ratio, float(n), policy,
                                 int(sink_tokens), int(pool_kernel), int(seed))
    slots = kept_slots(length, config) if isinstance(length, int) else _symbolic_kept_slots(length, config)
    output = query.new_empty(b, hq, length, value.shape[-1])
    indices = key.new_empty(b, hkv, slots, dtype=torch.int64)
    pruned_key = key.new_empty(b, hkv, slots, key.shape[-1])
    pruned_value = value.new_empty(b, hkv, slots, value.shape[-1])
    slot_valid = key.new_empty(b, slots, dtype=torch.bool)
    return output, indices, pruned_key, pruned_value, slot_valid


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    modality: torch.Tensor,
    config: CSPConfig | None = None,
    *,
    attn_mask: torch.Tensor | None = None,
    attention_mask_2d: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
    mask_is_causal: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.ops.csp.prefill_attention`` with a ``CSPConfig`` instead of its scalars."""
    return torch.ops.csp.prefill_attention(
        query, key, value, attn_mask, modality, attention_mask_2d, scale, is_causal, enable_gqa,
        **config_op_args(config or CSPConfig()), mask_is_causal=mask_is_causal,
    )

"""Triton templates against the reference: window scoring vs ``csp_scores``, flash attention vs SDPA,
and the kept positions they lead to vs ``select_kept``.

Without CUDA the kernels run in the Triton interpreter (fp32, tiny shapes, 16-wide tiles so that
every length below spans several tiles); with CUDA they run natively.
"""

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before the import below
pytest.importorskip("triton", reason="Triton is not installed: pip install 'csp-compile[triton]'")

import torch.nn.functional as F  # noqa: E402

from csp_compile import CSPConfig  # noqa: E402
from csp_compile.policies import PolicyScores, cross_ratio_split, csp_scores  # noqa: E402
from csp_compile.scoring import resolve_budget  # noqa: E402
from csp_compile.selection import make_attention_inputs, pick_top, select_kept  # noqa: E402
from csp_compile.templates import triton_scoring  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_scoring.INTERPRET:  # imported earlier in this process, without the interpreter
    triton_scoring = importlib.reload(triton_scoring)
flash_attention_with_lse_triton = triton_scoring.flash_attention_with_lse_triton
window_scores = triton_scoring.window_scores
window_scores_triton = triton_scoring.window_scores_triton
TILE = dict(block_m=16, block_n=16)
ATOL, RTOL = 2e-6, 1e-4  # fp32 kernels against fp64 references


def problem(length, hq, hkv, mask, pads=(0,), dim=8, value_dim=None, modalities=2, seed=0, q_length=None):
    """Random fp32 q/k/v on DEVICE, block modalities (thirds), left padding ``pads`` per sequence and
    a model mask of kind ``mask``: "causal" (None), "bool"/"additive" (causal + padding, HF style),
    "prefix" (bool, bidirectional inside the middle third, Gemma3 style), "head_bias" (per-head
    additive biases + causal/padding -inf), "none" (None, bidirectional: attention only)."""
    gen = torch.Generator().manual_seed(seed)
    batch = len(pads)
    q_length = q_length or length
    q = torch.randn(batch, hq, q_length, dim, generator=gen) * 1.5
    k = torch.randn(batch, hkv, length, dim, generator=gen) * 1.5
    v = torch.randn(batch, hkv, length, value_dim or dim, generator=gen)
    modality = ((torch.arange(length) * 3 // length) % modalities).expand(batch, -1).clone()
    attention_mask = torch.ones(batch, length, dtype=torch.int64)
    for row, pad in enumerate(pads):
        attention_mask[row, :pad] = 0
    positions = torch.arange(length)
    allowed = (positions[None, :] <= positions[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
    if mask == "prefix":
        third = (positions * 3 // length) == 1
        allowed = allowed | (third[:, None] & third[None, :] & attention_mask.bool()[:, None, None, :])
    masks = {
        "causal": None,
        "none": None,
        "bool": allowed,
        "prefix": allowed,
        "additive": torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min),
        "head_bias": torch.randn(batch, hq, length, length, generator=gen).masked_fill(~allowed, float("-inf")),
    }
    tensors = dict(q=q, k=k, v=v, modality=modality, attention_mask=attention_mask, mask=masks[mask])
    return {name: None if t is None else t.to(DEVICE) for name, t in tensors.items()}


def inputs_of(p, config, dtype=torch.float32):
    mask = p["mask"]
    if mask is not None and mask.is_floating_point():
        mask = mask.to(dtype)
    return make_attention_inputs(p["q"].to(dtype), p["k"].to(dtype), p["modality"], config,
                                 attention_mask=p["attention_mask"], mask=mask)


SCORE_CASES = [
    # (problem kwargs, config kwargs): lengths 1/7/33/50, W < L and W = L, GQA and MQA, every mask kind
    (dict(length=1, hq=1, hkv=1, mask="causal"), dict(window=4, n=1.0)),
    (dict(length=7, hq=4, hkv=2, mask="bool", pads=(0, 2)), dict(window=8, n=3.0)),  # W = L; W = 5 for row 1
    (dict(length=33, hq=4, hkv=2, mask="additive", pads=(0, 27)), dict(window=8, budget=0.3, n=0.0)),  # W = 6 for row 1
    (dict(length=50, hq=4, hkv=1, mask="causal", pads=(0, 11), modalities=1), dict(window=20, n=1.0)),
    (dict(length=50, hq=4, hkv=2, mask="prefix", pads=(3,), modalities=3), dict(window=16, n=1.0)),
    (dict(length=33, hq=2, hkv=2, mask="head_bias", dim=12), dict(window=6, n=0.0)),
    (dict(length=33, hq=4, hkv=2, mask="bool", pads=(0, 4)), dict(window=64, budget=1.0, n=3.0)),  # W = L
]


@pytest.mark.parametrize("problem_kwargs, config_kwargs", SCORE_CASES)
def test_window_scores_match_reference(problem_kwargs, config_kwargs):
    p = problem(**problem_kwargs)
    config = CSPConfig(**config_kwargs)
    expected = csp_scores(inputs_of(p, config, torch.float64), config)
    inputs = inputs_of(p, config)
    start = inputs.length - int(inputs.window.max())
    mask_rows = None if inputs.mask is None else inputs.mask[..., start:, :]
    self_scores, cross_scores = window_scores_triton(
        inputs.query[:, :, start:], inputs.key, inputs.modality, inputs.valid, mask_rows, inputs.scale,
        config.n, inputs.kv_heads, **TILE,
    )
    assert self_scores.shape == cross_scores.shape == expected.primary.shape
    assert self_scores.dtype == cross_scores.dtype == torch.float32
    torch.testing.assert_close(self_scores.double(), expected.primary, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(cross_scores.double(), expected.secondary, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("mask", ["bool", "additive"])
def test_window_scores_reuse_the_attention_lse(mask):
    p = problem(length=33, hq=4, hkv=2, mask=mask, pads=(0, 6))
    config = CSPConfig(window=8, n=1.0)
    inputs = inputs_of(p, config)
    _, lse = flash_attention_with_lse_triton(p["q"], p["k"], p["v"], p["mask"], None, False, **TILE)
    width = int(inputs.window.max())
    scores = window_scores_triton(
        inputs.query[:, :, -width:], inputs.key, inputs.modality, inputs.valid, inputs.mask[..., -width:, :],
        inputs.scale, config.n, inputs.kv_heads, lse[..., -width:], **TILE,
    )
    expected = csp_scores(inputs_of(p, config, torch.float64), config)
    for got, want in zip(scores, (expected.primary, expected.secondary)):
        torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)


FLASH_CASES = [
    # (problem kwargs, is_causal)
    (dict(length=1, hq=1, hkv=1, mask="causal"), True),
    (dict(length=7, hq=4, hkv=2, mask="bool", pads=(0, 3)), False),  # padded rows attend nothing
    (dict(length=33, hq=4, hkv=1, mask="additive", pads=(5,), dim=12, value_dim=8), False),
    (dict(length=50, hq=4, hkv=2, mask="causal"), True),
    (dict(length=50, hq=2, hkv=2, mask="none", dim=12), False),
    (dict(length=33, hq=2, hkv=1, mask="head_bias"), False),
    (dict(length=33, hq=2, hkv=1, mask="causal", q_length=7), True),  # Lq < Lk: top-left causal, as SDPA
]


@pytest.mark.parametrize("problem_kwargs, is_causal", FLASH_CASES)
def test_flash_attention_matches_sdpa_and_logsumexp(problem_kwargs, is_causal):
    p = problem(**problem_kwargs)
    q, k, v, mask = p["q"], p["k"], p["v"], p["mask"]
    out, lse = flash_attention_with_lse_triton(q, k, v, mask, None, is_causal, **TILE)

    q64, k64, v64 = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    scores = q64 @ k64.repeat_interleave(group, 1).transpose(-1, -2) / q.shape[-1] ** 0.5
    if is_causal:
        allowed = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=DEVICE).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    elif mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    expected_lse = torch.logsumexp(scores, dim=-1)
    torch.testing.assert_close(lse.double(), expected_lse, atol=ATOL, rtol=RTOL)

    live = expected_lse > float("-inf")
    sdpa_mask = mask.double() if mask is not None and mask.is_floating_point() else mask
    expected = F.scaled_dot_product_attention(q64, k64, v64, attn_mask=sdpa_mask, is_causal=is_causal,
                                              enable_gqa=group > 1)
    assert out.shape == expected.shape
    torch.testing.assert_close(out.double()[live], expected[live], atol=ATOL, rtol=RTOL)
    assert bool((out[~live] == 0).all())


@pytest.mark.skipif(triton_scoring.INTERPRET, reason="the Triton interpreter computes in fp32 only: GPU test")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_fp32(dtype):
    p = problem(length=50, hq=4, hkv=2, mask="bool", pads=(0, 7))
    config = CSPConfig(window=16, n=1.0)
    expected = csp_scores(inputs_of(p, config, torch.float64), config)
    half = make_attention_inputs(p["q"].to(dtype), p["k"].to(dtype), p["modality"], config,
                                 attention_mask=p["attention_mask"], mask=p["mask"])
    for got, want in zip(window_scores(half, config.n), (expected.primary, expected.secondary)):
        torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)
    out, _ = flash_attention_with_lse_triton(p["q"].to(dtype), p["k"].to(dtype), p["v"].to(dtype), None, None, True)
    reference = F.scaled_dot_product_attention(p["q"], p["k"], p["v"], is_causal=True, enable_gqa=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), reference, atol=3e-2, rtol=3e-2)


SELECTION_CASES = [
    (dict(length=50, hq=4, hkv=2, mask="bool", pads=(0, 9)), dict(budget=0.3, window=8, n=1.0)),
    (dict(length=33, hq=4, hkv=1, mask="causal", modalities=3), dict(budget=12, window=4, n=3.0,
                                                                       cross_ratio="population")),
    (dict(length=50, hq=2, hkv=2, mask="prefix", modalities=1), dict(budget=0.2, window=6, n=0.0)),
]


@pytest.mark.parametrize("problem_kwargs, config_kwargs", SELECTION_CASES)
def test_selection_with_triton_scores_keeps_the_same_positions(problem_kwargs, config_kwargs):
    p = problem(**problem_kwargs)
    config = CSPConfig(**config_kwargs)
    inputs = inputs_of(p, config)
    scores = PolicyScores(*window_scores(inputs, config.n))
    budgets = torch.tensor([resolve_budget(int(n), config)[0] for n in inputs.valid.sum(-1)], device=DEVICE)
    k_total = (budgets - inputs.window).clamp(min=0)
    keep = pick_top(scores, inputs.candidates(), k_total, cross_ratio_split(scores, inputs, config, k_total))
    positions = torch.arange(inputs.length, device=DEVICE)
    keep = keep | (positions[None, :] >= (inputs.length - inputs.window)[:, None])[:, None, :]
    expected = select_kept(p["q"], p["k"], p["modality"], config, attention_mask=p["attention_mask"], mask=p["mask"])
    assert torch.equal(keep, expected.keep_mask)


def test_cpu_tensors_without_the_interpreter_raise_a_clear_error(monkeypatch):
    monkeypatch.setattr(triton_scoring, "INTERPRET", False)
    p = problem(length=7, hq=2, hkv=1, mask="causal")
    with pytest.raises(RuntimeError, match="need CUDA tensors.*TRITON_INTERPRET=1"):
        window_scores(inputs_of({**p, "q": p["q"].cpu(), "k": p["k"].cpu()}, CSPConfig(window=4)), 1.0)

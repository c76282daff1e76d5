"""The fused window scorer (cpu-fused) against the reference: scores, kept positions, no L x L tensor,
and the compiled prefill of an optimised model."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._inductor.utils import run_and_get_code
from torch.testing import FileCheck
from torch.utils._python_dispatch import TorchDispatchMode

import csp_compile
from csp_compile import CSPConfig, select_kept
from csp_compile.policies import get_policy
from csp_compile.selection import make_attention_inputs
from csp_compile.templates import ScoringChoice, choose_scoring, naive_scores, score_window, select_with
from csp_compile.templates import cpu_scoring
from csp_compile.testing import build_tiny_vlm, make_inputs

FUSED = ScoringChoice("cpu-fused", "test")
MASKS = ("causal", "bool", "additive", "prefix", "bidirectional")


def build_masks(kind, length, attention_mask, modality, dtype):
    """(attn_mask for the scorer, is_causal, mask for select_kept): HF-style masks with left padding;
    "prefix" is Gemma3's (bool, image blocks see each other), "bidirectional" attends everything."""
    positions = torch.arange(length)
    real = attention_mask.bool()[:, None, None, :]
    allowed = (positions[None, :] <= positions[:, None])[None, None] & real
    if kind == "causal":
        return None, True, None
    if kind == "bidirectional":
        return None, False, torch.ones(1, 1, length, length, dtype=torch.bool)
    if kind == "prefix":
        image = modality == 1
        block = image[:, :, None] & image[:, None, :]
        allowed = allowed | (block[:, None] & real)
    if kind in ("bool", "prefix"):
        return allowed, False, allowed
    additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return additive, False, additive


@st.composite
def problems(draw, dtype=None, mask_kind=None, cross_ratio=None):
    batch = draw(st.integers(1, 3))
    length = draw(st.integers(1, 29))
    kv_heads = draw(st.sampled_from([1, 2]))
    group = draw(st.sampled_from([1, 2, 3]))
    dim = draw(st.sampled_from([4, 8]))
    dtype = dtype or draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    query = torch.randn(batch, kv_heads * group, length, dim, generator=gen, dtype=dtype) * 2
    key = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=dtype) * 2
    text_only = draw(st.booleans())
    start, stop = sorted(draw(st.lists(st.integers(0, length), min_size=2, max_size=2)))
    modality = torch.zeros(batch, length, dtype=torch.int64)
    if not text_only:
        modality[:, start:stop] = 1
    attention_mask = torch.ones(batch, length, dtype=torch.int64)
    window = draw(st.integers(1, 8))
    for b in range(1, batch):
        attention_mask[b, : draw(st.integers(0, max(0, length - window)))] = 0
    config = CSPConfig(
        budget=draw(st.one_of(st.floats(0.05, 1.0), st.integers(1, 30))),
        window=window,
        cross_ratio=cross_ratio if cross_ratio is not None else draw(st.sampled_from(["auto", "population", "mass", 0.3])),
        n=draw(st.sampled_from([0.0, 1.0, 4.0])),
    )
    kind = mask_kind or draw(st.sampled_from(MASKS))
    attn_mask, is_causal, reference_mask = build_masks(kind, length, attention_mask, modality, dtype)
    return dict(query=query, key=key, modality=modality, attention_mask=attention_mask, config=config,
                attn_mask=attn_mask, is_causal=is_causal, reference_mask=reference_mask, scale=0.7)


def reference_scores(p, policy="csp"):
    config = p["config"].replace(policy=policy)
    inputs = make_attention_inputs(p["query"], p["key"], p["modality"], config, attention_mask=p["attention_mask"],
                                   mask=p["reference_mask"], scale=p["scale"])
    return get_policy(policy).score(inputs, config)


def fused_scores(p, policy="csp"):
    return score_window(p["query"], p["key"], p["modality"], p["config"].replace(policy=policy),
                        attn_mask=p["attn_mask"], attention_mask_2d=p["attention_mask"], scale=p["scale"],
                        is_causal=p["is_causal"])


def assert_scores_close(got, expected, dtype):
    atol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.primary, expected.primary, atol=atol, rtol=1e-5)
    assert (got.secondary is None) == (expected.secondary is None)
    if got.secondary is not None:
        torch.testing.assert_close(got.secondary, expected.secondary, atol=atol, rtol=1e-5)


def assert_same_selection(p):
    expected = select_kept(p["query"], p["key"], p["modality"], p["config"], attention_mask=p["attention_mask"],
                           mask=p["reference_mask"], scale=p["scale"])
    got = select_with(FUSED, p["query"], p["key"], p["modality"], p["config"], attn_mask=p["attn_mask"],
                      attention_mask_2d=p["attention_mask"], scale=p["scale"], is_causal=p["is_causal"])
    assert torch.equal(got.indices, expected.indices)
    assert torch.equal(got.num_kept, expected.num_kept)
    assert torch.equal(got.num_secondary, expected.num_secondary)


@given(problems())
def test_fused_scores_and_kept_positions_equal_reference(p):
    assert_scores_close(fused_scores(p), reference_scores(p), p["query"].dtype)
    assert_same_selection(p)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("cross_ratio", ["auto", "population", "mass", 0.25])
@settings(max_examples=8)
@given(data=st.data())
def test_every_mask_and_cross_ratio_rule(mask_kind, cross_ratio, data):
    p = data.draw(problems(dtype=torch.float32, mask_kind=mask_kind, cross_ratio=cross_ratio))
    assert_scores_close(fused_scores(p), reference_scores(p), torch.float32)
    assert_same_selection(p)


@settings(max_examples=30)
@given(problems())
def test_snapkv_scores_equal_reference(p):
    assert_scores_close(fused_scores(p, "snapkv"), reference_scores(p, "snapkv"), p["query"].dtype)


def gqa_problem(length=37, pads=(0, 6), hq=4, hkv=2, mask_kind="bool", seed=0, dim=16):
    gen = torch.Generator().manual_seed(seed)
    batch = len(pads)
    query = torch.randn(batch, hq, length, dim, generator=gen)
    key = torch.randn(batch, hkv, length, dim, generator=gen)
    modality = torch.zeros(batch, length, dtype=torch.int64)
    modality[:, 5 : length // 2] = 1
    attention_mask = torch.ones(batch, length, dtype=torch.int64)
    for b, pad in enumerate(pads):
        attention_mask[b, :pad] = 0
    attn_mask, is_causal, reference_mask = build_masks(mask_kind, length, attention_mask, modality, torch.float32)
    return dict(query=query, key=key, modality=modality, attention_mask=attention_mask,
                config=CSPConfig(budget=0.3, window=5), attn_mask=attn_mask, is_causal=is_causal,
                reference_mask=reference_mask, scale=0.25)


@pytest.mark.parametrize("mask_kind", MASKS)
def test_key_chunks_equal_one_block(mask_kind, monkeypatch):
    p = gqa_problem(mask_kind=mask_kind)
    whole = fused_scores(p)
    monkeypatch.setattr(cpu_scoring, "CHUNK_ELEMENTS", 2 * 4 * 5 * 6)  # 6 keys per chunk
    assert_scores_close(fused_scores(p), whole, torch.float32)
    assert_scores_close(fused_scores(p), reference_scores(p), torch.float32)


def test_reuses_a_given_lse():
    p = gqa_problem(pads=(0, 0))
    mask = torch.zeros(p["attn_mask"].shape).masked_fill(~p["attn_mask"], float("-inf"))
    value = torch.randn(2, 2, 37, 16)
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        p["query"], p["key"].repeat_interleave(2, 1), value.repeat_interleave(2, 1), 0.0, False, attn_mask=mask,
        scale=p["scale"])
    got = score_window(p["query"], p["key"], p["modality"], p["config"], attn_mask=p["attn_mask"],
                       scale=p["scale"], lse=lse)
    assert_scores_close(got, reference_scores(p), torch.float32)
    with pytest.raises(ValueError, match="lse must have shape"):
        score_window(p["query"], p["key"], p["modality"], p["config"], attn_mask=p["attn_mask"], lse=lse[:, :1])


def test_naive_scores_equal_reference():
    p = gqa_problem()
    assert_scores_close(naive_scores(p["query"], p["key"], p["modality"], p["config"], attn_mask=p["attn_mask"],
                                     attention_mask_2d=p["attention_mask"], scale=p["scale"]),
                        reference_scores(p), torch.float32)


class LargestTensor(TorchDispatchMode):
    """Records the shape of the largest tensor any aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = ()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() > torch.Size(self.largest).numel():
                self.largest = tuple(t.shape)
        return out


@pytest.mark.parametrize("mask_kind", ["causal", "bool", "bidirectional"])
def test_fused_selection_never_builds_an_l_by_l_tensor(mask_kind):
    length = 211
    p = gqa_problem(length=length, pads=(0, 9), mask_kind=mask_kind)
    with LargestTensor() as mode:
        select_with(FUSED, p["query"], p["key"], p["modality"], p["config"], attn_mask=p["attn_mask"],
                    attention_mask_2d=p["attention_mask"], scale=p["scale"], is_causal=p["is_causal"])
    # nothing larger than the (b, hq, W, L) window block or a (view of an) input K; L x L is 44521
    largest = torch.Size(mode.largest).numel()
    assert largest <= max(2 * 4 * 5 * length, p["key"].numel()) < length * length, mode.largest


def test_choice_and_bad_input(monkeypatch):
    assert choose_scoring("cpu", "csp").implementation == "cpu-fused"
    assert choose_scoring("cpu", "snapkv").implementation == "cpu-fused"
    assert choose_scoring("cpu", "h2o").implementation == "reference"
    monkeypatch.setenv("CSP_SCORING", "reference")
    assert choose_scoring("cpu", "csp").implementation == "reference"
    monkeypatch.setenv("CSP_SCORING", "fast")
    with pytest.raises(ValueError, match="CSP_SCORING"):
        choose_scoring("cpu", "csp")
    p = gqa_problem()
    with pytest.raises(ValueError, match="not scored from the window"):
        score_window(p["query"], p["key"], p["modality"], p["config"].replace(policy="h2o"))
    with pytest.raises(ValueError, match="attn_mask must broadcast"):
        score_window(p["query"], p["key"], p["modality"], p["config"], attn_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="modality"):
        score_window(p["query"], p["key"], p["modality"][:, :3], p["config"])


def test_op_reference_and_fused_paths_agree(monkeypatch):
    from csp_compile.ops import prefill_attention

    p = gqa_problem()
    value = torch.randn(2, 2, 37, 16)
    args = (p["query"], p["key"], value, p["modality"], p["config"])
    kwargs = dict(attn_mask=p["attn_mask"], attention_mask_2d=p["attention_mask"], scale=p["scale"])
    fused = prefill_attention(*args, **kwargs)
    monkeypatch.setenv("CSP_SCORING", "reference")
    reference = prefill_attention(*args, **kwargs)
    for f, r in zip(fused, reference):
        assert torch.equal(f, r)


def float_buffers(code):
    """Shapes of the float buffers a generated Inductor module allocates."""
    found = re.findall(r"empty_strided_cpu\(\(([^)]*)\), \([^)]*\), torch\.(float\w*)\)", code)
    return [tuple(int(d) for d in shape.split(",") if d.strip()) for shape, _ in found]


def test_compiled_prefill_has_fused_scoring_and_no_l_by_l_scores(monkeypatch):
    """torchao style: the generated code of an optimised model's prefill calls the op, the scorer
    (compiled by Inductor with CSP_SCORING_COMPILE=1) works on (W x L) blocks, and no float buffer
    anywhere is L x L. L = 57 (57 * 57 = 3249)."""
    monkeypatch.setenv("CSP_SCORING_COMPILE", "1")
    monkeypatch.setattr(cpu_scoring, "_compiled_block", None)
    model = build_tiny_vlm("llava")
    inputs = make_inputs(model, batch=1, text_len=41)
    length = inputs["input_ids"].shape[1]
    assert length == 57
    csp_compile.optimize(model, budget=0.2, window=4)
    assert "scoring=cpu-fused" in csp_compile.explain(model)
    with torch._inductor.config.patch(fx_graph_cache=False), torch.no_grad():
        _, codes = run_and_get_code(model, **inputs, use_cache=True)
    prefill = [c for c in codes if "csp.prefill_attention" in c]
    scorer = [c for c in codes if "csp.prefill_attention" not in c and "extern_kernels.bmm" in c]
    assert len(prefill) == 1 and len(scorer) == 1, [len(c) for c in codes]
    FileCheck().check("torch.ops.csp.prefill_attention.default").run(prefill[0])
    # window block: (b, hq, W, L) = (1, 4, 4, 57) scores, then the per-modality window sums
    FileCheck().check("extern_kernels.bmm").check("(1, 4, 4, 57)").check("exp").run(scorer[0])
    for code in codes:
        assert not [s for s in float_buffers(code) if s[-2:] == (length, length)], float_buffers(code)
    assert all(k is not None and k.shape[-1] == 11 for k in csp_compile.kept_positions(model))


@pytest.mark.parametrize("mask_kind", MASKS)
def test_triton_lowering_gives_the_same_kept_positions(mask_kind, monkeypatch):
    """The "triton" choice (CUDA in production) through the Triton interpreter on CPU."""
    pytest.importorskip("triton")
    import importlib

    from csp_compile.templates import triton_scoring

    if not torch.cuda.is_available() and not triton_scoring.INTERPRET:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        importlib.reload(triton_scoring)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    p = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in gqa_problem(length=29, mask_kind=mask_kind).items()}
    expected = select_kept(p["query"], p["key"], p["modality"], p["config"], attention_mask=p["attention_mask"],
                           mask=p["reference_mask"], scale=p["scale"])
    got = select_with(ScoringChoice("triton", "test"), p["query"], p["key"], p["modality"], p["config"],
                      attn_mask=p["attn_mask"], attention_mask_2d=p["attention_mask"], scale=p["scale"],
                      is_causal=p["is_causal"])
    assert torch.equal(got.indices, expected.indices) and torch.equal(got.num_secondary, expected.num_secondary)

"""The selection the rewrite emits into the prefill graph (``prefill_selection`` given the attention
kernel's log-sum-exp) against the reference ``select_kept``: every mask kind, padding, GQA; no L x L
tensor; and in an optimised model's generated code, the scoring as Inductor kernels."""

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
from csp_compile.ops import attention_with_lse
from csp_compile.policies import get_policy
from csp_compile.selection import left_aligned, make_attention_inputs
from csp_compile.templates import choose_scoring, kept_slots, naive_scores, prefill_selection
from csp_compile.tiny_vlms import build_tiny_vlm, make_inputs

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


def graph_selection(p, policy="csp"):
    """What a rewritten layer computes: the attention's window log-sum-exp, then ``prefill_selection``."""
    config = p["config"].replace(policy=policy)
    value = torch.zeros_like(p["key"])
    _, lse = attention_with_lse(p["query"], p["key"], value, lse_rows=config.window, attn_mask=p["attn_mask"],
                                scale=p["scale"], is_causal=p["is_causal"])
    return prefill_selection(p["query"], p["key"], lse, p["attn_mask"], p["modality"], p["attention_mask"],
                             config=config, scale=p["scale"], is_causal=p["is_causal"])


def assert_same_selection(p, policy="csp"):
    config = p["config"].replace(policy=policy)
    expected = select_kept(p["query"], p["key"], p["modality"], config, attention_mask=p["attention_mask"],
                           mask=p["reference_mask"], scale=p["scale"])
    indices, slot_valid = graph_selection(p, policy)
    expected_indices, expected_valid = left_aligned(expected, kept_slots(p["query"].shape[2], config))
    assert torch.equal(indices, expected_indices)
    assert torch.equal(slot_valid, expected_valid)


@given(problems())
def test_graph_selection_equals_reference(p):
    assert_same_selection(p)


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("cross_ratio", ["auto", "population", "mass", 0.25])
@settings(max_examples=8)
@given(data=st.data())
def test_every_mask_and_cross_ratio_rule(mask_kind, cross_ratio, data):
    assert_same_selection(data.draw(problems(dtype=torch.float32, mask_kind=mask_kind, cross_ratio=cross_ratio)))


@pytest.mark.parametrize("policy", ["snapkv", "streaming", "full"])
@settings(max_examples=20)
@given(p=problems())
def test_other_traceable_policies_equal_reference(policy, p):
    assert_same_selection(p, policy)


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


def test_naive_scores_equal_reference():
    p = gqa_problem()
    got, expected = naive_scores(p["query"], p["key"], p["modality"], p["config"], attn_mask=p["attn_mask"],
                                 attention_mask_2d=p["attention_mask"], scale=p["scale"]), reference_scores(p)
    torch.testing.assert_close(got.primary, expected.primary, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.secondary, expected.secondary, atol=1e-6, rtol=1e-5)


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
def test_graph_selection_never_builds_an_l_by_l_tensor(mask_kind):
    length = 211
    p = gqa_problem(length=length, pads=(0, 9), mask_kind=mask_kind)
    _, lse = attention_with_lse(p["query"], p["key"], torch.zeros_like(p["key"]), lse_rows=p["config"].window,
                                attn_mask=p["attn_mask"], scale=p["scale"], is_causal=p["is_causal"])
    with LargestTensor() as mode:
        prefill_selection(p["query"], p["key"], lse, p["attn_mask"], p["modality"], p["attention_mask"],
                          config=p["config"], scale=p["scale"], is_causal=p["is_causal"])
    # nothing larger than the (b, hq, W, L) window block or a (view of an) input; L x L is 44521
    largest = torch.Size(mode.largest).numel()
    assert largest <= max(2 * 4 * 5 * length, p["query"].numel()) < length * length, mode.largest


def test_choice(monkeypatch):
    assert choose_scoring("csp").implementation == "inductor"
    assert choose_scoring("snapkv").traced and choose_scoring("full").traced
    assert choose_scoring("h2o").implementation == "reference"
    monkeypatch.setenv("CSP_SCORING", "reference")
    assert choose_scoring("csp").implementation == "reference"
    monkeypatch.setenv("CSP_SCORING", "fast")
    with pytest.raises(ValueError, match="CSP_SCORING"):
        choose_scoring("csp")


def buffers(code, dtypes=r"float\w*"):
    """Shapes of the buffers of ``dtypes`` (a regex) a generated Inductor module allocates."""
    found = re.findall(r"empty_strided_cpu\(\(([^)]*)\), \([^)]*\), torch\.(" + dtypes + r")\)", code)
    return [tuple(int(d) for d in shape.split(",") if d.strip()) for shape, _ in found]


@pytest.mark.slow
def test_compiled_prefill_scores_in_inductor_kernels_and_no_l_by_l_buffer():
    """torchao style: in the generated code of an optimised model's prefill, the attention is the one
    opaque op (``csp.attention``); the window scores are Inductor's own (a bmm of the (b, hq, W, L) =
    (1, 4, 4, 57) window block and generated kernels computing exp over it), no eager selection op
    runs, no float buffer anywhere is L x L, and the layers share one uint8 L x L mask. L = 57 (57 * 57 = 3249)."""
    model = build_tiny_vlm("llava")
    inputs = make_inputs(model, batch=1, text_len=41)
    length = inputs["input_ids"].shape[1]
    assert length == 57
    csp_compile.optimize(model, budget=0.2, window=4)
    assert "scoring=inductor" in csp_compile.explain(model)
    with torch._inductor.config.patch(fx_graph_cache=False), torch.no_grad():
        _, codes = run_and_get_code(model, **inputs, use_cache=True)
    prefill = [c for c in codes if "torch.ops.csp.attention.default" in c]
    assert len(prefill) == 1, [len(c) for c in codes]
    code = prefill[0]
    assert "select_reference" not in code
    FileCheck().check("torch.ops.csp.attention.default").check("extern_kernels.bmm").check("(1, 4, 4, 57)") \
        .check("exp").run(code)
    for c in codes:
        assert not [s for s in buffers(c) if s[-2:] == (length, length)], buffers(c)
    # the layers share one uint8 copy of the attention mask (csp::attention views it as bool)
    assert [s for s in buffers(code, "uint8|bool") if s[-2:] == (length, length)] == [(1, 1, length, length)]
    assert all(k is not None and k.shape[-1] == 11 for k in csp_compile.kept_positions(model))

"""csp::prefill_attention: attention output, selection, pruned K/V, fake shapes, compiled use."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

from csp_compile import CSPConfig, select_kept
from csp_compile.ops import (config_from_op_args, config_op_args, kept_slots, mask_is_causal_graph,
                             prefill_attention, shared_mask_graph)
from csp_compile.scoring import resolve_budget

OP = torch.ops.csp.prefill_attention.default


def repeat_kv(x, n_rep):
    b, h, length, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, length, d).reshape(b, h * n_rep, length, d)


def problem(batch=2, hq=4, hkv=2, length=23, dim=8, pads=(0, 5), seed=0, mask="bool"):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, hq, length, dim, generator=gen)
    key = torch.randn(batch, hkv, length, dim, generator=gen)
    value = torch.randn(batch, hkv, length, dim, generator=gen)
    modality = torch.zeros(batch, length, dtype=torch.int64)
    modality[:, 6:15] = 1
    attention_mask = torch.ones(batch, length, dtype=torch.int64)
    for b, pad in enumerate(pads[:batch]):
        attention_mask[b, :pad] = 0
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]
    if mask == "bool":
        attn_mask = allowed
    elif mask == "additive":
        attn_mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    else:
        attn_mask = None
    return dict(query=query, key=key, value=value, modality=modality, attention_mask=attention_mask,
                attn_mask=attn_mask)


CASES = [
    # (problem kwargs, op kwargs, config)
    (dict(), dict(enable_gqa=False), CSPConfig(budget=0.3, window=4)),
    (dict(mask="additive"), dict(enable_gqa=False), CSPConfig(budget=0.3, window=4, cross_ratio="mass")),
    (dict(batch=1, mask=None), dict(is_causal=True, enable_gqa=True), CSPConfig(budget=7, window=3)),
    (dict(batch=1, mask=None, hq=2), dict(is_causal=False), CSPConfig(budget=0.5, window=2, cross_ratio=0.25)),
    (dict(pads=(3, 0)), dict(), CSPConfig(budget=0.2, window=4, policy="snapkv")),
    (dict(), dict(), CSPConfig(budget=0.4, window=2, policy="streaming")),
    (dict(), dict(), CSPConfig(budget=1.0, window=4)),
    (dict(), dict(), CSPConfig(policy="full")),
]


def run_op(p, op_kwargs, config, scale=None):
    return prefill_attention(p["query"], p["key"], p["value"], p["modality"], config, attn_mask=p["attn_mask"],
                             attention_mask_2d=p["attention_mask"], scale=scale, **op_kwargs)


@pytest.mark.parametrize("prob, op_kwargs, config", CASES)
def test_op_matches_direct_computation(prob, op_kwargs, config):
    p = problem(**prob)
    scale = 0.3
    output, indices, pruned_key, pruned_value, slot_valid = run_op(p, op_kwargs, config, scale)
    b, hq, length, _ = p["query"].shape
    hkv = p["key"].shape[1]

    # attention: bit-identical to the model's own SDPA call (repeat_kv or enable_gqa, same mask)
    is_causal = op_kwargs.get("is_causal", False)
    if op_kwargs.get("enable_gqa", False):
        expected = F.scaled_dot_product_attention(p["query"], p["key"], p["value"], attn_mask=p["attn_mask"],
                                                  scale=scale, is_causal=is_causal, enable_gqa=hq != hkv)
    else:
        expected = F.scaled_dot_product_attention(p["query"], repeat_kv(p["key"], hq // hkv),
                                                  repeat_kv(p["value"], hq // hkv), attn_mask=p["attn_mask"],
                                                  scale=scale, is_causal=is_causal)
    assert output.is_contiguous()
    assert torch.equal(output, expected)

    # selection: select_kept's indices, left-aligned in P slots (empty slots first, index -1)
    select_mask = p["attn_mask"]
    if select_mask is None and not is_causal:
        select_mask = torch.ones(1, 1, length, length, dtype=torch.bool)
    selection = select_kept(p["query"], p["key"], p["modality"], config, attention_mask=p["attention_mask"],
                            mask=select_mask, scale=scale)
    slots = kept_slots(length, config)
    assert indices.shape == (b, hkv, slots) and indices.dtype == torch.int64
    for bi in range(b):
        kept = int(selection.num_kept[bi])
        assert torch.equal(indices[bi, :, slots - kept:], selection.indices[bi, :, :kept])
        assert bool((indices[bi, :, : slots - kept] == -1).all())

    # slot_valid and pruned K/V
    assert slot_valid.shape == (b, slots) and slot_valid.dtype == torch.bool
    assert torch.equal(slot_valid.sum(-1), selection.num_kept)
    assert torch.equal(indices >= 0, slot_valid[:, None, :].expand_as(indices))
    for pruned, full in ((pruned_key, p["key"]), (pruned_value, p["value"])):
        assert pruned.shape == (b, hkv, slots, full.shape[-1]) and pruned.is_contiguous()
        gathered = full.gather(2, indices.clamp(min=0)[..., None].expand(-1, -1, -1, full.shape[-1]))
        assert torch.equal(pruned, torch.where(slot_valid[:, None, :, None], gathered, 0.0))
    # left padding is never kept
    for bi in range(b):
        real = set(torch.nonzero(p["attention_mask"][bi]).flatten().tolist())
        assert set(indices[bi][indices[bi] >= 0].tolist()) <= real


@pytest.mark.parametrize("pads", [(0, 0), (0, 5)])
@pytest.mark.parametrize("hkv, enable_gqa", [(2, False), (2, True), (4, False)])
def test_shared_mask_and_causal_flag_are_bit_identical(pads, hkv, enable_gqa):
    """What the rewrite passes for a bool mask: one shared copy of it and a flag whether it is exactly
    causal (then the op's SDPA runs with is_causal=True, not the mask). Outputs, indices and pruned K/V
    equal the op with the model's own mask, bit for bit; a mask with padding is not causal."""
    p = problem(length=70, hkv=hkv, pads=pads, dim=16)
    config = CSPConfig(budget=0.3, window=4)
    shared = shared_mask_graph(p["attn_mask"])
    assert shared.dtype == torch.bool and shared.is_contiguous() and torch.equal(shared, p["attn_mask"])
    flag = mask_is_causal_graph(shared)
    assert flag.shape == () and bool(flag) == (pads == (0, 0))
    assert bool(mask_is_causal_graph(torch.ones(1, 1, 5, 5, dtype=torch.bool).tril()))
    assert not bool(mask_is_causal_graph(torch.ones(1, 1, 5, 5, dtype=torch.bool)))
    assert not bool(mask_is_causal_graph(torch.ones(1, 1, 5, 5, dtype=torch.bool).tril(-1)))
    reference = run_op(p, dict(enable_gqa=enable_gqa), config)
    for mask_is_causal in (flag, torch.tensor(False), None):
        got = prefill_attention(p["query"], p["key"], p["value"], p["modality"], config, attn_mask=shared,
                                attention_mask_2d=p["attention_mask"], enable_gqa=enable_gqa,
                                mask_is_causal=mask_is_causal)
        for g, r in zip(got, reference):
            assert g.stride() == r.stride() and torch.equal(g, r)


def test_shared_mask_opcheck():
    mask = torch.ones(2, 1, 9, 9, dtype=torch.bool).tril().to(torch.uint8)
    torch.library.opcheck(torch.ops.csp.shared_mask.default, (mask,),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("prob, op_kwargs, config", CASES[:3] + CASES[-1:])
def test_fake_tensor_shapes_and_opcheck(prob, op_kwargs, config):
    p = problem(**prob)
    args = (p["query"], p["key"], p["value"], p["attn_mask"], p["modality"], p["attention_mask"], None,
            op_kwargs.get("is_causal", False), op_kwargs.get("enable_gqa", False))
    real = OP(*args, **config_op_args(config))
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        fake = OP(*fake_args, **config_op_args(config))
    for f, r in zip(fake, real):
        assert f.shape == r.shape and f.dtype == r.dtype and f.stride() == r.stride()
    torch.library.opcheck(OP, args, config_op_args(config),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("length", [1, 5, 24, 35, 40, 63, 70])
@pytest.mark.parametrize("budget", [0.2, 0.5, 0.05, 1.0, 12])
def test_kept_slots_is_the_contract_budget(length, budget):
    config = CSPConfig(budget=budget, window=4)
    assert kept_slots(length, config) == resolve_budget(length, config)[0]
    assert kept_slots(length, config.replace(policy="full")) == length


def test_config_round_trip():
    for config in (CSPConfig(), CSPConfig(budget=17, cross_ratio=0.3, policy="snapkv", pool_kernel=3),
                   CSPConfig(budget=0.05, n=0.0, cross_ratio="population", policy="random", seed=3)):
        assert config_from_op_args(**config_op_args(config)) == config


def test_op_inside_inductor_static_and_dynamic():
    """The op inside torch.compile(backend="inductor"): a static-shape graph, and a dynamic-L graph
    whose P is the symbolic contract budget (one compile serves every prompt length)."""
    config = CSPConfig(budget=0.5, window=3)  # 0.5 * odd L hits round-half-to-even

    def layer(query, key, value, modality, attention_mask_2d):
        q = query * 1.5  # some surrounding compute, fused by Inductor
        out, idx, pk, pv, valid = OP(q, key, value, None, modality, attention_mask_2d, None, True, True,
                                     **config_op_args(config))
        return out.sum(1), idx, pk * 2, pv, valid

    for dynamic, lengths in ((False, (23,)), (True, (23, 17, 30))):
        torch._dynamo.reset()
        counter = CompileCounterWithBackend("inductor")
        fn = torch.compile(layer, backend=counter, fullgraph=True, dynamic=dynamic)
        compiles = []
        for length in lengths:
            p = problem(batch=2, length=length, pads=(0, 4), mask=None)
            args = (p["query"], p["key"], p["value"], p["modality"], p["attention_mask"])
            got = fn(*args)
            compiles.append(counter.frame_count)
            expected = layer(*args)
            assert got[2].shape[2] == kept_slots(length, config)
            for g, e in zip(got, expected):
                assert g.shape == e.shape and g.dtype == e.dtype
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
        assert len(set(compiles)) == 1, f"recompiled for a new prompt length: {compiles}"
        assert any(OP in {n.target for n in gm.graph.nodes} for gm in counter.graphs)

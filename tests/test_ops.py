"""The prefill graph's pieces: ``csp::attention`` (the model's attention + window log-sum-exp),
``prefill_selection`` (traced by Inductor, or eager in ``csp::select_reference``), the shared mask and its causal flag."""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

from csp_compile import CSPConfig, select_kept
from csp_compile.ops import (attention_with_lse, config_from_op_arg, config_to_op_arg, kept_slots,
                             mask_is_causal_graph, shared_mask_graph)
from csp_compile.scoring import resolve_budget
from csp_compile.selection import left_aligned
from csp_compile.templates.prefill_selection import prefill_selection, selection_mask

ATTENTION = torch.ops.csp.attention.default
SELECT_REFERENCE = torch.ops.csp.select_reference.default


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


def expected_attention(p, scale, is_causal, enable_gqa):
    """The model's own SDPA call (repeat_kv, or enable_gqa)."""
    hq, hkv = p["query"].shape[1], p["key"].shape[1]
    if enable_gqa:
        return F.scaled_dot_product_attention(p["query"], p["key"], p["value"], attn_mask=p["attn_mask"],
                                              scale=scale, is_causal=is_causal, enable_gqa=hq != hkv)
    return F.scaled_dot_product_attention(p["query"], repeat_kv(p["key"], hq // hkv), repeat_kv(p["value"], hq // hkv),
                                          attn_mask=p["attn_mask"], scale=scale, is_causal=is_causal)


def window_lse_float64(p, scale, is_causal, rows):
    """log-sum-exp of the last ``rows`` query rows' scores, in float64 from the definition."""
    hq, hkv = p["query"].shape[1], p["key"].shape[1]
    length = p["query"].shape[2]
    scores = p["query"].double() @ repeat_kv(p["key"], hq // hkv).double().transpose(-1, -2) * scale
    mask = p["attn_mask"]
    if mask is None:
        mask = torch.ones(length, length, dtype=torch.bool).tril() if is_causal else torch.ones(length, length, dtype=torch.bool)
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return torch.logsumexp(scores[:, :, length - rows:], dim=-1)


@pytest.mark.parametrize("prob, op_kwargs, config", CASES)
def test_attention_is_the_models_and_its_lse_the_window_rows(prob, op_kwargs, config):
    p = problem(**prob)
    scale = 0.3
    is_causal, enable_gqa = op_kwargs.get("is_causal", False), op_kwargs.get("enable_gqa", False)
    output, lse = attention_with_lse(p["query"], p["key"], p["value"], lse_rows=config.window, attn_mask=p["attn_mask"],
                                     scale=scale, is_causal=is_causal, enable_gqa=enable_gqa)
    assert output.is_contiguous() and torch.equal(output, expected_attention(p, scale, is_causal, enable_gqa))
    rows = min(config.window, p["query"].shape[2])
    assert lse.shape == (*p["query"].shape[:2], rows) and lse.dtype == torch.float32
    expected = window_lse_float64(p, scale, is_causal, rows)
    attends = torch.isfinite(expected)  # a left-padding row attends nothing (never a window row): any value
    assert bool(attends.any())
    torch.testing.assert_close(lse.double()[attends], expected[attends], rtol=1e-5, atol=1e-5)


SELECTIONS = [(case, "graph") for case in CASES] + [(case, "reference") for case in CASES] + [
    (CASES[1], "inductor"), (CASES[4], "inductor")]


@pytest.mark.parametrize("case, carrier", SELECTIONS)
def test_selection_is_select_kept_in_the_cache_layout(case, carrier):
    """The graph's form (given the attention's lse; eager, or compiled by Inductor) and the eager
    ``csp::select_reference`` keep ``select_kept``'s positions, left-aligned in P slots (empty slots
    first, index -1)."""
    prob, op_kwargs, config = case
    p = problem(**prob)
    scale, is_causal = 0.3, op_kwargs.get("is_causal", False)
    if carrier != "reference":
        _, lse = attention_with_lse(p["query"], p["key"], p["value"], lse_rows=config.window, attn_mask=p["attn_mask"],
                                    scale=scale, is_causal=is_causal)

        def select(query, key, lse, mask, modality, padding):
            return prefill_selection(query, key, lse, mask, modality, padding, config=config, scale=scale,
                                     is_causal=is_causal)

        if carrier == "inductor":
            torch._dynamo.reset()
            select = torch.compile(select, fullgraph=True)
        indices, slot_valid = select(p["query"], p["key"], lse, p["attn_mask"], p["modality"], p["attention_mask"])
    else:
        indices, slot_valid = SELECT_REFERENCE(p["query"], p["key"], p["attn_mask"], p["modality"],
                                               p["attention_mask"], scale, is_causal, config_to_op_arg(config), 0, 1)
    select_mask = p["attn_mask"]
    length = p["query"].shape[2]
    if select_mask is None and not is_causal:
        select_mask = torch.ones(1, 1, length, length, dtype=torch.bool)
    selection = select_kept(p["query"], p["key"], p["modality"], config, attention_mask=p["attention_mask"],
                            mask=select_mask, scale=scale)
    slots = kept_slots(length, config)
    expected_indices, expected_valid = left_aligned(selection, slots)
    assert indices.shape == (p["key"].shape[0], p["key"].shape[1], slots) and indices.dtype == torch.int64
    assert torch.equal(indices, expected_indices) and torch.equal(slot_valid, expected_valid)
    assert torch.equal(slot_valid.sum(-1), selection.num_kept)
    for bi in range(indices.shape[0]):  # left padding is never kept
        real = set(torch.nonzero(p["attention_mask"][bi]).flatten().tolist())
        assert set(indices[bi][indices[bi] >= 0].tolist()) <= real


@pytest.mark.parametrize("pads", [(0, 0), (0, 5), (7, 2), (23, 0)])
@pytest.mark.parametrize("hkv, enable_gqa", [(2, False), (2, True), (4, False)])
def test_shared_mask_and_causal_flag_are_bit_identical(pads, hkv, enable_gqa):
    """What the rewrite passes for a bool mask: one shared uint8 copy of it and a flag whether it is causal
    apart from padding keys (then the attention runs with is_causal=True and a row of the padding keys, not
    the mask). Output and lse equal the op with the model's own mask, bit for bit, whatever the flag says."""
    p = problem(length=70, hkv=hkv, pads=pads, dim=16)
    shared = shared_mask_graph(p["attn_mask"])
    assert shared.dtype == torch.uint8 and torch.equal(shared.bool(), p["attn_mask"])
    flag = mask_is_causal_graph(p["attn_mask"])
    assert flag.shape == () and bool(flag)
    reference = attention_with_lse(p["query"], p["key"], p["value"], lse_rows=4, attn_mask=p["attn_mask"],
                                   enable_gqa=enable_gqa)
    for mask_is_causal in (flag, torch.tensor(False), None):
        got = attention_with_lse(p["query"], p["key"], p["value"], lse_rows=4, attn_mask=shared, enable_gqa=enable_gqa,
                                 mask_is_causal=mask_is_causal)
        for g, r in zip(got, reference):
            assert g.stride() == r.stride() and torch.equal(g, r)


def test_causal_flag_is_true_only_for_causal_masks_with_padding_keys():
    causal = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    keys = torch.tensor([False, False, True, True, True, True])
    assert bool(mask_is_causal_graph(causal)) and bool(mask_is_causal_graph(causal & keys))
    assert bool(mask_is_causal_graph(causal & keys.flip(0)))  # right padding
    image_block = causal.clone()
    image_block[..., 1:3, 1:3] = True  # a bidirectional image span (Gemma3)
    unmasked_padding_rows = (causal & keys).clone()
    unmasked_padding_rows[..., :2, :] = True  # fully masked rows unmasked (what some SDPA fixes do)
    sliding = causal & ~torch.ones_like(causal).tril(-3)  # a sliding window of 3
    for mask in (torch.ones_like(causal), causal.tril(-1), image_block, unmasked_padding_rows, sliding):
        assert not bool(mask_is_causal_graph(mask))


@pytest.mark.parametrize("prob, op_kwargs, config", CASES[:3] + CASES[-1:])
def test_fake_tensor_shapes_and_opcheck(prob, op_kwargs, config):
    p = problem(**prob)
    is_causal = op_kwargs.get("is_causal", False)
    calls = [
        (ATTENTION, (p["query"], p["key"], p["value"], p["attn_mask"], None, is_causal,
                     op_kwargs.get("enable_gqa", False), None, config.window, [p["key"]])),
        (SELECT_REFERENCE, (p["query"], p["key"], p["attn_mask"], p["modality"], p["attention_mask"], None, is_causal,
                            config_to_op_arg(config), 0, 1)),
    ]
    for op, args in calls:
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*torch.utils._pytree.tree_map_only(torch.Tensor, mode.from_tensor, args))
        for f, r in zip(fake, real):
            assert f.shape == r.shape and f.dtype == r.dtype and f.stride() == r.stride()
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("length", [1, 5, 24, 35, 40, 63, 70])
@pytest.mark.parametrize("budget", [0.2, 0.5, 0.05, 1.0, 12])
def test_kept_slots_is_the_contract_budget(length, budget):
    config = CSPConfig(budget=budget, window=4)
    assert kept_slots(length, config) == resolve_budget(length, config)[0]
    assert kept_slots(length, config.replace(policy="full")) == length


def test_config_round_trip():
    for config in (CSPConfig(), CSPConfig(budget=17, cross_ratio=0.3, policy="snapkv", pool_kernel=3),
                   CSPConfig(budget=0.05, n=0.0, cross_ratio="population", policy="random", seed=3),
                   CSPConfig(budget=1.0, decode_budget=64, prefill_chunk=8, on_new_turn="append")):
        assert config_from_op_arg(config_to_op_arg(config)) == config
        assert type(config_from_op_arg(config_to_op_arg(config)).budget) is type(config.budget)


@pytest.mark.slow
def test_layer_inside_inductor_static_and_dynamic():
    """Attention + traced selection + gathers inside torch.compile(backend="inductor"): a static-shape
    graph, and a dynamic-L graph whose P is the symbolic contract budget (one compile for every length)."""
    from csp_compile.selection import gather_kept

    config = CSPConfig(budget=0.5, window=3)  # 0.5 * odd L hits round-half-to-even

    def layer(query, key, value, modality, attention_mask_2d):
        q = query * 1.5  # some surrounding compute, fused by Inductor
        out, lse = ATTENTION(q, key, value, None, None, True, True, None, config.window, [])
        idx, valid = prefill_selection(q, key, lse, None, modality, attention_mask_2d, config=config, scale=None,
                                       is_causal=True)
        return out.sum(1), idx, gather_kept(key, idx, valid) * 2, gather_kept(value, idx, valid), valid

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


@pytest.mark.parametrize("enable_gqa, mask", [(False, "bool"), (True, "bool"), (False, None), (False, "additive")])
def test_cpu_attention_takes_the_kernels_lse_for_gqa_too(enable_gqa, mask, monkeypatch):
    """On CPU the log-sum-exp comes from SDPA's flash kernel, also when the model repeated K/V itself
    (the op is handed hkv < hq heads): the O(rows x L) fallback never runs."""
    import csp_compile.ops as ops

    def fallback(*args, **kwargs):
        raise AssertionError("the fallback log-sum-exp ran")

    monkeypatch.setattr(ops, "_rows_lse", fallback)
    p = problem(hq=4, hkv=2, mask=mask)
    output, _ = attention_with_lse(p["query"], p["key"], p["value"], lse_rows=4, attn_mask=p["attn_mask"],
                                   is_causal=mask is None, enable_gqa=enable_gqa)
    assert torch.equal(output, expected_attention(p, None, mask is None, enable_gqa))


@pytest.mark.parametrize("prob, op_kwargs, config", CASES)
def test_fallback_lse_where_sdpa_runs_no_flash_kernel(prob, op_kwargs, config, monkeypatch):
    """Where SDPA would not run its flash kernel (CUDA, other dtypes), the op calls SDPA for the output
    and computes the window rows' log-sum-exp itself: the same output and the float64 log-sum-exp."""
    import csp_compile.ops as ops

    monkeypatch.setattr(ops, "sdpa_picks_flash", lambda *args, **kwargs: False)
    p = problem(**prob)
    scale = 0.3
    is_causal, enable_gqa = op_kwargs.get("is_causal", False), op_kwargs.get("enable_gqa", False)
    output, lse = attention_with_lse(p["query"], p["key"], p["value"], lse_rows=config.window, attn_mask=p["attn_mask"],
                                     scale=scale, is_causal=is_causal, enable_gqa=enable_gqa)
    assert torch.equal(output, expected_attention(p, scale, is_causal, enable_gqa))
    expected = window_lse_float64(p, scale, is_causal, min(config.window, p["query"].shape[2]))
    attends = torch.isfinite(expected)
    torch.testing.assert_close(lse.double()[attends], expected[attends], rtol=1e-5, atol=1e-5)


def test_selection_mask_reads_the_shared_uint8_mask_as_bool():
    """Eager (``csp::select_reference``) it is a view of the bytes, no L x L copy; traced, ``!= 0``."""
    mask = problem(length=12)["attn_mask"]
    shared = shared_mask_graph(mask)
    eager = selection_mask(shared, False, 12, shared.device)
    assert eager.dtype == torch.bool and torch.equal(eager, mask) and eager.data_ptr() == shared.data_ptr()
    torch._dynamo.reset()
    traced = torch.compile(lambda m: selection_mask(m, False, 12, m.device)[..., -3:, :].clone(), fullgraph=True)
    assert torch.equal(traced(shared), mask[..., -3:, :])

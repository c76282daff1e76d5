import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from bruteforce import brute_force_csp, causal, contract_budget, from_tensor_mask
from cases import Case, all_policies, cases
from csp_compile import CSPConfig, select_kept
from csp_compile.policies import csp_scores
from csp_compile.scoring import gqa_mean
from csp_compile.selection import make_attention_inputs


def run(case: Case, **overrides):
    config = case.config.replace(**overrides) if overrides else case.config
    return select_kept(case.query, case.key, case.modality, config, attention_mask=case.attention_mask)


def kept_rows(selection, b):
    return [[int(i) for i in row if i >= 0] for row in selection.indices[b]]


@given(cases(policies=all_policies))
def test_exact_count_distinct_sorted_window_kept_no_padding(case):
    selection = run(case)
    for b, length in enumerate(case.lengths):
        expected_kept, window = contract_budget(length, case.config.budget, case.config.window)
        if case.config.policy == "full":
            expected_kept, window = length, 0
        real = [i for i in range(case.key.shape[2]) if case.attention_mask[b, i]]
        assert int(selection.num_kept[b]) == expected_kept
        for row in kept_rows(selection, b):
            assert len(row) == expected_kept
            assert row == sorted(set(row)), "picks must be distinct and ascending"
            assert set(row) <= set(real), "padding must never be kept"
            assert set(real[len(real) - window:]) <= set(row), "the window must be kept"
        assert torch.equal(selection.keep_mask[b].sum(-1), torch.full((case.key.shape[1],), expected_kept))


@given(cases(policies=all_policies))
def test_budget_at_least_length_keeps_everything(case):
    selection = run(case, budget=case.key.shape[2])
    for b in range(case.query.shape[0]):
        assert torch.equal(selection.keep_mask[b], case.attention_mask[b].bool().expand_as(selection.keep_mask[b]))


@given(cases(), st.sampled_from(["auto", "population", "mass", 0.0, 0.3, 1.0]))
def test_agrees_with_brute_force_float64(case, cross_ratio):
    config = case.config.replace(cross_ratio=cross_ratio)
    selection = select_kept(case.query, case.key, case.modality, config, attention_mask=case.attention_mask)
    for b in range(case.query.shape[0]):
        kept, k_cross = brute_force_csp(
            case.query[b], case.key[b], case.modality[b].tolist(), case.attention_mask[b].tolist(), causal,
            budget=config.budget, window=config.window, cross_ratio=config.cross_ratio, n=config.n,
            scale=1 / math.sqrt(case.query.shape[-1]),
        )
        assert kept_rows(selection, b) == kept
        assert selection.num_secondary[b].tolist() == k_cross


def image_block_mask(modality: torch.Tensor, additive: bool) -> torch.Tensor:
    """Gemma3-style mask: causal, plus image tokens of one contiguous block see each other."""
    length = modality.shape[-1]
    causal_mask = torch.ones(length, length, dtype=torch.bool).tril()
    image = modality == 1
    block_id = torch.cumsum((image & ~torch.nn.functional.pad(image, (1, 0))[..., :-1]).long(), -1)
    same_block = image[..., :, None] & image[..., None, :] & (block_id[..., :, None] == block_id[..., None, :])
    mask = (causal_mask | same_block)[:, None]
    if additive:
        return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, torch.finfo(torch.float64).min)
    return mask


@pytest.mark.parametrize("additive", [False, True])
@given(case=cases(max_batch=1))
def test_model_mask_bidirectional_image_block(case, additive):
    mask = image_block_mask(case.modality, additive)
    selection = select_kept(case.query, case.key, case.modality, case.config, attention_mask=case.attention_mask, mask=mask)
    kept, _ = brute_force_csp(
        case.query[0], case.key[0], case.modality[0].tolist(), case.attention_mask[0].tolist(),
        from_tensor_mask(mask, 0), budget=case.config.budget, window=case.config.window,
        cross_ratio=case.config.cross_ratio, n=case.config.n, scale=1 / math.sqrt(case.query.shape[-1]),
    )
    assert kept_rows(selection, 0) == kept


@given(cases())
def test_bool_and_additive_masks_agree(case):
    causal_bool = torch.ones(case.key.shape[2], case.key.shape[2], dtype=torch.bool).tril()[None, None]
    additive = torch.zeros(causal_bool.shape, dtype=torch.float64).masked_fill(~causal_bool, float("-inf"))
    a = select_kept(case.query, case.key, case.modality, case.config, attention_mask=case.attention_mask, mask=causal_bool)
    c = select_kept(case.query, case.key, case.modality, case.config, attention_mask=case.attention_mask, mask=additive)
    d = run(case)
    assert torch.equal(a.indices, c.indices) and torch.equal(a.indices, d.indices)


@given(cases(), st.sampled_from(["auto", "population", "mass", 0.5, 1.0]))
def test_text_only_uses_self_scores_only(case, cross_ratio):
    text = torch.zeros_like(case.modality)
    config = case.config.replace(cross_ratio=cross_ratio)
    selection = select_kept(case.query, case.key, text, config, attention_mask=case.attention_mask)
    assert int(selection.num_secondary.sum()) == 0
    self_only = select_kept(case.query, case.key, text, config.replace(cross_ratio=0.0), attention_mask=case.attention_mask)
    assert torch.equal(selection.indices, self_only.indices)


@given(cases(), st.sampled_from(["auto", "population", "mass", 0.25, 0.7]))
def test_cross_ratio_rules_split_as_defined(case, rule):
    """K_cross = round(K * ratio) with the ratio recomputed here from the scores' definitions."""
    config = case.config.replace(cross_ratio=rule)
    inputs = make_attention_inputs(case.query, case.key, case.modality, config, attention_mask=case.attention_mask)
    scores = csp_scores(inputs, config)
    selection = select_kept(case.query, case.key, case.modality, config, attention_mask=case.attention_mask)
    for b, length in enumerate(case.lengths):
        kept, window = contract_budget(length, config.budget, config.window)
        k_total = kept - window
        real = torch.nonzero(case.attention_mask[b]).flatten()
        window_pos, candidates = real[len(real) - window:], real[: len(real) - window]
        qm, km = case.modality[b, window_pos], case.modality[b, candidates]
        pairs = len(window_pos) * len(candidates)
        population = float((qm[:, None] != km[None, :]).sum()) / pairs if pairs else 0.0
        for h in range(case.key.shape[1]):
            cross = float(scores.secondary[b, h, candidates].sum())
            total = cross + float(scores.primary[b, h, candidates].sum())
            mass = cross / total if total > 0 else 0.0
            ratio = {"population": population, "mass": mass, "auto": (population + mass) / 2}.get(rule, rule)
            expected = round(k_total * ratio) if population > 0 else 0
            assert int(selection.num_secondary[b, h]) == expected


@given(cases(), st.data())
def test_permuting_kv_heads_permutes_results(case, data):
    kv_heads = case.key.shape[1]
    group = case.query.shape[1] // kv_heads
    perm = torch.tensor(data.draw(st.permutations(range(kv_heads))))
    query_perm = (perm[:, None] * group + torch.arange(group)[None, :]).flatten()
    base = run(case)
    permuted = select_kept(
        case.query[:, query_perm], case.key[:, perm], case.modality, case.config, attention_mask=case.attention_mask
    )
    assert torch.equal(permuted.indices, base.indices[:, perm])


@given(cases())
def test_heads_are_independent(case):
    """Each KV head's selection equals the selection of that head's problem on its own."""
    base = run(case)
    group = case.query.shape[1] // case.key.shape[1]
    for h in range(case.key.shape[1]):
        single = select_kept(
            case.query[:, h * group:(h + 1) * group], case.key[:, h:h + 1], case.modality, case.config,
            attention_mask=case.attention_mask,
        )
        assert torch.equal(single.indices[:, 0], base.indices[:, h])


@given(cases())
def test_gqa_scores_are_the_mean_of_mha_scores_with_repeated_keys(case):
    group = case.query.shape[1] // case.key.shape[1]
    gqa_inputs = make_attention_inputs(case.query, case.key, case.modality, case.config, attention_mask=case.attention_mask)
    mha_inputs = make_attention_inputs(
        case.query, case.key.repeat_interleave(group, dim=1), case.modality, case.config, attention_mask=case.attention_mask
    )
    gqa, mha = csp_scores(gqa_inputs, case.config), csp_scores(mha_inputs, case.config)
    torch.testing.assert_close(gqa.primary, gqa_mean(mha.primary, case.key.shape[1]))
    torch.testing.assert_close(gqa.secondary, gqa_mean(mha.secondary, case.key.shape[1]))


@given(cases(dtype=torch.float32))
def test_fully_masked_window_rows_give_finite_scores(case):
    length = case.key.shape[2]
    mask = torch.ones(1, 1, length, length, dtype=torch.bool).tril()
    mask[..., -1, :] = False  # the last query sees nothing
    inputs = make_attention_inputs(case.query, case.key, case.modality, case.config, attention_mask=case.attention_mask, mask=mask)
    scores = csp_scores(inputs, case.config)
    assert torch.isfinite(scores.primary).all() and torch.isfinite(scores.secondary).all()
    selection = select_kept(case.query, case.key, case.modality, case.config, attention_mask=case.attention_mask, mask=mask)
    assert (selection.keep_mask.sum(-1) == selection.num_kept[:, None]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_scored_in_float32(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 40, 8, generator=gen), torch.randn(1, 2, 40, 8, generator=gen)
    modality = (torch.arange(40) // 7 % 2)[None]
    config = CSPConfig(budget=0.3, window=6)
    inputs = make_attention_inputs(q.to(dtype), k.to(dtype), modality, config)
    assert csp_scores(inputs, config).primary.dtype == torch.float32
    half = select_kept(q.to(dtype), k.to(dtype), modality, config)
    full = select_kept(q.to(dtype).float(), k.to(dtype).float(), modality, config)
    assert torch.equal(half.indices, full.indices)


def test_invalid_arguments_name_the_argument():
    q, k, m = torch.randn(1, 4, 10, 8), torch.randn(1, 2, 10, 8), torch.zeros(1, 10, dtype=torch.long)
    with pytest.raises(ValueError, match="query heads"):
        select_kept(q, torch.randn(1, 3, 10, 8), m)
    with pytest.raises(ValueError, match="key shape"):
        select_kept(q, torch.randn(1, 2, 9, 8), m)
    with pytest.raises(ValueError, match="modality"):
        select_kept(q, k, m.float())
    with pytest.raises(ValueError, match="attention_mask"):
        select_kept(q, k, m, attention_mask=torch.ones(1, 9))
    with pytest.raises(ValueError, match="pad on the left"):
        select_kept(q, k, m, CSPConfig(window=4), attention_mask=torch.tensor([[1] * 8 + [0] * 2]))
    with pytest.raises(ValueError, match="mask must"):
        select_kept(q, k, m, mask=torch.ones(1, 1, 10, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must"):
        select_kept(q, k, m, mask=torch.ones(1, 1, 10, 10, dtype=torch.long))


def test_inputs_are_not_modified():
    q, k = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8)
    m = (torch.arange(12) % 2).expand(2, -1).clone()
    am = torch.ones(2, 12, dtype=torch.long)
    am[1, :3] = 0
    before = [t.clone() for t in (q, k, m, am)]
    for policy in ("csp", "h2o", "snapkv"):
        select_kept(q, k, m, CSPConfig(budget=0.5, window=3, policy=policy), attention_mask=am)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, m, am)))


@given(st.integers(1, 5000), st.one_of(st.floats(0.01, 1.0), st.integers(1, 600)), st.integers(1, 64))
def test_budgets_as_tensor_ops_equal_resolve_budget(length, budget, window):
    from csp_compile.scoring import resolve_budget
    from csp_compile.selection import budgets_for

    config = CSPConfig(budget=budget, window=window)
    kept, win = budgets_for(torch.tensor([length, max(1, length // 2)]), config)
    assert (int(kept[0]), int(win[0])) == resolve_budget(length, config)
    assert (int(kept[1]), int(win[1])) == resolve_budget(max(1, length // 2), config)


@given(cases(policies=all_policies))
def test_window_scores_from_a_given_lse_select_the_same(case):
    """Scoring the window from its rows' log-sum-exp (the attention kernel's, in the compiled graph) and
    over ``rows`` >= every W trailing rows selects what ``select_kept`` selects."""
    import dataclasses

    from csp_compile.scoring import masked_scores
    from csp_compile.selection import select_from_scores

    inputs = make_attention_inputs(case.query, case.key, case.modality, case.config, attention_mask=case.attention_mask)
    rows = min(case.config.window + 2, inputs.length)
    lse = torch.logsumexp(masked_scores(inputs, slice(inputs.length - rows, inputs.length)), dim=-1)
    traced_form = dataclasses.replace(inputs, rows=rows, window_lse=lse)
    expected, got = select_from_scores(inputs, case.config), select_from_scores(traced_form, case.config)
    assert torch.equal(got.keep_mask, expected.keep_mask)


_RANK_VALUES = [0.0, -0.0, 1.0, 0.5, 2.0**-140, -2.0**-140, -1.0, float("inf"), float("-inf"), 3.0e38]


def _stable_ranks(score: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """rank_desc's definition, spelled out: sort by (eligible, score, -position), descending."""
    from csp_compile.scoring import _rank_desc_two_sorts

    return _rank_desc_two_sorts(score.to(torch.float64), eligible)


@given(st.integers(1, 3), st.integers(1, 40), st.data())
def test_rank_desc_single_key_topk_equals_two_stable_sorts(rows, length, data):
    """The float32 fast path (one int64 key, top-k up to ``limit``) ranks as the two stable sorts: ties
    (including -0.0 vs +0.0) to the earlier position, eligible first; beyond ``limit`` only ">= limit"."""
    from csp_compile.scoring import rank_desc

    values = data.draw(st.lists(st.sampled_from(_RANK_VALUES), min_size=rows * length, max_size=rows * length))
    score = torch.tensor(values, dtype=torch.float32).view(rows, length)
    eligible = torch.tensor(data.draw(st.lists(st.booleans(), min_size=rows * length, max_size=rows * length))).view(rows, length)
    limit = data.draw(st.one_of(st.none(), st.integers(0, length + 3)))
    expected = _stable_ranks(score, eligible)
    ranks = rank_desc(score, eligible, limit)
    exact = expected < (length if limit is None else limit)
    assert torch.equal(ranks[exact], expected[exact])
    assert bool((ranks[~exact] >= limit).all()) if limit is not None else bool(exact.all())


def test_rank_desc_compiled_by_inductor_equals_eager():
    """The key's float-to-int bitcast and shifts survive Inductor's codegen (the prefill graph's path)."""
    from csp_compile.scoring import rank_desc

    gen = torch.Generator().manual_seed(0)
    score = torch.randint(0, 4, (2, 3, 64), generator=gen).float() / 4
    score[0, 0, :8] = -0.0
    eligible = torch.rand(2, 3, 64, generator=gen) > 0.3
    compiled = torch.compile(rank_desc, backend="inductor", fullgraph=True)
    assert torch.equal(compiled(score, eligible, 20) < 20, rank_desc(score, eligible, 20) < 20)
    expected = _stable_ranks(score, eligible)
    assert torch.equal(compiled(score, eligible, 20)[expected < 20], expected[expected < 20])


@given(st.integers(1, 30), st.data())
def test_kept_layout_is_the_ascending_kept_positions_right_aligned(length, data):
    from csp_compile.selection import kept_layout

    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=2 * length, max_size=2 * length))).view(1, 2, length)
    num_kept = keep.sum(-1)
    slots = data.draw(st.integers(int(num_kept.max()), length))
    indices, valid = kept_layout(keep, num_kept, slots)
    for head in range(2):
        kept = torch.nonzero(keep[0, head]).flatten()
        empty = slots - kept.numel()
        assert indices[0, head, empty:].tolist() == kept.tolist()
        assert bool((indices[0, head, :empty] == -1).all())
        assert valid[0, head].tolist() == [False] * empty + [True] * kept.numel()


@pytest.mark.parametrize("policy", ["csp", "snapkv"])
def test_budgets_above_the_configured_slots_are_ranked_in_full(policy):
    """Decode-time reselection passes budgets of the tokens seen, which can exceed the configured B of
    the (shorter) slot axis: those picks must still be made, not cut at that B."""
    from csp_compile.selection import select_from_scores

    gen = torch.Generator().manual_seed(3)
    length = 40
    q, k = torch.randn(1, 2, length, 8, generator=gen), torch.randn(1, 2, length, 8, generator=gen)
    modality = torch.zeros(1, length, dtype=torch.int64)
    modality[:, 5:20] = 1
    config = CSPConfig(budget=0.2, window=4, policy=policy)
    inputs = make_attention_inputs(q, k, modality, config)
    for kept in (length, 30):
        selection = select_from_scores(inputs, config, budgets=torch.tensor([kept]))
        assert selection.keep_mask.sum(-1).tolist() == [[kept, kept]]

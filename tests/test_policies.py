import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

from bruteforce import contract_budget
from cases import cases
from csp_compile import CSPConfig, PolicyScores, available_policies, get_policy, register_policy, select_kept
from csp_compile import policies as policies_module
from csp_compile.scoring import accumulated_attention
from csp_compile.selection import make_attention_inputs

EXPECTED = {"csp", "snapkv", "h2o", "streaming", "lookm_text_prior", "random", "full"}


def kept(selection, b=0, h=0):
    return [int(i) for i in selection.indices[b, h] if i >= 0]


def problem(length=30, seed=0, q_heads=4, kv_heads=2, dim=8):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, q_heads, length, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, kv_heads, length, dim, generator=gen, dtype=torch.float64)
    modality = torch.zeros(1, length, dtype=torch.long)
    modality[0, 4:16] = 1
    return q, k, modality


def test_registry_has_every_policy():
    assert EXPECTED <= set(available_policies())
    for name in EXPECTED:
        assert get_policy(name).name == name and get_policy(name).description


def test_unknown_policy_lists_known_ones():
    with pytest.raises(ValueError) as excinfo:
        get_policy("snap-kv")
    assert all(name in str(excinfo.value) for name in EXPECTED)


def test_a_new_policy_is_one_small_entry():
    @register_policy("test_last_tokens", "keeps the latest candidates")
    def latest(inputs, config):
        return PolicyScores(torch.arange(inputs.length, dtype=torch.float64).expand(*inputs.valid.shape[:1], inputs.kv_heads, -1))

    try:
        q, k, m = problem()
        selection = select_kept(q, k, m, CSPConfig(budget=10, window=4, policy="test_last_tokens"))
        assert kept(selection) == list(range(20, 30))
        with pytest.raises(ValueError, match="already registered"):
            register_policy("test_last_tokens", "again")(latest)
    finally:
        policies_module._POLICIES.pop("test_last_tokens")


def test_full_keeps_every_real_token():
    q, k, m = problem(length=12)
    am = torch.ones(1, 12)
    am[0, :3] = 0
    selection = select_kept(q, k, m, CSPConfig(budget=0.1, policy="full"), attention_mask=am)
    assert kept(selection) == list(range(3, 12)) and int(selection.num_kept[0]) == 9


@pytest.mark.parametrize(("sinks", "budget"), [(4, 12), (0, 12), (10, 8), (4, 6)])
def test_streaming_keeps_sinks_then_most_recent(sinks, budget):
    q, k, m = problem(length=30)
    am = torch.ones(1, 30)
    am[0, :2] = 0  # sinks count real tokens, not padding
    selection = select_kept(q, k, m, CSPConfig(budget=budget, window=4, policy="streaming", sink_tokens=sinks), attention_mask=am)
    k_total = budget - 4
    n_sinks = min(sinks, k_total)
    expected = list(range(2, 2 + n_sinks)) + list(range(26 - (k_total - n_sinks), 26)) + list(range(26, 30))
    assert kept(selection) == sorted(expected)


@pytest.mark.parametrize("budget", [6, 10, 20])
def test_lookm_keeps_text_first_then_by_accumulated_attention(budget):
    q, k, m = problem(length=30)
    config = CSPConfig(budget=budget, window=4, policy="lookm_text_prior")
    selection = select_kept(q, k, m, config)
    text_candidates = [i for i in range(26) if int(m[0, i]) == 0]
    k_total = budget - 4
    inputs = make_attention_inputs(q, k, m, config)
    score = accumulated_attention(inputs)
    for h in range(2):
        picks = [i for i in kept(selection, 0, h) if i < 26]
        if k_total <= len(text_candidates):
            expected = sorted(text_candidates, key=lambda i: -float(score[0, h, i]))[:k_total]
        else:
            images = sorted((i for i in range(26) if i not in text_candidates), key=lambda i: -float(score[0, h, i]))
            expected = text_candidates + images[: k_total - len(text_candidates)]
        assert picks == sorted(expected)


def test_h2o_is_the_column_sum_of_the_full_softmax_and_chunk_invariant():
    q, k, m = problem(length=23)
    am = torch.ones(1, 23)
    am[0, :2] = 0
    inputs = make_attention_inputs(q, k, m, CSPConfig(), attention_mask=am)
    scores = (q @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 8**0.5
    allowed = torch.ones(23, 23, dtype=torch.bool).tril() & am.bool()[0][None, :] & am.bool()[0][:, None]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)
    expected = probs.sum(2).reshape(1, 2, 2, 23).mean(2)
    for chunk in (1, 5, 23, 256):
        torch.testing.assert_close(accumulated_attention(inputs, chunk=chunk), expected)


@pytest.mark.parametrize("kernel", [1, 3, 7])
def test_snapkv_is_top_k_of_pooled_window_attention(kernel):
    q, k, m = problem(length=40)
    window, budget = 5, 15
    selection = select_kept(q, k, m, CSPConfig(budget=budget, window=window, policy="snapkv", pool_kernel=kernel))
    scores = (q[:, :, -window:] @ k.repeat_interleave(2, 1).transpose(-1, -2)) / 8**0.5
    causal = torch.ones(40, 40, dtype=torch.bool).tril()[-window:]
    summed = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1).sum(2)[..., : 40 - window]
    pooled = F.avg_pool1d(summed, kernel, stride=1, padding=kernel // 2).reshape(1, 2, 2, -1).mean(2)
    for h in range(2):
        top = torch.topk(pooled[0, h], budget - window).indices.sort().values.tolist()
        assert kept(selection, 0, h) == top + list(range(40 - window, 40))


def test_random_is_seeded():
    q, k, m = problem(length=200)
    pick = lambda seed: select_kept(q, k, m, CSPConfig(budget=0.2, policy="random", seed=seed)).indices
    assert torch.equal(pick(3), pick(3))
    assert not torch.equal(pick(3), pick(4))


def test_csp_differs_from_a_single_softmax_ranking():
    """With image and text competing, CSP's split must reserve cross picks, unlike SnapKV-style
    ranking by total attention (pool 1), on a case built so that the image gets no total-score picks."""
    q, k, m = problem(length=40, seed=1)
    k[:, :, 4:16] *= 0.0  # image keys: flat, low attention
    config = CSPConfig(budget=16, window=4, cross_ratio=0.5, n=0.0)
    csp = select_kept(q, k, m, config)
    assert (csp.num_secondary == 6).all()
    assert any(4 <= i < 16 for i in kept(csp))


@given(cases(policies=tuple(EXPECTED)))
def test_policies_are_deterministic(case):
    first = select_kept(case.query, case.key, case.modality, case.config, attention_mask=case.attention_mask)
    second = select_kept(case.query, case.key, case.modality, case.config, attention_mask=case.attention_mask)
    assert torch.equal(first.indices, second.indices)
    for b, length in enumerate(case.attention_mask.sum(-1).tolist()):
        expected = length if case.config.policy == "full" else contract_budget(length, case.config.budget, case.config.window)[0]
        assert int(first.num_kept[b]) == expected


def test_csp_giveback_returns_the_unfillable_cross_quota_to_the_self_ranking():
    """Window all text, 4 image candidates, K_cross = 8: CSP takes its last 4 cross picks at score 0 (the
    earliest positions); csp_giveback takes the 4 scored ones and gives the rest to the self ranking."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 40, 16, generator=gen), torch.randn(1, 2, 40, 16, generator=gen)
    modality = torch.zeros(1, 40, dtype=torch.int64)
    modality[0, 5:9] = 1
    config = CSPConfig(budget=0.5, window=4, cross_ratio=0.5)
    csp = select_kept(q, k, modality, config)
    giveback = select_kept(q, k, modality, config.replace(policy="csp_giveback"))
    assert csp.num_secondary.tolist() == [[8, 8]] and giveback.num_secondary.tolist() == [[4, 4]]
    inputs = make_attention_inputs(q, k, modality, config)
    self_scores = get_policy("csp").score(inputs, config).primary
    for h in range(2):
        kept = set(giveback.indices[0, h].tolist())
        assert {5, 6, 7, 8} <= kept and {36, 37, 38, 39} <= kept
        text = [i for i in range(36) if not 5 <= i < 9]
        best_text = sorted(text, key=lambda i: (-float(self_scores[0, h, i]), i))[:12]
        assert kept == set(best_text) | {5, 6, 7, 8, 36, 37, 38, 39}

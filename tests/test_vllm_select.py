"""The vLLM plugin's selection (``csp_compile.vllm.select``, no vLLM needed): ``select_kept``'s kept
positions for a request at a kept count, eagerly and compiled once for every length and count."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cases import all_policies, cases
from csp_compile import CSPConfig, select_kept
from csp_compile.vllm.select import kept_indices, kept_indices_eager


def reference(query, key, modality, kept, config, scale):
    """select_kept on one request (hq, L, D) / (hkv, L, D) at budget = kept tokens."""
    return select_kept(query[None], key[None], modality[None], config.replace(budget=kept), scale=scale).indices[0]


@given(cases(policies=all_policies, dtype=torch.float32, max_batch=1), st.data())
def test_eager_equals_select_kept_at_every_kept_count(case, data):
    query, key, modality = case.query[0], case.key[0], case.modality[0]
    length = key.shape[-2]
    kept = length if case.config.policy == "full" else data.draw(st.integers(1, length))
    scale = 1 / math.sqrt(key.shape[-1])
    got = kept_indices_eager(query, key, modality, kept, config=case.config, scale=scale)
    assert torch.equal(got, reference(query, key, modality, kept, case.config, scale))


def _request(length, seed, heads=4, kv_heads=2, dim=16):
    """Q/K as vLLM hands them: views into one (L, (hq + 2 hkv) D) qkv buffer, permuted to (heads, L, D)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(length, (heads + 2 * kv_heads) * dim, generator=gen)
    query = qkv[:, : heads * dim].view(length, heads, dim).permute(1, 0, 2)
    key = qkv[:, heads * dim:(heads + kv_heads) * dim].view(length, kv_heads, dim).permute(1, 0, 2)
    modality = torch.zeros(length, dtype=torch.int64)
    modality[length // 4: length // 2] = 1
    return query, key, modality


@pytest.mark.slow  # compiles (~15 s each on 2 cores)
@pytest.mark.parametrize("policy", ["csp", "snapkv"])
def test_compiled_once_for_every_length_and_kept_count(policy):
    config = CSPConfig(budget=0.2, window=4, policy=policy)
    scale = 0.25
    query, key, modality = _request(96, seed=0)
    assert torch.equal(kept_indices(query, key, modality, 30, config=config, scale=scale),
                       reference(query, key, modality, 30, config, scale))  # compiles
    with torch.compiler.set_stance("fail_on_recompile"):
        # kept < L, as in the plugin (a compaction frees at least one block); kept == L may add a guard
        for length, kept, seed in [(200, 45, 1), (77, 20, 2), (513, 120, 3), (200, 199, 4), (64, 5, 5)]:
            query, key, modality = _request(length, seed)
            got = kept_indices(query, key, modality, kept, config=config.replace(budget=0.5), scale=scale)
            assert torch.equal(got, reference(query, key, modality, kept, config, scale)), (length, kept)
    query, key, modality = _request(50, seed=6)
    assert torch.equal(kept_indices(query, key, modality, 50, config=config, scale=scale),
                       reference(query, key, modality, 50, config, scale))  # kept == L: right, if recompiled


@settings(max_examples=10, deadline=None)
@given(st.sampled_from(["h2o", "random", "lookm_text_prior"]), st.integers(2, 40), st.data())
def test_untraceable_policies_run_eagerly(policy, length, data):
    config = CSPConfig(budget=0.5, window=2, policy=policy)
    query, key, modality = _request(length, seed=length)
    kept = data.draw(st.integers(1, length))
    assert torch.equal(kept_indices(query, key, modality, kept, config=config, scale=0.25),
                       reference(query, key, modality, kept, config, 0.25))


@pytest.mark.parametrize("kept", [0, -1, 97])
def test_kept_outside_one_to_length_is_refused(kept):
    query, key, modality = _request(96, seed=0)
    with pytest.raises(ValueError, match=rf"^kept={kept}: allowed 1 \.\. 96"):
        kept_indices(query, key, modality, kept, config=CSPConfig(), scale=0.25)
    with pytest.raises(ValueError, match=r"^kept=95: the 'full' policy keeps all 96 tokens"):
        kept_indices(query, key, modality, 95, config=CSPConfig(policy="full"), scale=0.25)

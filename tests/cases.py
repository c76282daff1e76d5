"""Hypothesis strategies for random selection problems (small shapes, batch with left padding)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from csp_compile import CSPConfig, available_policies


@dataclass
class Case:
    query: torch.Tensor
    key: torch.Tensor
    modality: torch.Tensor
    attention_mask: torch.Tensor
    config: CSPConfig

    @property
    def lengths(self) -> list[int]:
        return [int(v) for v in self.attention_mask.sum(-1)]


budgets = st.one_of(
    st.floats(min_value=0.01, max_value=1.0),
    st.integers(min_value=1, max_value=40),
)
cross_ratios = st.one_of(st.sampled_from(["auto", "population", "mass"]), st.floats(min_value=0, max_value=1))


@st.composite
def cases(draw, policies=("csp",), max_len: int = 24, dtype=torch.float64, max_batch: int = 3) -> Case:
    batch = draw(st.integers(1, max_batch))
    length = draw(st.integers(1, max_len))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.integers(1, 3))
    dim = draw(st.sampled_from([2, 4]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * group, length, dim, generator=gen, dtype=dtype) * 2
    key = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=dtype) * 2
    num_modalities = draw(st.integers(1, 3))
    # contiguous blocks, like image spans inside text
    block = draw(st.integers(1, 6))
    modality = (torch.arange(length) // block % num_modalities).expand(batch, -1).clone()
    if draw(st.booleans()):
        modality = torch.randint(0, num_modalities, (batch, length), generator=gen)
    attention_mask = torch.ones(batch, length, dtype=torch.int64)
    for b in range(1, batch):
        pad = draw(st.integers(0, length - 1))
        attention_mask[b, :pad] = 0
    config = CSPConfig(
        budget=draw(budgets),
        window=draw(st.integers(1, 8)),
        cross_ratio=draw(cross_ratios),
        n=draw(st.sampled_from([0.0, 0.5, 1.0, 4.0])),
        policy=draw(st.sampled_from(policies)),
        pool_kernel=draw(st.sampled_from([1, 3, 7])),
        sink_tokens=draw(st.integers(0, 5)),
        seed=draw(st.integers(0, 5)),
    )
    return Case(query, key, modality, attention_mask, config)


all_policies = available_policies()

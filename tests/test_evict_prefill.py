"""The prefill rewrite on a toy graph: attention over an empty-cache cat becomes the op, the cache
outputs become the pruned K/V, and nothing else in the graph changes."""

import torch
import torch.nn.functional as F
from torch import nn

from csp_compile import CSPConfig
from csp_compile.backend import CSPBackend, CSPState


class Attention(nn.Module):
    def forward(self, query, key, value, cache_key, cache_value):
        key = torch.cat([cache_key, key], dim=-2)
        value = torch.cat([cache_value, value], dim=-2)
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.5), key, value


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attention()


class Toy(nn.Module):
    """One 'layer' whose cache is a cat with an empty tensor, beside an in-place update whose
    result is unused as a node (like Llama4's MoE ``out.add_(...)``)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Layer()])

    def forward(self, query, key, value, x):
        empty = torch.tensor([])
        out, cached_key, cached_value = self.layers[0].self_attn(query, key, value, empty, empty)
        y = x.clone()
        y.add_(1.0)
        return out, cached_key, cached_value, y


def test_rewrite_keeps_in_place_updates_and_prunes_cache_outputs():
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 20, 8, generator=gen) for _ in range(3))
    x = torch.zeros(3)
    state = CSPState(config=CSPConfig(budget=0.25, window=2))
    compiled = torch.compile(Toy(), backend=CSPBackend(state))
    out, cached_key, cached_value, y = compiled(query, key, value, x)
    expected = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.5)
    torch.testing.assert_close(out, expected)
    assert torch.equal(y, torch.ones(3)), "the in-place add must survive the rewrite"
    assert cached_key.shape[-2] == 5 and state.physical_length == 5 and state.compiled_graphs["prefill"] == 1
    kept = state.layers[0].kept[0, 0]
    assert torch.equal(cached_key[0, 0], key[0, 0, kept]) and torch.equal(cached_value[0, 1], value[0, 1, state.layers[0].kept[0, 1]])

"""The prefill rewrite on a toy graph: attention over an empty-cache cat becomes the op, the cache
outputs become the pruned K/V, and nothing else in the graph changes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from csp_compile import CSPConfig
from csp_compile.backend import CSPBackend, CSPState

pytestmark = pytest.mark.slow  # compiles whole models: `pytest -m "not slow"` skips this module


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


class MaskedAttention(nn.Module):
    def forward(self, query, key, value, cache_key, cache_value, mask):
        key = torch.cat([cache_key, key], dim=-2)
        value = torch.cat([cache_value, value], dim=-2)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.5), key, value


class MaskedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = MaskedAttention()


class TwoMaskedLayers(nn.Module):
    """Two layers reading one bool mask built in the graph (causal & padding, as transformers' sdpa_mask)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([MaskedLayer(), MaskedLayer()])

    def forward(self, query, key, value, attention_mask):
        length = query.shape[-2]
        positions = torch.arange(length)
        mask = (positions[None, :] <= positions[:, None])[None, None] & attention_mask.bool()[:, None, None, :]
        empty = torch.tensor([])
        out, k0, v0 = self.layers[0].self_attn(query, key, value, empty, empty, mask)
        out, k1, v1 = self.layers[1].self_attn(out, key, value, empty, empty, mask)
        return out, k0, v0, k1, v1


def test_bool_mask_is_shared_and_checked_for_causality_once(monkeypatch):
    """A bool mask read by several sites: the rewrite inserts one shared copy and one causality flag
    (the op then runs SDPA with is_causal=True when the mask is exactly causal); results equal eager SDPA
    with the mask, with and without padding."""
    from csp_compile.passes import evict_prefill

    captured = []
    original = evict_prefill.rewrite_prefill

    def spy(gm, *args, **kwargs):
        result = original(gm, *args, **kwargs)
        captured.append(gm)
        return result

    monkeypatch.setattr("csp_compile.backend.rewrite_prefill", spy)
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 2, 24, 8, generator=gen) for _ in range(3))
    state = CSPState(config=CSPConfig(budget=1.0, window=2))
    compiled = torch.compile(TwoMaskedLayers(), backend=CSPBackend(state), dynamic=False)
    for pad in (0, 3):
        attention_mask = torch.ones(1, 24, dtype=torch.int64)
        attention_mask[:, :pad] = 0
        eager = TwoMaskedLayers()(query, key, value, attention_mask)
        got = compiled(query, key, value, attention_mask)
        assert torch.equal(got[0], eager[0])
    gm = captured[0]
    ops = [n for n in gm.graph.nodes if n.target is evict_prefill.ATTENTION_OP]
    shared = [n for n in gm.graph.nodes if n.target is evict_prefill.shared_mask_graph]
    flags = [n for n in gm.graph.nodes if n.target is evict_prefill.mask_is_causal_graph]
    assert len(ops) == 2 and len(shared) == 1 and len(flags) == 1
    for op in ops:
        assert op.args[3] is shared[0] and op.args[7] is flags[0]
    # the second attention is ordered after the first layer's gathers, which become the k0/v0 outputs
    gathers = [n for n in gm.graph.nodes if n.target is evict_prefill.gather_kept]
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert ops[0].args[9] == [] and ops[1].args[9] == gathers[:2] and list(outputs[1:3]) == gathers[:2]

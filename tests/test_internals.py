"""Each private torch / transformers behaviour in ``csp_compile.internals`` (and the one the rewrite
assumes of ``DynamicLayer``), pinned: a release that changes one fails here first, with its name."""

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._dynamo.testing import CompileCounterWithBackend
from transformers.cache_utils import DynamicLayer

from csp_compile import internals


def captured_graphs(fn, *args, **compile_kwargs) -> list[fx.GraphModule]:
    """The Dynamo graphs of ``fn(*args)``, compiled eagerly."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, **compile_kwargs)(*args)
    return graphs


def test_sdpa_is_the_c_builtin_in_dynamo_graphs():
    q = torch.randn(1, 2, 5, 4)
    (gm,) = captured_graphs(lambda q: F.scaled_dot_product_attention(q, q, q, is_causal=True), q)
    assert any(n.target in internals.SDPA_FUNCTIONS for n in gm.graph.nodes)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.proj(x)


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Inner(), Inner()])

    def forward(self, x):
        return self.layers[1](self.layers[0](x))


def test_module_stack_paths_are_relative_to_the_compiled_module():
    (gm,) = captured_graphs(Outer(), torch.randn(2, 4))
    stacks = [internals.module_stack_entries(n) for n in gm.graph.nodes if n.op == "call_function"]
    paths = {path for stack in stacks for path, _ in stack}
    assert {"layers.0", "layers.1", "layers.0.proj", "layers.1.proj"} <= paths, paths
    assert all("L[" not in path for path in paths)
    assert any(cls is Inner or str(cls).endswith("Inner") for stack in stacks for _, cls in stack)


def test_backend_registry_and_compiled_modules():
    assert internals.dynamo_backend_registered("inductor") and not internals.dynamo_backend_registered("no-such")
    plain, wrapped, in_place = nn.Linear(2, 2), torch.compile(nn.Linear(2, 2)), nn.Linear(2, 2)
    in_place.compile()
    assert not internals.is_compiled(plain) and internals.is_compiled(wrapped) and internals.is_compiled(in_place)


def test_backend_inputs_carry_a_fake_mode_and_placeholders_a_dynamo_source():
    seen = {}

    def backend(gm, example_inputs):
        seen["mode"] = internals.fake_mode_of(example_inputs)
        seen["sources"] = [hasattr(n, "_dynamo_source") for n in gm.graph.nodes if n.op == "placeholder"]
        return gm.forward

    torch._dynamo.reset()
    torch.compile(lambda x: x * 2, backend=backend)(torch.randn(3))
    assert seen["mode"] is not None and seen["sources"] and all(seen["sources"])


def test_data_dependent_shapes_stay_in_one_graph():
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    with internals.capture_data_dependent_shapes():
        torch.compile(lambda x: (x[x > 0] * 2).sum() + x.sum(), backend=counter)(torch.randn(9))
    assert counter.frame_count == 1


def test_marked_length_compiles_once_for_every_length():
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    fn = torch.compile(lambda x: x.cumsum(-1), backend=counter)
    for length in (5, 8, 13):
        x = torch.randn(2, length)
        internals.mark_dynamic_length(x, 1)
        fn(x)
    assert counter.frame_count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_flash_kernel_is_what_sdpa_runs_and_returns_the_row_lse(dtype):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 40, 16, generator=gen).to(dtype) for _ in range(3))
    mask = torch.ones(40, 40, dtype=torch.bool).tril()
    additive = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, float("-inf"))
    assert internals.sdpa_picks_flash(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False, scale=0.3)
    out, lse = internals.flash_attention_cpu_with_lse(q, k, v, attn_mask=additive, is_causal=False, scale=0.3)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3))
    scores = (q.double() @ k.double().transpose(-1, -2) * 0.3).masked_fill(~mask, float("-inf"))
    assert lse.shape == (2, 3, 40) and lse.dtype == torch.float32
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), atol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_flash_kernel_takes_is_causal_with_a_padding_key_row(dtype):
    """``csp::attention``'s padded-batch shortcut: the kernel run with ``is_causal=True`` and an additive
    (b, 1, 1, L) row of the padding keys equals it run with the whole (b, 1, L, L) causal-and-padding
    mask, bit for bit (several key blocks; left, right and all-but-one padding)."""
    gen = torch.Generator().manual_seed(0)
    length = 700
    q, k, v = (torch.randn(3, 2, length, 32, generator=gen).to(dtype) for _ in range(3))
    keys = torch.ones(3, length, dtype=torch.bool)
    keys[0, :37], keys[1, 650:], keys[2, :-1] = False, False, False
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None] & keys[:, None, None, :]

    def additive(m):
        return torch.zeros(m.shape, dtype=dtype).masked_fill(~m, float("-inf"))

    full = internals.flash_attention_cpu_with_lse(q, k, v, attn_mask=additive(mask), is_causal=False, scale=0.2)
    row = internals.flash_attention_cpu_with_lse(q, k, v, attn_mask=additive(keys[:, None, None, :]), is_causal=True,
                                                 scale=0.2)
    assert torch.equal(full[0], row[0]) and torch.equal(full[1], row[1])


@torch.library.custom_op("csp_test::mask_reader", mutates_args=())
def _mask_reader(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x * mask.sum()


@_mask_reader.register_fake
def _mask_reader_fake(mask, x):
    return torch.empty_like(x)


@pytest.mark.parametrize("once", [False, True])
def test_realized_once_gives_custom_op_users_one_buffer(once):
    """Inductor recomputes an unrealized pointwise into a new buffer for each custom-op user, unless the
    tensor went through ``realized_once`` (the rewrite's shared attention mask relies on it)."""
    from torch._inductor.utils import run_and_get_code

    def f(x):
        mask = (x[:, None] > x[None, :]).to(torch.uint8)
        if once:
            mask = internals.realized_once(mask)
        return _mask_reader(mask, x) + _mask_reader(mask, 2 * x) + mask[-2:].sum()

    torch._dynamo.reset()
    x = torch.randn(64)
    with torch._inductor.config.patch(fx_graph_cache=False):
        out, codes = run_and_get_code(torch.compile(f, fullgraph=True), x)
    assert torch.equal(out, f(x))
    assert codes[0].count("torch.uint8)") == (1 if once else 2)


def test_sliding_layer_types_are_named_sliding():
    from transformers import Gemma3TextConfig

    kinds = set(Gemma3TextConfig(num_hidden_layers=6).layer_types)
    assert {internals.is_sliding_layer_type(kind) for kind in kinds} == {True, False}
    assert kinds == {"sliding_attention", "full_attention"}


def test_dynamic_layer_update_on_an_empty_layer_is_a_cat_written_back():
    """The rewrite's sites: ``DynamicLayer.update`` on an empty layer traces to ``torch.cat`` of the empty
    cache and this step's K/V, whose outputs Dynamo returns to store in ``layer.keys`` / ``layer.values``."""
    layer = DynamicLayer()
    key, value = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    (gm,) = captured_graphs(lambda layer, k, v: layer.update(k, v)[0] * 1, layer, key, value)
    cats = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.cat]
    outputs = {a for a in next(n for n in gm.graph.nodes if n.op == "output").args[0] if isinstance(a, fx.Node)}
    assert len(cats) == 2 and set(cats) <= outputs
    assert torch.equal(layer.keys, key) and torch.equal(layer.values, value)

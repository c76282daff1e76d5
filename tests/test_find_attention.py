"""find_attention on Dynamo graphs of every tiny VLM family's language model, whole models and toy graphs."""

from __future__ import annotations

import functools

import pytest
import torch
import torch._dynamo
from torch import fx, nn

from csp_compile.passes.find_attention import AttentionMatch, find_attention
from csp_compile.tiny_vlms import FAMILIES, build_tiny_vlm, make_inputs

pytestmark = pytest.mark.slow  # compiles whole models: `pytest -m "not slow"` skips this module

IMPLS = ("sdpa", "eager")


def _recording_backend(graphs: list[fx.GraphModule]):
    def backend(gm: fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    return backend


@functools.cache
def _lm_graphs(family: str, attn: str, pad_left: tuple[int, ...], **text) -> tuple[object, list[fx.GraphModule]]:
    """(text config, [prefill graph, decode graph]) of the compiled language model under `generate`."""
    torch._dynamo.reset()
    model = build_tiny_vlm(family, attn_implementation=attn, **text)
    inputs = make_inputs(model, batch=len(pad_left), text_len=12, pad_left=pad_left)
    graphs: list[fx.GraphModule] = []
    model.get_decoder().compile(backend=_recording_backend(graphs))
    # as csp_compile.optimize traces: Qwen3-VL's boolean-mask indexing stays in the graph
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert len(graphs) == 2, "expected one prefill and one decode graph"
    return model.config.get_text_config(), graphs


def _shape(node: fx.Node) -> tuple:
    return tuple(node.meta["example_value"].shape)


def _check_structure(match: AttentionMatch) -> None:
    """The match is a closed subgraph: only its output escapes; its inputs are outside it."""
    inside = set(match.nodes)
    assert match.output in inside
    for node in inside - {match.output}:
        assert set(node.users) <= inside, f"{node} is used outside the match"
    for node in (match.query, match.key, match.value, match.mask):
        assert node not in inside


@pytest.mark.parametrize("attn", IMPLS)
@pytest.mark.parametrize("family", FAMILIES)
def test_language_model_layers(family: str, attn: str) -> None:
    config, graphs = _lm_graphs(family, attn, (3, 0))
    n_layers, head_dim = config.num_hidden_layers, config.head_dim
    scale = getattr(config, "query_pre_attn_scalar", head_dim) ** -0.5
    for phase, gm in zip(("prefill", "decode"), graphs):
        matches, skipped = find_attention(gm)
        assert skipped == []
        assert [m.layer_index for m in matches] == list(range(n_layers)), phase
        for i, m in enumerate(matches):
            assert m.module_path == f"layers.{i}.self_attn"
            # Left padding gives every layer a mask, so HF repeats K/V instead of enable_gqa.
            assert (m.pattern, m.mask_kind) == (
                ("sdpa_repeat_kv", "bool") if attn == "sdpa" else ("eager_repeat_kv", "additive")
            )
            assert (m.num_heads, m.num_kv_heads, m.head_dim) == (
                config.num_attention_heads, config.num_key_value_heads, head_dim)
            assert m.scale == pytest.approx(scale) and not m.is_causal
            # key / value are the DynamicCache update, torch.cat([cache, new], dim=-2); the cache
            # is a graph input at decode (an empty constant at prefill).
            assert m.key.target is torch.cat and m.value.target is torch.cat
            assert (m.key.args[0][0].op == "placeholder") == (phase == "decode")
            q_len = _shape(m.output)[2]
            assert _shape(m.output) == (2, config.num_attention_heads, q_len, head_dim)
            assert (q_len == 1) == (phase == "decode")
            _check_structure(m)


def test_unpadded_batch_uses_gqa_flag() -> None:
    """Without padding HF passes no mask: is_causal at prefill, nothing at decode, enable_gqa both."""
    _, (prefill, decode) = _lm_graphs("llava", "sdpa", (0,))
    for gm, kind in ((prefill, "causal_flag"), (decode, "none")):
        matches, _ = find_attention(gm)
        assert {(m.pattern, m.mask_kind, m.mask) for m in matches} == {("sdpa_gqa", kind, None)}
        assert all(m.num_kv_heads == 2 and m.nodes == (m.output,) for m in matches)


@pytest.mark.parametrize("attn", IMPLS)
def test_multi_head_attention_has_no_repeat(attn: str) -> None:
    _, graphs = _lm_graphs("llava", attn, (3, 0), num_key_value_heads=4)
    matches, _ = find_attention(graphs[0])
    assert {(m.pattern, m.num_heads, m.num_kv_heads) for m in matches} == {(attn, 4, 4)}
    for m in matches:
        _check_structure(m)


@pytest.mark.parametrize("attn", IMPLS)
def test_dynamic_shapes_make_the_scale_a_graph_value(attn: str) -> None:
    """Under dynamic=True, `self.scaling` becomes a graph input and the scale an `.item()` of it."""
    torch._dynamo.reset()
    model = build_tiny_vlm("llava", attn_implementation=attn)
    graphs: list[fx.GraphModule] = []
    model.get_decoder().compile(backend=_recording_backend(graphs), dynamic=True)
    with torch.no_grad():
        model(**make_inputs(model, batch=2, text_len=12, pad_left=[3, 0]))
    matches, _ = find_attention(graphs[0])
    assert [m.layer_index for m in matches] == [0, 1]
    for m in matches:
        assert (m.num_heads, m.num_kv_heads, m.head_dim) == (4, 2, 16)
        assert isinstance(m.scale, fx.Node) and m.scale.target == "item"
        assert not isinstance(_shape(m.output)[2], int)  # symbolic sequence length


@pytest.mark.parametrize("attn", IMPLS)
def test_whole_vlm_leaves_vision_tower_alone(attn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSFORMERS_DISABLE_TORCH_CHECK", "1")  # its .item() checks break the graph
    torch._dynamo.reset()
    model = build_tiny_vlm("llava", attn_implementation=attn)
    inputs = make_inputs(model, batch=2, text_len=12, pad_left=[3, 0])
    graphs: list[fx.GraphModule] = []
    with torch.no_grad():
        model(**inputs)  # installs output-capturing hooks under a threading.Lock, a graph break
        torch.compile(model, backend=_recording_backend(graphs), fullgraph=True)(**inputs)
    matches, skipped = find_attention(graphs[0])
    assert [m.module_path for m in matches] == [f"model.language_model.layers.{i}.self_attn" for i in range(2)]
    assert [s.module_path for s in skipped] == [f"model.vision_tower.encoder.layers.{i}.self_attn" for i in range(2)]
    assert all("not in the language model (vision_tower)" in s.reason for s in skipped)


# --------------------------------------------------------------------------------------------
# Toy graphs: patterns and refusals the HF families do not exercise
# --------------------------------------------------------------------------------------------


class ToyAttention(nn.Module):
    def __init__(self, variant: str) -> None:
        super().__init__()
        self.variant = variant

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.variant == "div":
            return torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
        if self.variant == "repeat_interleave":
            k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
            return nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.variant == "softcap":
            scores = torch.tanh(q @ k.transpose(2, 3) / 30.0) * 30.0
            return scores.softmax(-1) @ v
        if self.variant == "3d":
            return nn.functional.scaled_dot_product_attention(q[0], k[0], v[0])
        raise AssertionError(self.variant)


class ToyLayer(nn.Module):
    def __init__(self, variant: str, attribute: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        setattr(self.layers[0], attribute, ToyAttention(variant))
        self.attribute = attribute

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return getattr(self.layers[0], self.attribute)(q, k, v).sum()


def _toy(variant: str, attribute: str = "self_attn") -> tuple[list[AttentionMatch], list]:
    torch._dynamo.reset()
    graphs: list[fx.GraphModule] = []
    q = torch.randn(1, 4, 6, 8)
    kv_heads = 2 if variant == "repeat_interleave" else 4
    k, v = torch.randn(1, kv_heads, 6, 8), torch.randn(1, kv_heads, 6, 8)
    torch.compile(ToyLayer(variant, attribute), backend=_recording_backend(graphs), fullgraph=True)(q, k, v)
    return find_attention(graphs[0])


def test_eager_division_scale() -> None:
    (match,), _ = _toy("div")
    assert (match.pattern, match.scale, match.mask_kind, match.layer_index) == ("eager", 0.25, "none", 0)


def test_repeat_interleave_is_repeat_kv() -> None:
    (match,), _ = _toy("repeat_interleave")
    assert (match.pattern, match.num_kv_heads, match.mask_kind) == ("sdpa_repeat_kv", 2, "causal_flag")
    assert match.key.op == "placeholder" and match.scale == pytest.approx(8**-0.5)


@pytest.mark.parametrize(
    ("variant", "attribute", "reason"),
    [
        ("softcap", "self_attn", "unexpected"),
        ("3d", "self_attn", "not 4-D"),
        ("div", "cross_attn", "cross-attention (cross_attn)"),
        ("div", "vision_attn", "not in the language model (vision_attn)"),
    ],
)
def test_refusals(variant: str, attribute: str, reason: str) -> None:
    matches, skipped = _toy(variant, attribute)
    assert matches == []
    assert len(skipped) == 1 and reason in skipped[0].reason
    assert skipped[0].module_path == f"layers.0.{attribute}"


def test_graph_without_attention() -> None:
    """An MLP with a softmax head has no attention-like node at all."""
    torch._dynamo.reset()
    graphs: list[fx.GraphModule] = []
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.Softmax(dim=-1))
    torch.compile(mlp, backend=_recording_backend(graphs), fullgraph=True)(torch.randn(2, 8))
    assert find_attention(graphs[0]) == ([], [])

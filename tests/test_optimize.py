"""optimize(model): full budget = the eager model; budget 0.2 = the eager model evicted by hand
with the reference selection; decode compiles once; bad input leaves the model as it was."""

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import LogitsProcessorList
from transformers.cache_utils import DynamicCache, StaticCache

import csp_compile
from csp_compile import CSPConfig, resolve_budget
from csp_compile.backend import CSPState
from csp_compile.modality import ModalityUnavailableError
from csp_compile.tiny_vlms import FAMILIES, build_tiny_vlm, make_inputs
from eager_oracle import evicting_generate
from recompile_guard import FailOnRecompileFrom
from greedy import NEW_TOKENS, generate

pytestmark = pytest.mark.slow  # compiles whole models: `pytest -m "not slow"` skips this module


def batch_inputs(model, family):
    return make_inputs(model, batch=2, text_len=40, pad_left=[0, 5])


@pytest.fixture(autouse=True)
def default_stance():
    yield
    torch.compiler.set_stance("default")


@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_equals_eager(family):
    model = build_tiny_vlm(family)
    inputs = make_inputs(model, batch=2, text_len=24, pad_left=[0, 3])
    reference = generate(model, inputs)
    csp_compile.optimize(model, budget=1.0)
    out = generate(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    difference = (torch.stack(out.logits) - torch.stack(reference.logits)).abs().max().item()
    assert difference < 1e-4, difference


@pytest.mark.parametrize("family", FAMILIES)
def test_budget_02_matches_reference_eviction_and_decodes_without_recompiles(family):
    model = build_tiny_vlm(family)
    inputs = batch_inputs(model, family)
    config = CSPConfig(budget=0.2, window=4)
    reference, reference_kept = evicting_generate(model, inputs, config, NEW_TOKENS)

    csp_compile.optimize(model, config)
    out = generate(model, inputs, logits_processor=LogitsProcessorList([FailOnRecompileFrom(2)]))
    torch.compiler.set_stance("default")

    kept = csp_compile.kept_positions(model)
    length = inputs["input_ids"].shape[1]
    real_lengths = inputs["attention_mask"].sum(-1).tolist()
    assert any(k is not None for k in kept)
    for layer, (ours, theirs) in enumerate(zip(kept, reference_kept)):
        assert (ours is None) == (theirs is None), layer
        if ours is None:
            continue
        assert ours.shape[-1] == resolve_budget(length, config)[0]
        for b, real in enumerate(real_lengths):
            assert int((ours[b] >= 0).sum(-1).unique().item()) == resolve_budget(real, config)[0]
        assert torch.equal(ours, theirs), f"layer {layer}"
    assert torch.equal(out.sequences, reference.sequences)
    difference = (torch.stack(out.logits) - torch.stack(reference.logits)).abs().max().item()
    assert difference < 1e-4, difference


def test_new_prompt_length_recompiles_prefill_only():
    model = build_tiny_vlm("llava")
    csp_compile.optimize(model, budget=0.3, window=4)
    generate(model, make_inputs(model, text_len=20))
    state = model._csp_compile.state
    decode_graphs = state.compiled_graphs["continued"] + state.compiled_graphs["other"]
    inputs = make_inputs(model, text_len=31)

    # the decode graph exists: no recompile from the first decode step
    generate(model, inputs, logits_processor=LogitsProcessorList([FailOnRecompileFrom(1)]))
    assert state.compiled_graphs["continued"] + state.compiled_graphs["other"] == decode_graphs
    assert state.physical_length == resolve_budget(inputs["input_ids"].shape[1], state.config)[0]


def test_eager_attention_implementation():
    model = build_tiny_vlm("llava", attn_implementation="eager")
    inputs = make_inputs(model, batch=2, text_len=24, pad_left=[0, 3])
    config = CSPConfig(budget=0.3, window=4)
    reference = generate(model, inputs)
    csp_compile.optimize(model, budget=1.0)
    assert "pattern=eager" in csp_compile.explain(model)
    full = generate(model, inputs)
    assert torch.equal(full.sequences, reference.sequences)
    assert (torch.stack(full.logits) - torch.stack(reference.logits)).abs().max().item() < 1e-4
    csp_compile.optimize(model, config)
    generate(model, inputs)
    kept = csp_compile.kept_positions(model)
    assert all(k.shape[-1] == resolve_budget(inputs["input_ids"].shape[1], config)[0] for k in kept)


def test_explain_names_layers_patterns_and_left_alone():
    model = build_tiny_vlm("gemma3")
    csp_compile.optimize(model)
    text = csp_compile.explain(model)
    assert "layers.1.self_attn" in text and "pattern=sdpa" in text and "kv_heads=2" in text
    assert "sliding-window" in text and "left alone (2)" in text


def state_of(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_untouched(model, before):
    assert not csp_compile.is_optimized(model)
    assert "forward" not in model.get_decoder().__dict__
    assert not model._forward_pre_hooks and not model.get_decoder()._forward_pre_hooks
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_restore_gives_the_original_model_back():
    model = build_tiny_vlm("llava")
    inputs = make_inputs(model)
    before = state_of(model)
    reference = generate(model, inputs)
    csp_compile.optimize(model, budget=0.2, window=4)
    csp_compile.optimize(model, budget=0.5, window=4)  # re-optimising replaces the setup
    assert model._csp_compile.state.config.budget == 0.5
    generate(model, inputs)
    csp_compile.restore(model)
    assert_untouched(model, before)
    assert torch.equal(generate(model, inputs).sequences, reference.sequences)


@pytest.mark.parametrize("bad", [dict(budget=0.0), dict(window=0), dict(policy="nope"), dict(bugdet=0.1)])
def test_invalid_config_leaves_model_untouched(bad):
    model = build_tiny_vlm("llava")
    before = state_of(model)
    with pytest.raises(ValueError):
        csp_compile.optimize(model, **bad)
    assert_untouched(model, before)


def test_model_without_language_model_attention_is_rejected():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError):
        csp_compile.optimize(torch.zeros(3))
    with pytest.raises(csp_compile.NoAttentionFoundError, match="get_decoder"):
        csp_compile.optimize(model)
    vlm = build_tiny_vlm("llava")
    vlm.get_decoder().config._attn_implementation = "flex_attention"
    before = state_of(vlm)
    with pytest.raises(csp_compile.NoAttentionFoundError, match="flex_attention"):
        csp_compile.optimize(vlm)
    assert_untouched(vlm, before)


def test_unsupported_cache_is_a_clear_error():
    model = build_tiny_vlm("llava")
    inputs = make_inputs(model)
    csp_compile.optimize(model)
    static = StaticCache(config=model.config.get_text_config(), max_cache_len=128)
    with pytest.raises(csp_compile.UnsupportedCacheError, match="StaticCache"):
        with torch.no_grad():
            model(**inputs, cache=static)
    offloaded = DynamicCache(config=model.config.get_text_config(), offloading=True)
    with pytest.raises(csp_compile.UnsupportedCacheError, match="offload"):
        with torch.no_grad():
            model(**inputs, cache=offloaded)


def test_inputs_embeds_without_ids_is_a_clear_error():
    model = build_tiny_vlm("llava")
    inputs = make_inputs(model)
    csp_compile.optimize(model)
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with pytest.raises(ModalityUnavailableError):
        with torch.no_grad():
            model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"])
    assert model._csp_compile.state.layers == {}


def test_one_mask_for_sliding_and_evicted_layers_is_refused():
    """Sliding layers beside evicted ones need per-layer-type masks; a single 2-D mask is refused."""
    from csp_compile.hooks import _refuse_unmappable_padding

    model = build_tiny_vlm("gemma3")
    state = CSPState(config=CSPConfig(budget=0.2), prompt_length=40)
    state.attention_mask_2d = torch.ones(2, 40, dtype=torch.int64)
    _refuse_unmappable_padding(model.get_decoder(), state, torch.ones(2, 40))  # no padding: fine
    _refuse_unmappable_padding(model.get_decoder(), state, {"full_attention": None})  # per-type masks: fine
    state.attention_mask_2d[1, :3] = 0
    with pytest.raises(NotImplementedError, match="sliding-window"):
        _refuse_unmappable_padding(model.get_decoder(), state, torch.ones(2, 40))


def test_string_backend_on_the_language_model():
    model = build_tiny_vlm("llava")
    inputs = make_inputs(model, text_len=30)
    language_model = model.get_decoder()
    model.model.language_model = torch.compile(language_model, backend="csp", options={"budget": 0.25, "window": 4})
    cache = DynamicCache(config=model.config.get_text_config())
    with pytest.warns(UserWarning, match="no modality ids"), torch.no_grad():
        model(**inputs, cache=cache, use_cache=True)
    length = inputs["input_ids"].shape[1]
    assert [layer.keys.shape[-2] for layer in cache.layers] == [resolve_budget(length, CSPConfig(budget=0.25, window=4))[0]] * 2


@pytest.mark.parametrize("family", ["llava", "gemma3", "paligemma", "idefics3"])
def test_padded_batch_equals_each_sequence_alone(family):
    """Each sequence of a left-padded batch keeps its own budget: same kept positions (shifted by
    its padding) and the same greedy tokens as when it is generated alone, without padding."""
    model = build_tiny_vlm(family)
    pads = [0, 5]
    inputs = make_inputs(model, batch=2, text_len=40, pad_left=pads)
    csp_compile.optimize(model, budget=0.2, window=4)
    batched = generate(model, inputs).sequences[:, inputs["input_ids"].shape[1]:]
    batched_kept = [k for k in csp_compile.kept_positions(model) if k is not None]
    for b, pad in enumerate(pads):
        alone = {key: (value[b:b + 1, pad:] if value.dim() >= 2 and value.shape[:2] == inputs["input_ids"].shape
                       else value[b:b + 1] if value.shape[0] == 2 else value)
                 for key, value in inputs.items()}
        tokens = generate(model, alone).sequences[0, alone["input_ids"].shape[1]:]
        assert torch.equal(tokens, batched[b, : len(tokens)])  # the batch pads a sequence that ended early
        for ours, single in zip(batched_kept, [k for k in csp_compile.kept_positions(model) if k is not None]):
            row = ours[b][ours[b] >= 0].view(ours.shape[1], -1) - pad
            assert torch.equal(row, single[0])


def test_data_dependent_indexing_keeps_one_prefill_graph():
    """Qwen3-VL indexes hidden states with a boolean mask (deepstack): traced as a graph break, the
    prefill would split into per-layer graphs and Dynamo's recompile limit (8) would leave layers
    unevicted. Every one of 10 layers must be evicted by a single prefill graph."""
    model = build_tiny_vlm("qwen3_vl", num_hidden_layers=10)
    inputs = make_inputs(model, batch=2, pad_left=[0, 3])
    csp_compile.optimize(model, budget=0.2, window=4)
    generate(model, inputs)
    kept = csp_compile.kept_positions(model)
    assert all(k is not None and k.shape[-1] == kept[0].shape[-1] for k in kept)
    assert model._csp_compile.state.compiled_graphs["prefill"] == 1


_FUZZ_MODEL = {}


@given(
    field=st.sampled_from(["budget", "window", "cross_ratio", "n", "policy", "sink_tokens", "pool_kernel", "seed"]),
    value=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 0), st.text(max_size=4),
                    st.none(), st.booleans()),
)
@settings(max_examples=40)
def test_fuzzed_bad_overrides_leave_the_model_untouched(field, value):
    try:
        CSPConfig().replace(**{field: value})
    except ValueError:
        pass
    else:
        assume(False)  # only invalid values are of interest here
    model = _FUZZ_MODEL.setdefault("llava", build_tiny_vlm("llava"))
    before = state_of(model)
    with pytest.raises(ValueError, match=f"CSPConfig.{field}"):
        csp_compile.optimize(model, **{field: value})
    assert_untouched(model, before)

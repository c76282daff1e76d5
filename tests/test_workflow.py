"""What users do around optimize: copies, saves, attention switches, gradients, restore cycles.
Every path that would skip eviction raises one clear line instead."""

import contextlib
import copy
import gc
import io
import weakref

import pytest
import torch

import csp_compile
from csp_compile.tiny_vlms import build_tiny_vlm, make_inputs

pytestmark = pytest.mark.slow  # compiles whole models: `pytest -m "not slow"` skips this module


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, **kwargs)


def physical(cache) -> int:
    return cache.layers[0].keys.shape[-2]


@pytest.fixture(scope="module")
def optimized():
    model = build_tiny_vlm("llava")
    csp_compile.optimize(model, budget=0.2, window=4)
    return model


def test_deepcopy_gives_an_optimised_copy_and_leaves_the_original_working(optimized):
    inputs = make_inputs(optimized, text_len=30)
    before = generate(optimized, inputs)
    clone = copy.deepcopy(optimized)
    assert csp_compile.is_optimized(clone) and clone.get_decoder() is not optimized.get_decoder()
    assert clone._csp_compile.state is not optimized._csp_compile.state
    ours, theirs = generate(optimized, inputs), generate(clone, inputs)
    assert torch.equal(ours.sequences, before.sequences) and torch.equal(theirs.sequences, before.sequences)
    assert physical(theirs.past_key_values) < inputs["input_ids"].shape[1]  # the copy evicts too


def test_pickling_an_optimised_model_is_a_one_line_error(optimized):
    with pytest.raises(TypeError, match="state_dict") as error:
        torch.save(optimized, io.BytesIO())
    assert "\n" not in str(error.value)
    torch.save(optimized.state_dict(), io.BytesIO())


def test_switching_attention_after_optimize_is_refused():
    model = build_tiny_vlm("llava")
    csp_compile.optimize(model, budget=0.2, window=4)
    model.set_attn_implementation("flex_attention")
    with pytest.raises(RuntimeError, match="flex_attention"):
        generate(model, make_inputs(model, text_len=20))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_output_attentions_is_refused(implementation):
    model = build_tiny_vlm("llava", attn_implementation=implementation)
    csp_compile.optimize(model, budget=0.2, window=4)
    with pytest.raises(ValueError, match="output_attentions"):
        generate(model, make_inputs(model, text_len=20), output_attentions=True)


def test_gradient_enabled_forward_says_inference_only(optimized):
    inputs = make_inputs(optimized, text_len=20)
    with pytest.raises(RuntimeError, match="inference only"):
        optimized(**inputs)


def test_already_compiled_model_is_refused():
    model = build_tiny_vlm("llava")
    model.compile()
    with pytest.raises(ValueError, match="compile"):
        csp_compile.optimize(model)
    assert not csp_compile.is_optimized(model)
    with pytest.raises(ValueError, match="_orig_mod"):
        csp_compile.optimize(torch.compile(build_tiny_vlm("llava")))


def test_restore_frees_the_eviction_state():
    model = build_tiny_vlm("llava")
    states = []
    for _ in range(2):
        csp_compile.optimize(model, budget=0.2, window=4)
        generate(model, make_inputs(model, batch=2, text_len=20, pad_left=[0, 2]))
        state = model._csp_compile.state
        assert state.layers and state.modality is not None
        states.append(weakref.ref(state.modality))
        csp_compile.restore(model)
        assert not state.layers and state.modality is None and not state.plans
    gc.collect()
    assert all(ref() is None for ref in states)
    assert "__deepcopy__" not in model.__dict__ and "__getstate__" not in model.__dict__


def test_direct_forward_calls_keep_the_logical_length(optimized):
    """model(...) without generate: the pass makes the cache, evicts, and the next call continues logically."""
    inputs = make_inputs(optimized, text_len=30)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = optimized(**inputs)
        cache = out.past_key_values
        assert cache.get_seq_length() == length and physical(cache) < length
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=-1)
        optimized(input_ids=token, attention_mask=mask, cache=cache)
    assert cache.get_seq_length() == length + 1


def test_second_turn_through_the_deprecated_past_key_values_keyword(optimized):
    first = make_inputs(optimized, text_len=30)
    runs = []
    for keyword in ("cache", "past_key_values"):
        out = generate(optimized, first)
        ids = torch.cat([out.sequences, torch.full((1, 5), 9)], dim=-1)
        turn = {"input_ids": ids, "attention_mask": torch.ones_like(ids), keyword: out.past_key_values}
        with pytest.warns(FutureWarning) if keyword == "past_key_values" else contextlib.nullcontext():
            again = generate(optimized, turn)
        runs.append(again.sequences)
        assert out.past_key_values.get_seq_length() == ids.shape[1] + 2
    assert torch.equal(runs[0], runs[1])


def test_the_cache_keeps_no_view_of_prompt_sized_tensors(optimized):
    """Window queries, slot maps and K/V a pruned cache holds own their storage (no view of Q or the full K)."""
    out = generate(optimized, make_inputs(optimized, batch=2, text_len=120, pad_left=[0, 7]))
    layers = [layer for layer in out.past_key_values.layers if getattr(layer, "slots", None) is not None]
    assert layers
    for layer in layers:
        tensors = (layer.recent_queries, layer.keys, layer.values, *vars(layer.slots).values())
        for tensor in (t for t in tensors if t is not None):  # SlotMap.head_valid is None with uniform budgets
            assert tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()

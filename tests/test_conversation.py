"""Conversations on a pruned cache: a second turn equals the unmodified eager model fed the same
pruned cache by hand (``conversation_oracle``), in both ``on_new_turn`` modes."""

import copy

import pytest
import torch
from transformers import LogitsProcessorList

import csp_compile
from csp_compile import CSPConfig, resolve_budget
from csp_compile.tiny_vlms import EOS, FAMILIES, build_tiny_vlm, make_inputs
from conversation_oracle import chunked_generate, second_turn
from conversation_turns import image_turn, text_turn
from eager_oracle import evicting_generate
from recompile_guard import FailOnRecompileFrom
from greedy import NEW_TOKENS, generate

pytestmark = pytest.mark.slow  # compiles whole models: `pytest -m "not slow"` skips this module


def until_eos(tokens: torch.Tensor) -> torch.Tensor:
    """(b, n) True up to and including each row's first EOS."""
    eos = (tokens == EOS).long()
    return (eos.cumsum(-1) - eos) == 0


@pytest.fixture(autouse=True)
def default_stance():
    yield
    torch.compiler.set_stance("default")


TURNS = [(family, mode, "text") for family in FAMILIES for mode in ("evict", "append")] + [
    ("llava", "evict", "image"), ("llava_next", "append", "image"), ("idefics3", "evict", "image"),
    ("smolvlm", "append", "image"), ("llava_onevision", "evict", "image"), ("qwen2_vl", "evict", "image"),
    ("qwen2_5_vl", "append", "image"), ("qwen3_vl", "evict", "image"), ("gemma3", "evict", "image"),
    ("paligemma", "append", "image"),
]


@pytest.mark.parametrize("family, mode, content", TURNS)
def test_second_turn_matches_eager_oracle(family, mode, content):
    model = build_tiny_vlm(family)
    first = make_inputs(model, batch=2, text_len=40, pad_left=[0, 5])
    config = CSPConfig(budget=0.2, window=4, on_new_turn=mode)
    reference, kept, slot_valid, _ = evicting_generate(model, first, config, NEW_TOKENS, with_slots=True)
    logical = first["input_ids"].shape[1] + NEW_TOKENS - 1
    turn2 = (text_turn if content == "text" else image_turn)(model, first, reference.sequences)
    expected_tokens, expected_logits = second_turn(
        model, reference.past_key_values, slot_valid, kept, first_modality=None, turn2=turn2, logical=logical,
        config=config, max_new_tokens=NEW_TOKENS,
    )

    csp_compile.optimize(model, config)
    out = generate(model, first)
    assert torch.equal(out.sequences, reference.sequences)
    cache = out.past_key_values
    assert cache.get_seq_length() == logical
    again = generate(model, turn2, cache=cache)
    tokens = again.sequences[:, turn2["input_ids"].shape[1]:]
    live = until_eos(tokens)  # generate pads a row after its EOS; the oracle runs on
    assert torch.equal(tokens[live], expected_tokens[live])
    difference = (torch.stack(again.logits, 1) - torch.stack(expected_logits, 1))[live].abs().max().item()
    assert difference < 1e-4, difference
    assert cache.get_seq_length() == turn2["input_ids"].shape[1] + NEW_TOKENS - 1


@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_on_the_whole_cache_equals_the_unmodified_second_turn(family):
    """The oracle itself: fed the unpruned cache (every slot kept) it continues a new-image turn as the
    unmodified model's own generate does."""
    model = build_tiny_vlm(family)
    first = make_inputs(model, batch=2, text_len=40, pad_left=[0, 5])
    out = generate(model, first)
    cache, logical = out.past_key_values, out.past_key_values.get_seq_length()
    turn2 = image_turn(model, first, out.sequences)
    whole = [None if layer.keys.shape[-2] != logical else torch.arange(logical).expand(*layer.keys.shape[:2], -1)
             for layer in cache.layers]
    slot_valid = first["attention_mask"].bool()  # slots after the prompt's: the decoded tokens
    tokens, logits = second_turn(model, copy.deepcopy(cache), slot_valid, whole, first_modality=None, turn2=turn2,
                                 logical=logical, config=CSPConfig(on_new_turn="append"), max_new_tokens=NEW_TOKENS)
    again = generate(model, turn2, cache=cache)
    generated = again.sequences[:, turn2["input_ids"].shape[1]:]
    live = until_eos(generated)  # generate pads a row after its EOS; the oracle runs on
    assert torch.equal(generated[live], tokens[live])
    assert (torch.stack(again.logits, 1) - torch.stack(logits, 1))[live].abs().max().item() < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_time_eviction_matches_eager_oracle_without_recompiles(family):
    model = build_tiny_vlm(family)
    first = make_inputs(model, batch=2, text_len=40, pad_left=[0, 5])
    config = CSPConfig(budget=0.3, window=4, decode_budget=14, decode_every=3)
    steps = 11
    reference, kept, slot_valid, windows = evicting_generate(model, first, config, 1, with_slots=True)
    conversation = text_turn(model, first, reference.sequences, length=0)
    expected_tokens, expected_logits = second_turn(
        model, reference.past_key_values, slot_valid, kept, first_modality=None, turn2=conversation,
        logical=first["input_ids"].shape[1], config=config, max_new_tokens=steps - 1, initial_queries=windows,
    )

    csp_compile.optimize(model, config)
    out = generate(model, first, max_new_tokens=steps,
                   logits_processor=LogitsProcessorList([FailOnRecompileFrom(3)]))
    torch.compiler.set_stance("default")
    tokens = out.sequences[:, first["input_ids"].shape[1]:]
    assert torch.equal(tokens[:, 0], reference.sequences[:, -1])
    live = until_eos(tokens)[:, 1:]  # generate pads a row after its EOS; the oracle runs on
    assert torch.equal(tokens[:, 1:][live], expected_tokens[live])
    difference = (torch.stack(out.logits[1:], 1) - torch.stack(expected_logits, 1))[live].abs().amax(-1)
    assert difference.max().item() < 1e-4, difference
    cache = out.past_key_values
    full = [i for i, k in enumerate(csp_compile.kept_positions(model)) if k is not None]
    # 10 decode forwards: compressed to 14 after the 9th, then one more token appended
    assert {cache.layers[i].keys.shape[-2] for i in full} == {15}
    assert cache.get_seq_length() == first["input_ids"].shape[1] + steps - 1


# every family whose language model builds its own masks, each chunk size on some of them
CHUNKED = [("llava", 3), ("llava", 13), ("qwen2_vl", 3), ("idefics3", 3), ("llava_next", 13), ("qwen2_5_vl", 13),
           ("smolvlm", 13), ("llava_onevision", 3)]


@pytest.mark.parametrize("family, chunk", CHUNKED)  # 3: smaller than the window; neither divides the prompt
def test_chunked_prefill_matches_eager_oracle(family, chunk):
    model = build_tiny_vlm(family)
    first = make_inputs(model, batch=2, text_len=40, pad_left=[0, 5])
    config = CSPConfig(budget=0.3, window=4 if chunk == 3 else 6, prefill_chunk=chunk)
    assert first["input_ids"].shape[1] % chunk
    reference = chunked_generate(model, first, config, NEW_TOKENS)

    csp_compile.optimize(model, config)
    out = generate(model, first)
    assert torch.equal(out.sequences, reference.sequences)
    difference = (torch.stack(out.logits) - torch.stack(reference.logits)).abs().max().item()
    assert difference < 1e-4, difference
    cache = out.past_key_values
    kept = csp_compile.kept_positions(model)
    length = first["input_ids"].shape[1]
    assert cache.get_seq_length() == length + NEW_TOKENS - 1
    assert {cache.layers[i].keys.shape[-2] for i, k in enumerate(kept) if k is not None} == {
        resolve_budget(length, config)[0] + NEW_TOKENS - 1}


@pytest.mark.parametrize("family", ["gemma3", "paligemma", "qwen3_vl"])
def test_chunked_prefill_refuses_prebuilt_masks_and_unsplittable_inputs(family):
    model = build_tiny_vlm(family)
    csp_compile.optimize(model, budget=0.3, window=4, prefill_chunk=8)
    with pytest.raises(NotImplementedError, match="prefill_chunk"):
        generate(model, make_inputs(model, text_len=30))

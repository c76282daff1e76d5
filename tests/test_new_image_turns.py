"""A new image in a second turn on a cache, measured on the unmodified model against one-shot generation
of the whole conversation: with ``image_turn``'s inputs it equals it; where transformers 5.24 continues
wrongly it differs (so a refusal can go once it does not), and an optimised model refuses those inputs in
one line naming the argument, leaving the cache usable."""

import pytest
import torch

import csp_compile
from csp_compile.tiny_vlms import build_tiny_vlm, make_inputs
from conversation_turns import image_turn, one_shot
from greedy import NEW_TOKENS, generate

pytestmark = pytest.mark.slow  # compiles whole models: `pytest -m "not slow"` skips this module


def prefix_typed(turn: dict, start: int) -> tuple[dict, dict]:
    """PaliGemma: the new turn typed as prefix (0), as its processor types a prompt."""
    types = turn["token_type_ids"].clone()
    types[:, start:] = 0
    return {**turn, "token_type_ids": types}, {"token_type_ids": types}


def new_type_ids_only(key: str):
    """Type ids of the new user turn only (as a processor run on that turn alone gives them)."""
    def make(turn: dict, start: int) -> tuple[dict, dict]:
        return {**turn, key: turn[key][:, start:]}, {key: turn[key]}
    return make


CASES = [("paligemma", prefix_typed, "token_type_ids"),
         ("gemma3", new_type_ids_only("token_type_ids"), "token_type_ids"),
         ("qwen2_vl", new_type_ids_only("mm_token_type_ids"), "mm_token_type_ids"),
         ("qwen2_5_vl", new_type_ids_only("mm_token_type_ids"), "mm_token_type_ids"),
         ("qwen3_vl", new_type_ids_only("mm_token_type_ids"), "mm_token_type_ids")]


def first_turn(model):
    first = make_inputs(model, batch=2, text_len=40, pad_left=[0, 5])
    return first, generate(model, first)


@pytest.mark.parametrize("family, wrong, argument", CASES)
def test_optimised_model_refuses_in_one_line_and_keeps_the_cache(family, wrong, argument):
    model = build_tiny_vlm(family)
    csp_compile.optimize(model, budget=0.2, window=4)
    first, out = first_turn(model)
    turn = image_turn(model, first, out.sequences)
    cache = out.past_key_values
    logical, physical = cache.get_seq_length(), [layer.keys.shape[-2] for layer in cache.layers]
    with pytest.raises(ValueError, match=argument) as error:
        generate(model, wrong(turn, out.sequences.shape[1])[0], cache=cache)
    assert "\n" not in str(error.value) and str(error.value).startswith("csp: ")
    assert cache.get_seq_length() == logical and [layer.keys.shape[-2] for layer in cache.layers] == physical
    again = generate(model, turn, cache=cache)  # the right inputs still continue the same cache
    assert cache.get_seq_length() == turn["input_ids"].shape[1] + NEW_TOKENS - 1
    assert again.sequences.shape[1] == turn["input_ids"].shape[1] + NEW_TOKENS


@pytest.mark.parametrize("family, wrong, argument", CASES)
def test_unmodified_model_differs_from_one_shot_there(family, wrong, argument):
    model = build_tiny_vlm(family)
    first, out = first_turn(model)
    turn = image_turn(model, first, out.sequences)
    continued, type_ids = wrong(turn, out.sequences.shape[1])
    two_turns = generate(model, continued, cache=out.past_key_values)
    whole = generate(model, one_shot(model, first, turn, type_ids))
    difference = (torch.stack(two_turns.logits) - torch.stack(whole.logits)).abs().max().item()
    assert difference > 1e-4, difference  # right inputs: < 1e-6 (test_conversation's image turns)


@pytest.mark.parametrize("family", ["gemma3", "paligemma", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_unmodified_model_equals_one_shot_with_the_inputs_image_turn_passes(family):
    """What test_conversation's oracle stands in for: with ``image_turn``'s inputs the unmodified model's
    second turn on its full cache is the one-shot generation of the whole conversation."""
    model = build_tiny_vlm(family)
    first, out = first_turn(model)
    turn = image_turn(model, first, out.sequences)
    type_ids = {k: turn[k] for k in ("token_type_ids", "mm_token_type_ids") if k in turn}
    two_turns = generate(model, turn, cache=out.past_key_values)
    whole = generate(model, one_shot(model, first, turn, type_ids))
    assert torch.equal(two_turns.sequences, whole.sequences)
    assert (torch.stack(two_turns.logits) - torch.stack(whole.logits)).abs().max().item() < 1e-5


def test_direct_call_without_mrope_positions_is_refused():
    model = build_tiny_vlm("qwen2_vl")
    csp_compile.optimize(model, budget=0.2, window=4)
    first, out = first_turn(model)
    turn = image_turn(model, first, out.sequences)
    start = out.past_key_values.get_seq_length()
    call = {**turn, "input_ids": turn["input_ids"][:, start:],
            "mm_token_type_ids": turn["mm_token_type_ids"][:, start:]}
    with torch.no_grad(), pytest.raises(ValueError, match="position_ids"):
        model(**call, cache=out.past_key_values)

"""Conversations on a pruned cache: a second turn equals the unmodified eager model fed the same
pruned cache by hand (``conversation_oracle``), in both ``on_new_turn`` modes."""

import pytest
import torch

import csp_compile
from csp_compile import CSPConfig
from csp_compile.testing import FAMILIES, build_tiny_vlm, make_inputs
from conversation_oracle import second_turn
from eager_oracle import evicting_generate

NEW_TOKENS = 4
TYPE_IDS = ("token_type_ids", "mm_token_type_ids")


def generate(model, inputs, max_new_tokens=NEW_TOKENS, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kwargs)


def text_turn(model, first: dict, sequences: torch.Tensor, length: int = 6, seed: int = 7) -> dict:
    """The whole conversation after turn 1 plus ``length`` new text tokens (the second user turn)."""
    batch = sequences.shape[0]
    vocab = model.config.get_text_config().vocab_size
    new = torch.randint(4, vocab - 16, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([sequences, new], dim=-1)
    grown = ids.shape[1] - first["input_ids"].shape[1]
    turn = {"input_ids": ids,
            "attention_mask": torch.cat([first["attention_mask"], torch.ones(batch, grown, dtype=torch.long)], dim=-1)}
    for key in TYPE_IDS:
        if key in first:
            turn[key] = torch.cat([first[key], torch.zeros(batch, grown, dtype=first[key].dtype)], dim=-1)
    for key in ("image_grid_thw",):  # M-RoPE positions of the whole conversation need the first image's grid
        if key in first:
            turn[key] = first[key]
    return turn


@pytest.fixture(autouse=True)
def default_stance():
    yield
    torch.compiler.set_stance("default")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["evict", "append"])
def test_second_text_turn_matches_eager_oracle(family, mode):
    model = build_tiny_vlm(family)
    first = make_inputs(model, batch=2, text_len=40, pad_left=[0, 5])
    config = CSPConfig(budget=0.2, window=4, on_new_turn=mode)
    reference, kept, slot_valid = evicting_generate(model, first, config, NEW_TOKENS, with_slots=True)
    logical = first["input_ids"].shape[1] + NEW_TOKENS - 1
    turn2 = text_turn(model, first, reference.sequences)
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
    assert torch.equal(tokens, expected_tokens)
    difference = (torch.stack(again.logits) - torch.stack(expected_logits)).abs().max().item()
    assert difference < 1e-4, difference
    assert cache.get_seq_length() == turn2["input_ids"].shape[1] + NEW_TOKENS - 1

"""Conversations on a pruned cache: a second turn equals the unmodified eager model fed the same
pruned cache by hand (``conversation_oracle``), in both ``on_new_turn`` modes."""

import pytest
import torch
from transformers import LogitsProcessorList

import csp_compile
from csp_compile import CSPConfig, resolve_budget
from csp_compile.testing import FAMILIES, build_tiny_vlm, make_inputs
from csp_compile.testing.tiny_vlms import EOS
from conversation_oracle import chunked_generate, second_turn
from eager_oracle import evicting_generate
from recompile_guard import FailOnRecompileFrom

NEW_TOKENS = 4
TYPE_IDS = ("token_type_ids", "mm_token_type_ids")


def generate(model, inputs, max_new_tokens=NEW_TOKENS, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                              return_dict_in_generate=True, **kwargs)


def until_eos(tokens: torch.Tensor) -> torch.Tensor:
    """(b, n) True up to and including each row's first EOS."""
    eos = (tokens == EOS).long()
    return (eos.cumsum(-1) - eos) == 0


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


def image_turn(model, first: dict, sequences: torch.Tensor, seed: int = 3) -> dict:
    """The conversation after turn 1 plus a new user turn holding a new image, with what transformers
    needs to continue it from a cache (``new_image_inputs``)."""
    batch = sequences.shape[0]
    new = make_inputs(model, batch=batch, text_len=6, seed=seed)
    ids = torch.cat([sequences, new["input_ids"]], dim=-1)
    grown = ids.shape[1] - first["input_ids"].shape[1]
    turn = {"input_ids": ids,
            "attention_mask": torch.cat([first["attention_mask"], torch.ones(batch, grown, dtype=torch.long)], dim=-1)}
    generated = sequences.shape[1] - first["input_ids"].shape[1]
    for key in TYPE_IDS:
        if key in first:
            turn[key] = torch.cat([first[key], torch.zeros(batch, generated, dtype=first[key].dtype), new[key]], dim=-1)
    turn.update(new_image_inputs(model, first, new, turn))
    return turn


def new_image_inputs(model, first: dict, new: dict, turn: dict) -> dict:
    """The image inputs of a second turn, as transformers 5.24 continues each family correctly from a cache:
    - M-RoPE (Qwen-VL): ``image_grid_thw`` of every image of the conversation (generate computes the whole
      conversation's positions from it) and the new image already encoded as ``mm_encoder_outputs`` (generate
      would otherwise encode every grid's image from the new pixels alone);
    - PaliGemma: the new turn typed as suffix (token_type_ids 1): its prefix block is only read at the positions
      of the uncached tokens (a prefix-typed turn is refused on an optimised model);
    - the others: the new image's pixels (Gemma3: token_type_ids over the whole conversation, as above)."""
    pixels = {k: v for k, v in new.items() if k not in ("input_ids", "attention_mask", *TYPE_IDS)}
    if "image_grid_thw" in new:
        grids = torch.stack([first["image_grid_thw"], new["image_grid_thw"]], dim=1).flatten(0, 1)  # per sequence
        with torch.no_grad():
            encoded = model.get_image_features(new["pixel_values"], new["image_grid_thw"], return_dict=True)
        return {"image_grid_thw": grids, "mm_encoder_outputs": {"image": encoded}}
    if model.config.model_type == "paligemma":
        suffix = turn["token_type_ids"].clone()
        suffix[:, first["input_ids"].shape[1]:] = 1
        return {**pixels, "token_type_ids": suffix}
    return pixels


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

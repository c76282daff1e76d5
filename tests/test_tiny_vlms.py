"""The tiny VLM fixtures: every family builds, runs forward and generate, and pads correctly."""

from functools import lru_cache

import pytest
import torch

from csp_compile.tiny_vlms import FAMILIES, build_tiny_vlm, family_of, make_inputs

TYPE_ID_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


@lru_cache(maxsize=None)
def tiny(family: str):
    return build_tiny_vlm(family)


def generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True,
                          output_logits=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_gives_finite_logits(family):
    model = tiny(family)
    assert family_of(model) == family
    inputs = make_inputs(model)
    with torch.no_grad():
        logits = model(**inputs).logits
    vocab = model.config.get_text_config().vocab_size
    assert logits.shape == (1, inputs["input_ids"].shape[1], vocab)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_images_reach_the_language_model(family):
    model = tiny(family)
    inputs = make_inputs(model)
    other = dict(inputs, pixel_values=torch.flip(inputs["pixel_values"], dims=(-1,)))
    with torch.no_grad():
        delta = (model(**inputs).logits - model(**other).logits).abs().max()
    assert delta > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_generate_matches_each_row_alone(family):
    model = tiny(family)
    pad_left = [0, 3]
    inputs = make_inputs(model, batch=2, pad_left=pad_left, seed=1)
    batched = generate(model, inputs)
    prompt_len = inputs["input_ids"].shape[1]
    assert torch.equal(batched.sequences[:, :prompt_len], inputs["input_ids"])
    assert batched.sequences.shape[1] > prompt_len
    for row, pad in enumerate(pad_left):
        alone = {key: value.chunk(2)[row] for key, value in inputs.items()}
        alone.update({key: alone[key][:, pad:] for key in TYPE_ID_KEYS if key in alone})
        single = generate(model, alone)
        assert torch.equal(batched.sequences[row, prompt_len:], single.sequences[0, prompt_len - pad:])
        for step_batched, step_single in zip(batched.logits, single.logits):
            torch.testing.assert_close(step_batched[row], step_single[0], atol=1e-5, rtol=1e-4)


def test_layout_padding_and_text_around_the_image():
    model = tiny("llava")
    inputs = make_inputs(model, batch=2, text_len=10, pad_left=[4, 0])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert mask[0, :4].eq(0).all() and mask[0, 4:].eq(1).all() and mask[1].eq(1).all()
    assert ids[0, :4].eq(model.config.text_config.pad_token_id).all()
    for row in ids:
        where = (row == model.config.image_token_id).nonzero().flatten()
        assert where.min() > 0 and where.max() < len(row) - 1  # text before and after the image
    special = {0, 1, 2, model.config.image_token_id}
    assert not special & set(ids[1].tolist()[:1] + ids[1].tolist()[-5:])


@pytest.mark.parametrize(
    "overrides",
    [dict(num_key_value_heads=1), dict(num_key_value_heads=4), dict(hidden_size=96, num_attention_heads=6)],
)
def test_text_overrides_shape_the_language_model(overrides):
    model = build_tiny_vlm("qwen2_vl", **overrides)
    text = model.config.get_text_config()
    for key, value in overrides.items():
        assert getattr(text, key) == value
    assert text.head_dim == text.hidden_size // text.num_attention_heads
    with torch.no_grad():
        model(**make_inputs(model))


def test_gemma3_has_sliding_and_full_layers():
    layer_types = tiny("gemma3").config.text_config.layer_types
    assert {"sliding_attention", "full_attention"} <= set(layer_types)


def test_builds_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_vlm("llava", seed=5)
    assert torch.equal(torch.rand(3), expected)
    b = build_tiny_vlm("llava", seed=5)
    c = build_tiny_vlm("llava", seed=6)
    weight = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a.state_dict()[weight], b.state_dict()[weight])
    assert not torch.equal(a.state_dict()[weight], c.state_dict()[weight])


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(ValueError, match="llava.*smolvlm"):
        build_tiny_vlm("blip2")

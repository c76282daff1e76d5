"""The transformers cache contract LogicalLayer relies on: fails loudly when a release changes it.

LogicalLayer reports the logical length where transformers asks for the sequence length
(``get_seq_length`` -> generate's uncached suffix, ``get_query_offset`` -> mask query positions) and
sizes masks as ``P + q`` keys at offset ``T - P`` (``get_mask_sizes``): checked here through
transformers' own ``create_causal_mask`` on a real config."""

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask

from csp_compile.cache import LogicalLayer, SlotMap, TokenLog, adopt_logical_layers
from csp_compile.masks import offset_attention_mask
from csp_compile.tiny_vlms import build_tiny_vlm

pytestmark = pytest.mark.slow  # compiles whole models: `pytest -m "not slow"` skips this module


def pruned_cache(config, batch=2, physical=5, logical=12, heads=2, dim=4):
    cache = DynamicCache(config=config)
    adopt_logical_layers(cache)
    for layer in cache.layers:
        layer.update(torch.randn(batch, heads, physical, dim), torch.randn(batch, heads, physical, dim))
        layer.cumulative_length = logical
    return cache


def test_full_attention_layers_of_a_new_cache_are_plain_dynamic_layers():
    config = build_tiny_vlm("gemma3").config.get_text_config()
    cache = DynamicCache(config=config)
    kinds = [type(layer) for layer in cache.layers]
    assert set(kinds) == {DynamicLayer, DynamicSlidingWindowLayer}
    converted = adopt_logical_layers(cache)
    assert converted == [i for i, kind in enumerate(kinds) if kind is DynamicLayer]
    assert all(isinstance(cache.layers[i], LogicalLayer) for i in converted)


def test_generate_and_masks_see_the_logical_length():
    config = build_tiny_vlm("llava").config.get_text_config()
    cache = pruned_cache(config)
    assert cache.get_seq_length() == 12 and cache.get_query_offset(0) == 12
    assert cache.get_mask_sizes(3, 0) == (5 + 3, 12 - 5)
    embeds = torch.zeros(2, 3, config.hidden_size)
    mask = create_causal_mask(config=config, inputs_embeds=embeds, attention_mask=torch.ones(2, 15, dtype=torch.long),
                              cache=cache, position_ids=torch.arange(12, 15)[None].expand(2, -1))
    allowed = mask if mask.dtype == torch.bool else mask == 0
    assert allowed.shape[-2:] == (3, 8)
    assert allowed[..., :5].all()  # kept slots: all in the past
    new = allowed[0, 0, :, 5:]
    assert torch.equal(new, torch.ones(3, 3, dtype=torch.bool).tril())  # the new tokens: causal


def test_offset_padding_mask_reaches_the_slot_columns():
    config = build_tiny_vlm("llava").config.get_text_config()
    cache = pruned_cache(config)
    slot_valid = torch.tensor([[True] * 5, [False, False, True, True, True]])
    logical_mask = torch.ones(2, 15, dtype=torch.long)
    logical_mask[1, :4] = 0  # left padding of the logical prompt: not where the slots are
    mask2d = offset_attention_mask(logical_mask, slot_valid, 12)
    mask = create_causal_mask(config=config, inputs_embeds=torch.zeros(2, 3, config.hidden_size),
                              attention_mask=mask2d, cache=cache, position_ids=torch.arange(12, 15)[None].expand(2, -1))
    allowed = mask if mask.dtype == torch.bool else mask == 0
    assert torch.equal(allowed[:, 0, 0, :5], slot_valid)


def test_reset_and_crop_keep_logical_and_physical_lengths_apart():
    layer = LogicalLayer()
    layer.update(torch.randn(1, 1, 4, 2), torch.randn(1, 1, 4, 2))
    layer.cumulative_length = 10
    layer.slots = SlotMap(torch.arange(6, 8).expand(1, 1, -1), torch.zeros(1, 1, 2, dtype=torch.long),
                          torch.ones(1, 2, dtype=torch.bool))
    layer.crop(-2)  # the two appended tokens
    assert layer.get_seq_length() == 8 and layer.physical_length == 2
    with pytest.raises(NotImplementedError, match="kept slots"):
        layer.crop(-1)
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.slots is None


def test_token_log_columns():
    log = TokenLog()
    log.append(torch.tensor([[0, 1]]), torch.tensor([[0, 1]]))
    log.append(torch.tensor([[1]]), torch.tensor([[1]]))
    modality, valid = log.columns(1, 3)
    assert modality.tolist() == [[1, 1]] and valid.tolist() == [[True, True]]
    assert log.real_counts().tolist() == [2]
    with pytest.raises(RuntimeError, match="covers 3 tokens"):
        log.columns(0, 4)

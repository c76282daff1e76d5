"""CSP in vLLM on LLaVA-NeXT: any-resolution tile grids and image-newline features.

A tiny random-weight LLaVA-NeXT (``tiny_llava_next``: Llama with 2 layers, 4 query heads over 2 KV
heads of dim 32; a CLIP tower over 16 x 16 tiles with patch 4; six grid pinpoints) served by three
in-process engines: plain vLLM, CSP at budget 0.2 and CSP at budget 1.0. One batch carries five
images of different sizes and aspect ratios at different offsets; they pick five different
pinpoints, one has padding rows removed ("unpad"), so each gets its own image-token count (52 to
94); every request is compacted.

vLLM's LLaVA-NeXT replaces the prompt's one ``<image>`` with ``image_tokens(h, w)`` image tokens
(base tile, then the tile grid row by row, each row closed by an image-newline feature) and marks
them all as one placeholder range with no ``is_embed`` mask: every one of them, the newline
features included, carries an image embedding, so the plugin counts them all as image (as the
transformers path does: LLaVA-NeXT's processor expands ``<image>`` to one image token per feature).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from csp_compile.config import CSPConfig
from csp_compile.selection import select_kept
from csp_compile.tiny_vlms import BOS, FIRST_TEXT_ID, RESERVED_TOP
from csp_compile.vllm import batch
from csp_compile.vllm.engine import greedy
from csp_compile.vllm.modality import modality_ids
from engine_steps import engine_per_config, fed_to_model, prefill_and_record
from kept_cache import assert_kept_equal_select_kept
from tiny_llava_next import PATCH, TILE, best_pinpoint, image_tokens, prepare_llava_next_dir, unpadded_grid

CONFIG = CSPConfig(budget=0.2, window=8)
FULL = CSPConfig(budget=1.0, window=8)
# (height, width) in pixels, and text tokens before / after the image: pinpoints (h, w) 16 x 32,
# 48 x 16, 32 x 32, 48 x 48 (6 of its 12 feature rows left after unpadding) and 16 x 48; 52, 76,
# 88, 94 and 68 image tokens
REQUESTS = [((14, 30), 5, 40), ((40, 12), 21, 18), ((30, 30), 9, 30), ((20, 44), 33, 12), ((12, 40), 2, 50)]
LAYERS = 2
ENGINE_ARGS = dict(limit_mm_per_prompt={"image": 1}, max_model_len=512)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return prepare_llava_next_dir(tmp_path_factory.mktemp("tiny_llava_next_vllm"))


@pytest.fixture(scope="module")
def config_json(model_path):
    return json.loads((model_path / "config.json").read_text())


@pytest.fixture(scope="module")
def engines(model_path):
    return engine_per_config(model_path, **ENGINE_ARGS)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")
            for (height, width), _, _ in REQUESTS]


def _prompts(config_json: dict) -> list[dict[str, Any]]:
    """One prompt per entry of REQUESTS: random text, one ``<image>`` (vLLM expands it to the image's
    tokens), random text; a random RGB image of that size."""
    vocab = config_json["text_config"]["vocab_size"]
    rng = np.random.default_rng(1)
    prompts = []
    for ((_, before, after), image) in zip(REQUESTS, _images()):
        text = rng.integers(FIRST_TEXT_ID, vocab - RESERVED_TOP, before + after).tolist()
        prompts.append({"prompt_token_ids": [BOS, *text[:before], config_json["image_token_index"], *text[before:]],
                        "multi_modal_data": {"image": image}})
    return prompts


def _newline_offsets(height: int, width: int) -> list[int]:
    """Offsets, in the image's token span, of its image-newline features: after the base tile's
    features, one closing each row of the unpadded tile grid."""
    rows, cols = unpadded_grid(height, width)
    return [(TILE // PATCH) ** 2 + row * (cols + 1) + cols for row in range(rows)]


def test_every_image_token_newlines_included_is_image_and_counts_follow_the_pinpoint(engines, config_json, model_path,
                                                                                      records):
    from transformers import AutoConfig, AutoProcessor

    from csp_compile.modality import modality_ids as transformers_modality

    llm = engines(CONFIG)
    with fed_to_model(llm, "inputs_embeds", token_dim=0) as fed:
        requests = prefill_and_record(llm, _prompts(config_json), records, LAYERS)
    image_id = config_json["image_token_index"]
    newline = batch.view_for(llm.llm_engine.vllm_config).runner.get_model().image_newline.detach()
    counts = {}
    for name, req_id, query, key, value, modality, plan, indices, slots in records:
        ids, features = requests[req_id]
        (feature,) = features
        placeholder = feature.mm_position
        assert feature.modality == "image" and plan.length == len(ids)
        assert placeholder.is_embed is None  # no break / separator tokens: every position of the range is embedded
        from_ranges = torch.zeros(len(ids), dtype=torch.long)
        from_ranges[placeholder.offset:placeholder.offset + placeholder.length] = 1
        # the plugin's modality ids: image exactly on the placeholder range, which holds exactly the
        # prompt's <image> tokens as vLLM expanded them (the newline features included)
        assert torch.equal(modality, modality_ids(features, len(ids)))
        assert torch.equal(modality, from_ranges)
        assert torch.equal(modality, (ids == image_id).long())
        counts[req_id] = (placeholder.offset, placeholder.length)
    by_offset = sorted(counts.values())
    assert by_offset == sorted((1 + before, image_tokens(h, w)) for (h, w), before, _ in REQUESTS)
    # vLLM's expanded prompt is transformers' own: LlavaNextProcessor expands the same prompt (as text)
    # and image to the same ids, and the project's transformers-path modality (csp_compile.modality:
    # the image token id) is the plugin's on them
    processor = AutoProcessor.from_pretrained(model_path)
    hf_config = AutoConfig.from_pretrained(model_path)
    vocab = processor.tokenizer.convert_ids_to_tokens(list(range(config_json["text_config"]["vocab_size"])))
    plugin_modality = {req_id: modality for _, req_id, _, _, _, modality, *_ in records}
    for prompt, image in zip(_prompts(config_json), _images()):
        text = " ".join(vocab[i] for i in prompt["prompt_token_ids"])
        expanded = processor(text=text, images=image, return_tensors="pt")["input_ids"][0]
        (req_id,) = [r for r, (ids, _) in requests.items() if torch.equal(ids, expanded)]
        assert torch.equal(plugin_modality[req_id], transformers_modality(hf_config, expanded[None])[0])
    assert len({best_pinpoint(h, w) for (h, w), _, _ in REQUESTS}) == len(REQUESTS)  # each its own tile grid
    assert len({length for _, length in by_offset}) == len(REQUESTS)
    # the newline features sit inside the range: the model got its image_newline vector there
    for ids, ((computed, embeds),) in fed.items():  # one step: the prefill
        assert computed == 0
        ids = torch.tensor(ids)
        (start,) = torch.nonzero(ids == image_id)[0].tolist()
        length = int((ids == image_id).sum())
        ((height, width),) = [size for size, before, _ in REQUESTS if before + 1 == start]
        assert length == image_tokens(height, width)
        offsets = _newline_offsets(height, width)
        is_newline = (embeds[start:start + length] == newline).all(dim=-1)
        assert torch.nonzero(is_newline).flatten().tolist() == offsets
    assert len(fed) == len(REQUESTS)
    assert [r[0] for r in records[: len(REQUESTS)]] == [records[0][0]] * len(REQUESTS)  # one batch: one step


def test_kept_positions_per_layer_and_kv_head_equal_select_kept(engines, config_json, records):
    llm = engines(CONFIG)
    prefill_and_record(llm, _prompts(config_json), records, LAYERS)
    text = config_json["text_config"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    assert kv_heads < heads
    differs = 0
    for record in records:
        name, req_id, query, key, value, modality, plan, indices, slots = record
        assert query.shape[1] == heads and key.shape[1] == kv_heads  # GQA: (L, heads, D), (L, kv_heads, D)
        assert plan.freed_blocks >= 1
        oracle = assert_kept_equal_select_kept(llm, record, CONFIG)
        assert oracle.shape == (kv_heads, plan.kept)
        text_only = select_kept(query.permute(1, 0, 2)[None], key.permute(1, 0, 2)[None],
                                torch.zeros_like(modality)[None], CONFIG.replace(budget=plan.kept),
                                scale=1 / math.sqrt(key.shape[-1])).indices[0]
        differs += not torch.equal(text_only, oracle)
    assert differs > 0  # the modality split matters here: wrong image positions would change the kept set


def test_full_budget_gives_plain_vllm_tokens(engines, config_json, records):
    prompts = _prompts(config_json)
    assert greedy(engines(FULL), prompts, 8) == greedy(engines(None), prompts, 8)
    assert records == []  # nothing compacted at budget 1.0

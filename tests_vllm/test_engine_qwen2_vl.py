"""CSP in vLLM on a model whose image-token count follows the image size and that uses M-RoPE.

A tiny random-weight Qwen2-VL (``tiny_qwen2_vl``: 2 layers, 4 query heads over 2
KV heads of dim 32, M-RoPE; one image token per 4 x 4 pixels after Qwen2-VL's ``smart_resize``
into 64 .. 1024 pixels) served by three in-process engines: plain vLLM, CSP at budget 0.2 and CSP
at budget 1.0. One batch carries four images of different sizes (6 to 64 tokens each) at
different offsets; every request is compacted (1 or 2 of its blocks freed).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from csp_compile.config import CSPConfig
from csp_compile.tiny_vlms import BOS, FIRST_TEXT_ID, RESERVED_TOP
from csp_compile.vllm import batch
from csp_compile.vllm.engine import greedy
from csp_compile.vllm.modality import modality_ids
from engine_steps import engine_per_config, fed_to_model, prefill_and_record
from kept_cache import assert_kept_equal_select_kept
from tiny_qwen2_vl import MAX_PIXELS, MIN_PIXELS, image_tokens

CONFIG = CSPConfig(budget=0.2, window=8)
FULL = CSPConfig(budget=1.0, window=8)
# (height, width) in pixels, and text tokens before / after the image span: 6 (8 x 12), 16 (16 x 16),
# 35 (20 x 28) and 64 (40 x 40, scaled down to 32 x 32 by max_pixels) image tokens
REQUESTS = [((16, 16), 5, 40), ((20, 28), 17, 30), ((8, 12), 30, 24), ((40, 40), 9, 36)]
LAYERS = 2
ENGINE_ARGS = dict(limit_mm_per_prompt={"image": 1, "video": 0}, max_model_len=512)


@pytest.fixture(scope="module")
def config_json(qwen_dir):
    return json.loads((qwen_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def engines(qwen_dir):
    return engine_per_config(qwen_dir, **ENGINE_ARGS)


def _prompts(config_json: dict) -> list[dict[str, Any]]:
    """One prompt per entry of REQUESTS: random text, ``<|vision_start|> <|image_pad|> <|vision_end|>``
    (vLLM expands the pad to the image's tokens), random text; a random RGB image of that size."""
    vocab = config_json["text_config"]["vocab_size"]
    span = [config_json["vision_start_token_id"], config_json["image_token_id"], config_json["vision_end_token_id"]]
    rng = np.random.default_rng(0)
    prompts = []
    for (height, width), before, after in REQUESTS:
        text = rng.integers(FIRST_TEXT_ID, vocab - RESERVED_TOP, before + after).tolist()
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")
        prompts.append({"prompt_token_ids": [BOS, *text[:before], *span, *text[before:]],
                        "multi_modal_data": {"image": image}})
    return prompts


def test_images_of_different_sizes_get_their_own_token_counts_and_modality(engines, config_json, records):
    prompts = _prompts(config_json)
    requests = prefill_and_record(engines(CONFIG), prompts, records, LAYERS)
    counts = {}
    for name, req_id, query, key, value, modality, plan, indices, slots in records:
        ids, features = requests[req_id]
        (feature,) = features
        placeholder = feature.mm_position
        assert feature.modality == "image" and plan.length == len(ids)
        from_ranges = torch.zeros(len(ids), dtype=torch.long)
        from_ranges[placeholder.offset:placeholder.offset + placeholder.length] = 1
        assert placeholder.is_embed is None or bool(placeholder.is_embed.all())
        # the plugin's modality ids (modality_ids of the request's features): image exactly on the
        # placeholder range, which holds exactly the <|image_pad|> tokens (vision_start / vision_end are text)
        assert torch.equal(modality, modality_ids(features, len(ids)))
        assert torch.equal(modality, from_ranges)
        assert torch.equal(modality, (ids == config_json["image_token_id"]).long())
        assert ids[placeholder.offset - 1] == config_json["vision_start_token_id"]
        assert ids[placeholder.offset + placeholder.length] == config_json["vision_end_token_id"]
        counts[req_id] = placeholder.length
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    expected = []
    for (height, width), _, _ in REQUESTS:  # one token per 4 x 4 pixels of the processor's resized image
        resized = smart_resize(height, width, factor=4, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        expected.append(resized[0] // 4 * (resized[1] // 4))
        assert expected[-1] == image_tokens(height, width)
    by_prompt = sorted(counts.values())
    assert by_prompt == sorted(expected)
    assert len(set(by_prompt)) == len(REQUESTS)  # every image size gave its own token count
    first_layer = records[0][0]
    assert [r[0] for r in records[: len(prompts)]] == [first_layer] * len(prompts)  # one batch: one step


def test_kept_positions_per_layer_and_kv_head_equal_select_kept(engines, config_json, records):
    llm = engines(CONFIG)
    prefill_and_record(llm, _prompts(config_json), records, LAYERS)
    text = config_json["text_config"]
    heads, kv_heads = text["num_attention_heads"], text["num_key_value_heads"]
    assert kv_heads < heads
    for record in records:
        name, req_id, query, key, value, modality, plan, indices, slots = record
        assert query.shape[1] == heads and key.shape[1] == kv_heads  # GQA: (L, heads, D), (L, kv_heads, D)
        assert plan.freed_blocks >= 1
        oracle = assert_kept_equal_select_kept(llm, record, CONFIG)
        assert oracle.shape == (kv_heads, plan.kept)


def test_decoding_after_compaction_keeps_the_m_rope_positions_of_plain_vllm(engines, config_json, records):
    prompts, new_tokens = _prompts(config_json), 16
    fed, tokens = {}, {}
    for name, config in (("csp", CONFIG), ("plain", None)):
        assert batch.view_for(engines(config).llm_engine.vllm_config).runner.uses_mrope
        with fed_to_model(engines(config), "positions", token_dim=1) as fed[name]:
            tokens[name] = greedy(engines(config), prompts, new_tokens)
    compacted = {req_id for _, req_id, *_ in records}
    assert len(compacted) == len(prompts)  # every request was compacted (plain vLLM records nothing)
    assert all(len(row) == new_tokens for name in tokens for row in tokens[name])
    assert fed["csp"].keys() == fed["plain"].keys() and len(fed["csp"]) == len(prompts)
    for ids, steps in fed["csp"].items():
        plain = fed["plain"][ids]
        assert [n for n, _ in steps] == [n for n, _ in plain] == [0, *range(len(ids), len(ids) + new_tokens - 1)]
        for (_, ours), (_, theirs) in zip(steps, plain):
            assert torch.equal(ours, theirs)
        prefill = steps[0][1]
        image = torch.tensor(ids) == config_json["image_token_id"]
        assert prefill.shape == (3, len(ids))
        assert not torch.equal(prefill[1, image], prefill[2, image])  # M-RoPE: the image's rows and columns
        delta = int(prefill.max()) + 1 - len(ids)
        assert delta < 0  # the image's grid takes fewer positions than tokens
        for computed, positions in steps[1:]:  # decode: one token at position computed + delta, on all 3 axes
            assert positions.tolist() == [[computed + delta]] * 3


def test_full_budget_gives_plain_vllm_tokens(engines, config_json, records):
    prompts = _prompts(config_json)
    assert greedy(engines(FULL), prompts, 8) == greedy(engines(None), prompts, 8)
    assert records == []  # nothing compacted at budget 1.0

"""CSP in vLLM on video inputs: the tiny Qwen2-VL of ``tiny_qwen2_vl`` with decoded frames.

A video is an (frames, H, W, 3) uint8 array in ``multi_modal_data["video"]`` (a list of them for
two videos in one prompt; no metadata or fps needed: Qwen2-VL's video processor samples no frames
by default). Transformers' ``Qwen2VLVideoProcessor`` resizes every frame with ``smart_resize``
(as an image: 64 .. 1024 pixels, sides multiples of 4), pads the frame count to even by repeating
the last frame and merges frames in pairs (temporal patch 2), so a video of F frames of H x W gets
``ceil(F / 2) * image_tokens(H, W)`` tokens (grid ``(ceil(F / 2), h / 2, w / 2)`` of 2 x 2 patches,
merged 2 x 2). vLLM expands the prompt's one ``<|video_pad|>`` to that many and marks them as one
``PlaceholderRange`` of modality ``"video"`` with no ``is_embed`` mask (``<|vision_start|>`` /
``<|vision_end|>`` around it are text), so the plugin's modality id is 2 exactly on the
``<|video_pad|>`` tokens, and 1 on an image of the same prompt.

Three in-process engines (plain vLLM, CSP at budget 0.2, CSP at budget 1.0) serve one batch of
seven requests: five single videos of 1 to 6 frames and 8 x 8 to 40 x 40 pixels, an image and a
video in one prompt, and two videos in one prompt; every request is compacted.
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
from csp_compile.vllm.engine import greedy
from csp_compile.vllm.modality import MODALITY_IDS, modality_ids
from engine_steps import engine_per_config, fed_to_model, prefill_and_record
from kept_cache import assert_kept_equal_select_kept
from tiny_qwen2_vl import image_tokens

CONFIG = CSPConfig(budget=0.2, window=8)
FULL = CSPConfig(budget=1.0, window=8)
LAYERS = 2
# Each request: text lengths (int) between media, ("video", frames, height, width) or ("image", height, width).
# Video tokens: 32 (4 x 16 x 16), 70 (3 frames padded to 4, 20 x 28), 9 (one frame, padded to 2),
# 12 (6 x 8 x 8), 192 (5 frames of 40 x 40 scaled down to 32 x 32 by max_pixels); then a 16-token
# image and a 15-token video (2 x 20 x 12) in one prompt; then two videos in one prompt: 70
# (4 x 20 x 28: as many tokens as 3 frames of that size) and 8 (2 x 8 x 16).
REQUESTS = [
    [5, ("video", 4, 16, 16), 30],
    [17, ("video", 3, 20, 28), 24],
    [30, ("video", 1, 12, 12), 24],
    [9, ("video", 6, 8, 8), 36],
    [3, ("video", 5, 40, 40), 20],
    [5, ("image", 16, 16), 7, ("video", 2, 20, 12), 30],
    [4, ("video", 4, 20, 28), 6, ("video", 2, 8, 16), 28],
]
ENGINE_ARGS = dict(limit_mm_per_prompt={"image": 1, "video": 2}, max_model_len=512)


@pytest.fixture(scope="module")
def config_json(qwen_dir):
    return json.loads((qwen_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def engines(qwen_dir):
    return engine_per_config(qwen_dir, **ENGINE_ARGS)


def _media(rng: np.random.Generator) -> list[list[tuple[str, np.ndarray]]]:
    """Per request, its media in prompt order: (modality, (frames, H, W, 3) or (H, W, 3) uint8 pixels)."""
    out = []
    for request in REQUESTS:
        items = []
        for segment in request:
            if isinstance(segment, tuple):
                modality, *shape = segment
                items.append((modality, rng.integers(0, 256, (*shape, 3), dtype=np.uint8)))
        out.append(items)
    return out


def _prompts(config_json: dict) -> tuple[list[dict[str, Any]], list[list[tuple[str, np.ndarray]]]]:
    """The vLLM prompts of REQUESTS (random text; each medium as ``<|vision_start|> <pad> <|vision_end|>``,
    the pad vLLM expands) and their media."""
    vocab = config_json["text_config"]["vocab_size"]
    pad = {"image": config_json["image_token_id"], "video": config_json["video_token_id"]}
    rng = np.random.default_rng(0)
    media = _media(rng)
    prompts = []
    for request, items in zip(REQUESTS, media):
        ids, data = [BOS], {"image": [], "video": []}
        it = iter(items)
        for segment in request:
            if isinstance(segment, int):
                ids += rng.integers(FIRST_TEXT_ID, vocab - RESERVED_TOP, segment).tolist()
                continue
            modality, pixels = next(it)
            ids += [config_json["vision_start_token_id"], pad[modality], config_json["vision_end_token_id"]]
            data[modality].append(Image.fromarray(pixels, mode="RGB") if modality == "image" else pixels)
        multi_modal_data = {k: (v[0] if len(v) == 1 else v) for k, v in data.items() if v}
        prompts.append({"prompt_token_ids": ids, "multi_modal_data": multi_modal_data})
    return prompts, media


def _request_index(ids: torch.Tensor, prompts: list[dict[str, Any]], config_json: dict) -> int:
    """Which prompt vLLM expanded into ``ids`` (runs of image / video pads collapsed to one)."""
    pads = {config_json["image_token_id"], config_json["video_token_id"]}
    collapsed = [t for i, t in enumerate(ids.tolist()) if not (t in pads and i and ids[i - 1] == t)]
    return [p["prompt_token_ids"] for p in prompts].index(collapsed)


def _expected_tokens(qwen_dir, modality: str, pixels: np.ndarray) -> tuple[list[int], int]:
    """(grid t, h, w) and token count of one medium, from transformers' own Qwen2-VL processors (as
    vLLM's processor calls them, not through vLLM) and, separately, the smart_resize arithmetic:
    ``ceil(frames / 2)`` (frames padded to even, merged in pairs) times the image tokens of one frame."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    if modality == "video":
        processor = Qwen2VLVideoProcessor.from_pretrained(qwen_dir)
        (grid,) = processor(videos=[pixels], return_tensors="pt")["video_grid_thw"].tolist()
        frames, height, width = pixels.shape[:3]
    else:
        processor = Qwen2VLImageProcessor.from_pretrained(qwen_dir)
        (grid,) = processor(images=[pixels], return_tensors="pt")["image_grid_thw"].tolist()
        frames, (height, width) = 1, pixels.shape[:2]
    tokens = math.prod(grid) // 4  # 2 x 2 patches merged into one token
    assert tokens == math.ceil(frames / 2) * image_tokens(height, width)
    return grid, tokens


def test_video_placeholders_modality_ids_and_token_counts(engines, qwen_dir, config_json, records):
    prompts, media = _prompts(config_json)
    requests = prefill_and_record(engines(CONFIG), prompts, records, LAYERS)
    assert {name for name, *_ in records[: len(prompts)]} == {records[0][0]}  # one batch: one step
    pad = {"image": config_json["image_token_id"], "video": config_json["video_token_id"]}
    counts: dict[tuple, int] = {}
    for name, req_id, query, key, value, modality, plan, indices, slots in records:
        ids, features = requests[req_id]
        index = _request_index(ids, prompts, config_json)
        features = sorted(features, key=lambda f: f.mm_position.offset)
        assert [f.modality for f in features] == [m for m, _ in media[index]]
        expected = torch.zeros(len(ids), dtype=torch.long)
        for feature, (kind, pixels) in zip(features, media[index]):
            placeholder = feature.mm_position
            start, stop = placeholder.offset, placeholder.offset + placeholder.length
            # one range per medium, every position of it an embedding, exactly the expanded pad tokens
            assert placeholder.is_embed is None or bool(placeholder.is_embed.all())
            assert ids[start - 1] == config_json["vision_start_token_id"]
            assert ids[stop] == config_json["vision_end_token_id"]
            assert bool((ids[start:stop] == pad[kind]).all())
            grid, tokens = _expected_tokens(qwen_dir, kind, pixels)
            assert placeholder.length == tokens
            assert feature.data[f"{kind}_grid_thw"].data.tolist() == grid
            expected[start:stop] = MODALITY_IDS[kind]
            counts[(kind, pixels.shape)] = tokens
        assert plan.length == len(ids)
        # the plugin's ids: 2 exactly on the <|video_pad|> tokens, 1 on the <|image_pad|> ones, else 0
        assert torch.equal(modality, modality_ids(features, len(ids)))
        assert torch.equal(modality, expected)
        assert torch.equal(modality, 2 * (ids == pad["video"]).long() + (ids == pad["image"]).long())
    assert len(requests) == len(REQUESTS)
    videos = {shape: n for (kind, shape), n in counts.items() if kind == "video"}
    assert len(videos) == 8 and len(set(videos.values())) == 7  # every (frames, size) its own count ...
    assert videos[(3, 20, 28, 3)] == videos[(4, 20, 28, 3)] == 70  # ... but 3 and 4 frames: 2 temporal patches
    assert videos[(1, 12, 12, 3)] == image_tokens(12, 12) == 9  # one frame: padded to 2, one temporal patch
    assert videos[(5, 40, 40, 3)] == 3 * 64  # frames resized like images (32 x 32 by max_pixels)


def test_kept_positions_per_layer_and_kv_head_equal_select_kept(engines, config_json, records):
    llm = engines(CONFIG)
    prefill_and_record(llm, _prompts(config_json)[0], records, LAYERS)
    text = config_json["text_config"]
    kv_heads = text["num_key_value_heads"]
    assert kv_heads < text["num_attention_heads"]
    for record in records:
        plan, modality = record[6], record[5]
        assert plan.freed_blocks >= 1 and bool((modality == MODALITY_IDS["video"]).any())
        oracle = assert_kept_equal_select_kept(llm, record, CONFIG)
        assert oracle.shape == (kv_heads, plan.kept)


def test_video_modality_changes_what_is_kept(engines, config_json, records):
    """The split matters: ``select_kept`` with the videos counted as text keeps another set than the
    plugin did for some layer and request (a plugin that dropped video features would fail here)."""
    prefill_and_record(engines(CONFIG), _prompts(config_json)[0], records, LAYERS)
    changed = 0
    for name, req_id, query, key, value, modality, plan, indices, slots in records:
        assert bool((modality == MODALITY_IDS["video"]).any()), (name, req_id)  # every request has a video
        as_text = torch.where(modality == MODALITY_IDS["video"], 0, modality)
        other = select_kept(query.permute(1, 0, 2)[None], key.permute(1, 0, 2)[None], as_text[None],
                            CONFIG.replace(budget=plan.kept), scale=1 / math.sqrt(key.shape[-1])).indices[0]
        changed += not torch.equal(other, indices)
    assert changed >= 1, "treating video as text kept the same positions everywhere: the test has no teeth"


def test_decoding_after_compaction_keeps_the_m_rope_positions_of_plain_vllm(engines, qwen_dir, config_json, records):
    prompts, new_tokens = _prompts(config_json)[0], 16
    fed, tokens = {}, {}
    for name, config in (("csp", CONFIG), ("plain", None)):
        with fed_to_model(engines(config), "positions", token_dim=1) as fed[name]:
            tokens[name] = greedy(engines(config), prompts, new_tokens)
    assert len({req_id for _, req_id, *_ in records}) == len(prompts)  # every request was compacted
    assert all(len(row) == new_tokens for name in tokens for row in tokens[name])
    assert fed["csp"].keys() == fed["plain"].keys() and len(fed["csp"]) == len(prompts)
    media = _prompts(config_json)[1]
    for ids, steps in fed["csp"].items():
        plain = fed["plain"][ids]
        assert [n for n, _ in steps] == [n for n, _ in plain] == [0, *range(len(ids), len(ids) + new_tokens - 1)]
        for (_, ours), (_, theirs) in zip(steps, plain):
            assert torch.equal(ours, theirs)
        prefill, ids = steps[0][1], torch.tensor(ids)
        # M-RoPE: each medium's span holds (temporal, row, column) of its merged grid after the text before
        # it, a video's temporal index one per frame pair (Qwen2-VL has no second_per_grid_ts: factor 1)
        pads = (ids == config_json["video_token_id"]) | (ids == config_json["image_token_id"])
        starts = [i for i in range(1, len(ids)) if pads[i] and not pads[i - 1]]
        items = media[_request_index(ids, prompts, config_json)]
        assert len(starts) == len(items)
        for start, (kind, pixels) in zip(starts, items):
            (t, h, w), tokens = _expected_tokens(qwen_dir, kind, pixels)
            grid = torch.from_numpy(np.indices((t, h // 2, w // 2)).reshape(3, -1))
            base = int(prefill[0, start - 1]) + 1
            assert torch.equal(prefill[:, start:start + tokens], (grid + base).to(prefill.dtype))
        delta = int(prefill.max()) + 1 - len(ids)
        assert delta < 0
        for computed, positions in steps[1:]:  # decode: one token at position computed + delta, on all 3 axes
            assert positions.tolist() == [[computed + delta]] * 3


def test_full_budget_gives_plain_vllm_tokens(engines, config_json, records):
    prompts = _prompts(config_json)[0]
    assert greedy(engines(FULL), prompts, 8) == greedy(engines(None), prompts, 8)
    assert records == []  # nothing compacted at budget 1.0

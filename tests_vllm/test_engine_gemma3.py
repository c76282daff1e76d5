"""CSP in vLLM on a model with sliding-window layers: a tiny random-weight Gemma3 VLM.

``tiny_gemma3``: 4 layers (sliding, full, sliding, full; window 16), 4 query heads over 2 KV heads
of dim 32, 16 image tokens per image. vLLM's hybrid KV cache manager (on by default on CPU) puts the
sliding layers in a ``SlidingWindowManager`` group and the full layers in a ``FullAttentionManager``
group, each with its own block table: the plugin compacts, frees and shifts only the latter. Three
in-process engines (plain vLLM, CSP at budget 0.2, CSP at budget 1.0), plus one that must refuse to
start (the hybrid manager off: one group for both kinds of layers).

What the tests pin: the two groups and their layers; budget 1.0 gives plain vLLM's tokens; at
budget 0.2 only the full layers are compacted, each to ``select_kept``'s positions per KV head, the
scheduler frees leading blocks of the full-attention group only (none of the sliding group's); and
the decode check below, on plain vLLM (validating the oracle) and on CSP.

The decode check is an oracle per layer: at every decode step, each layer's attention output must
equal softmax attention of its query over exactly the K/V it should read, rebuilt from the K/V the
layer itself received at prefill and at the earlier decode steps (not from the cache): for a
sliding layer the last 16 positions, for a full layer (CSP) each KV head's kept positions plus the
generated ones. One prompt keeps 8 tokens, fewer than the window, so a sliding layer that read the
compacted (shifted or freed) blocks would miss prompt tokens it needs.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections import Counter
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from csp_compile.config import CSPConfig
from csp_compile.tiny_vlms import BOS, FIRST_TEXT_ID, RESERVED_TOP
from csp_compile.vllm import batch, settings
from csp_compile.vllm.cpu_backend import CSPCPUAttentionImpl
from csp_compile.vllm.engine import BLOCK_SIZE, greedy, make_llm, scheduler_of
from csp_compile.vllm.modality import modality_ids
from engine_steps import engine_per_config
from kept_cache import assert_kept_equal_select_kept
from tiny_gemma3 import IMAGE_SIZE, IMAGE_TOKENS, LAYER_TYPES, SLIDING_WINDOW, prepare_gemma3_dir

CONFIG = CSPConfig(budget=0.2, window=8)
FULL = CSPConfig(budget=1.0, window=8)
# text tokens before / after the image; vLLM turns <start_of_image> into 20 tokens (\n\n, boi, 16 images,
# eoi, \n\n): prompts of 40 (keeps 8 < the sliding window), 91, 111 and 126 tokens
REQUESTS = [(5, 14), (10, 60), (40, 50), (5, 100)]
NEW_TOKENS = 12
ENGINE_ARGS = dict(limit_mm_per_prompt={"image": 1}, max_model_len=512)
LAYERS = {kind: {f"language_model.model.layers.{i}.self_attn.attn" for i, k in enumerate(LAYER_TYPES) if k == kind}
          for kind in ("sliding_attention", "full_attention")}
SLIDING_LAYERS, FULL_LAYERS = LAYERS["sliding_attention"], LAYERS["full_attention"]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return prepare_gemma3_dir(tmp_path_factory.mktemp("tiny_gemma3_vllm"))


@pytest.fixture(scope="module")
def config_json(gemma_dir):
    return json.loads((gemma_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def engines(gemma_dir):
    return engine_per_config(gemma_dir, **ENGINE_ARGS)


def _prompts(config_json: dict) -> list[dict[str, Any]]:
    """One prompt per entry of REQUESTS: bos, random text, ``<start_of_image>``, random text; a random
    RGB image of the processor's size."""
    vocab = config_json["text_config"]["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = []
    for before, after in REQUESTS:
        text = rng.integers(FIRST_TEXT_ID, vocab - RESERVED_TOP, before + after).tolist()
        image = Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8), mode="RGB")
        prompts.append({"prompt_token_ids": [BOS, *text[:before], config_json["boi_token_index"], *text[before:]],
                        "multi_modal_data": {"image": image}})
    return prompts


def test_sliding_and_full_layers_get_separate_kv_cache_groups(engines):
    scheduler = scheduler_of(engines(CONFIG))
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    groups = scheduler.kv_cache_config.kv_cache_groups
    assert {type(m).__name__: set(g.layer_names) for m, g in zip(managers, groups, strict=True)} == {
        "SlidingWindowManager": SLIDING_LAYERS, "FullAttentionManager": FULL_LAYERS}


def test_full_budget_gives_plain_vllm_tokens(engines, config_json, records):
    prompts = _prompts(config_json)
    assert greedy(engines(FULL), prompts, NEW_TOKENS) == greedy(engines(None), prompts, NEW_TOKENS)
    assert records == []  # nothing compacted at budget 1.0


def test_only_full_attention_layers_are_compacted_and_keep_select_kept(engines, config_json, records):
    llm = engines(CONFIG)
    view = batch.view_for(llm.llm_engine.vllm_config)
    managers = scheduler_of(llm).kv_cache_manager.coordinator.single_type_managers
    prompt_ids: dict[str, torch.Tensor] = {}
    nulls: dict[str, dict[str, list[bool]]] = {}  # per group: which of the request's blocks are freed (null)

    def remember(name, req_id, *rest):  # noqa: ANN001
        prompt_ids.setdefault(req_id, torch.tensor(view.request(req_id).prompt_token_ids))
        nulls.setdefault(req_id, {type(m).__name__: [b.is_null for b in m.req_to_blocks[req_id]] for m in managers})

    batch.RECORDER.append(remember)
    greedy(llm, _prompts(config_json), 1)  # prefill only: nothing overwrites the cache after
    assert len(prompt_ids) == len(REQUESTS)
    assert Counter(name for name, *_ in records) == {name: len(REQUESTS) for name in FULL_LAYERS}
    for record in records:
        name, req_id, query, key, value, modality, plan, indices, slots = record
        ids = prompt_ids[req_id]
        # the full-attention group lost its leading blocks, the sliding-window group none of its own
        blocks = -(-plan.length // BLOCK_SIZE)
        full = [True] * plan.freed_blocks + [False] * (blocks - plan.freed_blocks)
        assert nulls[req_id] == {"FullAttentionManager": full, "SlidingWindowManager": [False] * blocks}
        # image ids exactly on the <image_soft_token>s (boi, eoi and the newlines around them are text)
        assert int(modality.sum()) == IMAGE_TOKENS
        assert torch.equal(modality, (ids == config_json["image_token_index"]).long())
        assert torch.equal(modality, modality_ids(view.request(req_id).mm_features, len(ids)))
        assert plan.length == len(ids) and plan.freed_blocks >= 1
        assert_kept_equal_select_kept(llm, record, CONFIG)
    assert min(plan.kept for *_, plan, _, _ in records) < SLIDING_WINDOW


@contextlib.contextmanager
def _attention_steps(llm: Any) -> Iterator[dict[tuple[str, str], list[tuple[torch.Tensor, ...]]]]:
    """{(request id, layer name): [(query (n, hq, D), key, value (n, hkv, D), output (n, hq, D)) per step]},
    what every attention layer of ``llm`` got and returned while open (wraps the impl's ``forward``)."""
    view = batch.view_for(llm.llm_engine.vllm_config)
    seen: dict[tuple[str, str], list[tuple[torch.Tensor, ...]]] = {}
    original = CSPCPUAttentionImpl.forward

    def recording(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):  # noqa: ANN001
        result = original(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if attn_metadata is None:
            return result
        starts = attn_metadata.query_start_loc.tolist()
        heads, dim = query.shape[1], query.shape[2]
        out = result[: attn_metadata.num_actual_tokens].view(-1, heads, dim)
        for row, req_id in enumerate(view.req_ids(len(starts) - 1)):
            rows = slice(starts[row], starts[row + 1])
            seen.setdefault((req_id, layer.layer_name), []).append(
                tuple(t[rows].clone() for t in (query, key, value, out)))
        return result

    CSPCPUAttentionImpl.forward = recording
    try:
        yield seen
    finally:
        CSPCPUAttentionImpl.forward = original


def _attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """(hq, D) softmax attention of one query (hq, D) over the ``visible`` (hkv, T) mask of key / value (T, hkv, D)."""
    group = query.shape[0] // key.shape[1]
    scores = torch.einsum("hd,thd->ht", query, key.repeat_interleave(group, dim=1)) / math.sqrt(query.shape[-1])
    scores = scores.masked_fill(~visible.repeat_interleave(group, dim=0), float("-inf"))
    return torch.einsum("ht,thd->hd", scores.softmax(-1), value.repeat_interleave(group, dim=1))


def _check_decode_reads(steps: list[tuple[torch.Tensor, ...]], kept: torch.Tensor | None, sliding: bool) -> int:
    """Every decode step of one (request, layer): its output equals ``_attend`` over the positions it must read
    (``kept`` (hkv, k) positions, None: all, for the prompt; every generated one; the last SLIDING_WINDOW
    when ``sliding``), and differs from reading the whole sequence wherever those differ. Returns the number of
    steps where the restriction mattered."""
    (_, prompt_key, prompt_value, _), decode = steps[0], steps[1:]
    length, kv_heads = prompt_key.shape[0], prompt_key.shape[1]
    assert len(decode) == NEW_TOKENS - 1 and all(step[0].shape[0] == 1 for step in decode)
    keys = torch.cat([prompt_key, *(step[1] for step in decode)])
    values = torch.cat([prompt_value, *(step[2] for step in decode)])
    mattered = 0
    for i, (query, _, _, output) in enumerate(decode):
        position = length + i  # the token this step writes and attends from
        visible = torch.zeros(kv_heads, position + 1, dtype=torch.bool)
        if kept is None:
            visible[:, :length] = True
        else:
            visible.scatter_(1, kept, True)
        visible[:, length:] = True
        if sliding:
            visible[:, : max(0, position + 1 - SLIDING_WINDOW)] = False
        expected = _attend(query[0], keys[: position + 1], values[: position + 1], visible)
        torch.testing.assert_close(output[0], expected, rtol=1e-4, atol=1e-5)
        whole = _attend(query[0], keys[: position + 1], values[: position + 1], torch.ones_like(visible))
        if not bool(visible.all()):
            assert not torch.allclose(whole, expected, rtol=1e-4, atol=1e-5)
            mattered += 1
    return mattered


@pytest.mark.parametrize("config", [None, CONFIG], ids=["plain", "csp"])
def test_each_layer_decodes_from_exactly_the_k_v_it_should_read(engines, config_json, records, config):
    llm = engines(config)
    with _attention_steps(llm) as steps:
        greedy(llm, _prompts(config_json), NEW_TOKENS)
    kept = {(req_id, name): indices for name, req_id, *_, indices, _ in records}
    assert len(kept) == (0 if config is None else len(REQUESTS) * len(FULL_LAYERS))
    names = {name for _, name in steps}
    assert len(names) == len(LAYER_TYPES) and len(steps) == len(REQUESTS) * len(LAYER_TYPES)
    mattered = {"sliding": 0, "full": 0}
    for (req_id, name), layer_steps in steps.items():
        sliding = name not in FULL_LAYERS
        count = _check_decode_reads(layer_steps, kept.get((req_id, name)), sliding)
        mattered["sliding" if sliding else "full"] += count
    assert mattered["sliding"] > 0  # every prompt is longer than the window
    assert (mattered["full"] > 0) == (config is not None)  # compacted full layers read fewer positions


def test_one_kv_cache_group_for_both_kinds_of_layers_is_refused(gemma_dir):
    with pytest.raises(ValueError, match=r"\['full_attention', 'sliding_attention'\] layers would share one block "
                                         r"table.*disable_hybrid_kv_cache_manager=False"):
        make_llm(gemma_dir, CONFIG, disable_hybrid_kv_cache_manager=True, **ENGINE_ARGS)


def test_a_mixed_kv_cache_group_is_refused_where_the_config_does_not_tell(gemma_dir, monkeypatch):
    # vLLM can also fall back to one group at KV cache setup (page sizes it cannot unify), after the
    # engine config was checked: the metadata builder refuses such a group itself
    monkeypatch.setattr(settings, "attention_kinds", lambda vllm_config: {"full_attention"})
    with pytest.raises(ValueError, match="a KV cache group mixes sliding windows .* hybrid KV cache manager"):
        make_llm(gemma_dir, CONFIG, disable_hybrid_kv_cache_manager=True, **ENGINE_ARGS)

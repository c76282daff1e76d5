"""One CSP engine (budget 0.2, window 8) against plain vLLM and the reference selection."""

from __future__ import annotations

import math

import pytest
import torch
from vllm import SamplingParams
from vllm import _custom_ops as ops

from csp_compile.config import CSPConfig
from csp_compile.data import VOCAB, make_dataset
from csp_compile.scoring import resolve_budget
from csp_compile.selection import select_kept
from csp_compile.vllm import batch
from csp_compile.vllm.engine import BLOCK_SIZE, greedy, held_blocks, task_prompt

CONFIG = CSPConfig(budget=0.2, window=8)


@pytest.fixture(scope="module")
def csp_llm(engine):
    return engine(CONFIG)


@pytest.fixture(scope="module")
def plain_llm(engine):
    return engine(None)


@pytest.fixture
def records():
    seen: list[tuple] = []
    batch.RECORDER.append(lambda *args: seen.append(args))
    yield seen
    batch.RECORDER.clear()


def test_full_budget_gives_plain_vllm_tokens(engine, plain_llm, test_split, records):
    prompts = test_split[0][:40]
    full = engine(CSPConfig(budget=1.0, window=8))
    assert greedy(full, prompts, 4) == greedy(plain_llm, prompts, 4)
    assert records == []  # nothing compacted


def _attention_layer(llm, name):
    runner = batch.view_for(llm.llm_engine.vllm_config).runner
    return runner.compilation_config.static_forward_context[name]


def test_kept_positions_per_layer_and_kv_head_equal_select_kept(csp_llm, records):
    examples = make_dataset(6, "test")
    view = batch.view_for(csp_llm.llm_engine.vllm_config)
    prompt_ids = {}
    batch.RECORDER.append(lambda name, req_id, *rest: prompt_ids.setdefault(req_id, view.request(req_id).prompt_token_ids))
    greedy(csp_llm, [task_prompt(e) for e in examples], 1)  # prefill only: nothing overwrites the cache after
    layers = 4
    assert len(records) == len(examples) * layers and len(prompt_ids) == len(examples)
    for name, req_id, query, key, value, modality, plan, selection, slots in records:
        ids = torch.tensor(prompt_ids[req_id])
        assert any(torch.equal(ids, e.input_ids) for e in examples)  # vLLM expanded the one placeholder to 64
        # modality from the token ids, independently of the placeholder ranges the plugin used
        assert torch.equal(modality, (ids == VOCAB.image).long())
        wanted, _ = resolve_budget(plan.length, CONFIG)
        assert (plan.length - plan.kept) % BLOCK_SIZE == 0 and wanted <= plan.kept < wanted + BLOCK_SIZE
        oracle = select_kept(query.permute(1, 0, 2)[None], key.permute(1, 0, 2)[None],
                             modality[None], CONFIG.replace(budget=plan.kept), scale=1 / math.sqrt(key.shape[-1]))
        assert torch.equal(selection.indices, oracle.indices), name
        # the cache's blocks now hold each KV head's kept K/V in ascending position from the first kept slot:
        # writing the oracle's gather there again with vLLM's op changes no byte (the layout is the op's own)
        layer = _attention_layer(csp_llm, name)
        cache = layer.kv_cache[0] if isinstance(layer.kv_cache, (list, tuple)) else layer.kv_cache
        block_ids = torch.unique(slots // cache.shape[2])
        index = oracle.indices[0][..., None].expand(-1, -1, key.shape[-1])
        expected = cache.clone()
        k_view, v_view = expected.view(cache.shape[0], cache.shape[1], 2 * cache.shape[2], -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key.permute(1, 0, 2).gather(1, index).permute(1, 0, 2).contiguous(),
                                       value.permute(1, 0, 2).gather(1, index).permute(1, 0, 2).contiguous(),
                                       k_view, v_view, slots, layer.isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        assert torch.equal(cache[block_ids], expected[block_ids]), name


def test_a_request_holds_only_its_kept_blocks_after_prefill(csp_llm, plain_llm):
    example = make_dataset(1, "test")[0]
    length = len(example.input_ids)
    held = {}
    for name, llm in (("csp", csp_llm), ("plain", plain_llm)):
        engine = llm.llm_engine
        engine.add_request(name, task_prompt(example), SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
        engine.step()  # the prefill step
        (held[name],) = held_blocks(llm).values()
        while engine.has_unfinished_requests():
            engine.step()
    kept = length - (length - resolve_budget(length, CONFIG)[0]) // BLOCK_SIZE * BLOCK_SIZE
    assert held["plain"] == math.ceil(length / BLOCK_SIZE)
    assert held["csp"] == math.ceil(kept / BLOCK_SIZE) < held["plain"]

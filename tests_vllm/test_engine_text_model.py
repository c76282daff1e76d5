"""CSP in vLLM on a text-only causal LM: a tiny random-weight Llama (``tiny_llama_text``).

Every token is text, so CSP is n-softmax window scoring with the whole budget on the self part;
the plugin needs nothing model-specific: the requests have no multimodal features and the modality
ids are all text. What the tests pin, on in-process engines (plain vLLM, CSP at budget 1.0 and 0.2):
budget 1.0 gives plain vLLM's greedy tokens and compacts nothing; at budget 0.2 every layer's kept
positions per KV head equal ``select_kept`` on the layer's own Q/K (and the paged cache holds them
in vLLM's layout), each request holds only its kept blocks after prefill and then decodes; and a
text model vLLM runs with sliding windows on every layer (Mistral's model-level ``sliding_window``)
is refused when the engine is made, with the setting that makes its layers full attention.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import shutil
from typing import Any, Callable

import pytest
import torch
from vllm import SamplingParams

from csp_compile.config import CSPConfig
from csp_compile.scoring import resolve_budget
from csp_compile.vllm.engine import BLOCK_SIZE, greedy, held_blocks, make_llm
from engine_steps import engine_per_config, prefill_and_record
from kept_cache import assert_kept_equal_select_kept
from tiny_llama_text import FIRST_TEXT_ID, KV_HEADS, LAYERS, VOCAB, prepare_llama_text_dir

CONFIG = CSPConfig(budget=0.2, window=8)
FULL = CSPConfig(budget=1.0, window=8)
LENGTHS = [40, 97, 160, 300]  # prompt tokens, <s> included: 1 to 7 blocks of 32 freed at budget 0.2
LAYER_NAMES = {f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return prepare_llama_text_dir(tmp_path_factory.mktemp("tiny_llama_text_vllm"))


@pytest.fixture(scope="module")
def engines(llama_dir):
    return engine_per_config(llama_dir)


def _prompts(lengths: list[int] = LENGTHS, seed: int = 0) -> list[dict[str, list[int]]]:
    """One token-id prompt per length: ``<s>`` then random text ids."""
    generator = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": [1] + torch.randint(FIRST_TEXT_ID, VOCAB, (n - 1,), generator=generator).tolist()}
            for n in lengths]


def test_full_budget_gives_plain_vllm_tokens(engines, records):
    prompts = _prompts(seed=1)
    assert greedy(engines(FULL), prompts, 8) == greedy(engines(None), prompts, 8)
    assert records == []  # nothing compacted


def test_kept_positions_per_layer_and_kv_head_equal_select_kept_and_are_all_text(engines, records):
    llm = engines(CONFIG)
    seen = prefill_and_record(llm, _prompts(), records, LAYERS)
    assert sorted(len(ids) for ids, _ in seen.values()) == LENGTHS
    assert all(features == [] for _, features in seen.values())  # no multimodal features: a text request
    assert {record[0] for record in records} == LAYER_NAMES
    for record in records:
        name, req_id, query, key, value, modality, plan, indices, slots = record
        ids, _ = seen[req_id]
        assert plan.length == len(ids) and plan.freed_blocks >= 1
        assert torch.equal(modality, torch.zeros(len(ids), dtype=torch.int64)), name  # every token text
        assert key.shape[1] == KV_HEADS
        oracle = assert_kept_equal_select_kept(llm, record, CONFIG)
        assert oracle.shape == (KV_HEADS, plan.kept)


def test_a_request_holds_only_its_kept_blocks_after_prefill_and_decodes(engines):
    (prompt,) = _prompts([LENGTHS[-1]], seed=2)
    held, tokens = {}, {}
    for name, config in (("csp", CONFIG), ("plain", None)):
        llm = engines(config)
        engine = llm.llm_engine
        engine.add_request(name, prompt, SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
        outputs = engine.step()  # the prefill step
        (held[name],) = held_blocks(llm).values()
        while engine.has_unfinished_requests():
            outputs += engine.step()
        tokens[name] = [o.outputs[0].token_ids for o in outputs if o.finished][0]
    length = LENGTHS[-1]
    kept = length - (length - resolve_budget(length, CONFIG)[0]) // BLOCK_SIZE * BLOCK_SIZE
    assert held["plain"] == math.ceil(length / BLOCK_SIZE)
    assert held["csp"] == math.ceil(kept / BLOCK_SIZE) < held["plain"]
    assert len(tokens["csp"]) == len(tokens["plain"]) == 6
    assert all(0 <= t < VOCAB for t in tokens["csp"])


@pytest.fixture(scope="module")
def mistral_dir(llama_dir, tmp_path_factory):
    """The tiny Llama's weights as a Mistral (the same tensor names) with a model-level sliding window
    of 512 and no ``layer_types``: vLLM gives every layer that window."""
    target = tmp_path_factory.mktemp("tiny_mistral_text_vllm")
    for path in llama_dir.iterdir():
        shutil.copyfile(path, target / path.name)
    config = json.loads((target / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=512)
    config.pop("layer_types", None)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    return target


def test_a_text_model_with_a_sliding_window_on_every_layer_is_refused_when_the_engine_is_made(mistral_dir):
    with pytest.raises(ValueError, match=r"^csp_compile.vllm: the model has no full-attention layer for CSP to "
                                         r"compact \(its layers: \['sliding_attention'\]\): vLLM gives every layer the "
                                         r"model's sliding window \(512\); disable_sliding_window=True"):
        make_llm(mistral_dir, CONFIG, max_model_len=512)


def test_the_same_model_with_disable_sliding_window_is_compacted(mistral_dir, records):
    llm = make_llm(mistral_dir, CONFIG, max_model_len=512, disable_sliding_window=True)
    seen = prefill_and_record(llm, _prompts(LENGTHS[:2], seed=3), records, LAYERS)
    for record in records:
        ids, _ = seen[record[1]]
        assert torch.equal(record[5], torch.zeros(len(ids), dtype=torch.int64))
        assert_kept_equal_select_kept(llm, record, CONFIG)


def test_the_vllm_bench_runs_on_a_text_model_directory_as_it_is(llama_dir):
    from csp_compile.vllm.bench import text_prompt
    from csp_compile.vllm.cli import run_bench
    from csp_compile.vllm.engine import prepared_model_dir

    assert prepared_model_dir(llama_dir) == llama_dir  # its own tokenizer, nothing to rewrite
    ids = text_prompt(300, 0, llama_dir)["prompt_token_ids"]
    assert len(ids) == 300 and min(ids) >= FIRST_TEXT_ID and max(ids) < VOCAB  # no special (added) token
    result = _in_a_child_process(run_bench, llama_dir, dict(prompt=300, requests=6, new_tokens=8, full_capacity=2,
                                                            repeats=1))
    assert result["vllm_blocks_per_request_off"] == math.ceil(300 / BLOCK_SIZE)
    assert result["vllm_blocks_per_request_ratio_b20"] <= 0.3
    assert result["vllm_max_concurrent_off"] == 2 < result["vllm_max_concurrent_csp"]
    assert result["vllm_max_concurrent_off_ample_memory"] == 6


def _in_a_child_process(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in a spawned process: an in-process engine that shuts down tears down
    vLLM's distributed state for the whole process, which would break the engines other tests keep."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)

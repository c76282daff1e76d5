"""CSP under vLLM's scheduler: mixed prefill/decode steps, text-only requests, preemption, refusals."""

from __future__ import annotations

import pytest
import torch
from vllm import LLM, SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.v1.core.sched.scheduler import Scheduler

from csp_compile.config import CSPConfig
from csp_compile.data import make_dataset, make_example
from csp_compile.vllm import batch
from csp_compile.vllm.engine import accuracy, csp_entry, scheduler_of, task_prompt

CONFIG = CSPConfig(budget=0.2, window=8)


def _generate(llm, prompts, lengths):
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in lengths]
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


def test_mixed_batches_give_each_request_its_own_tokens(engine, monkeypatch):
    llm = engine(CONFIG, max_num_seqs=3)
    examples = make_dataset(6, "test") + [make_example(i, "test", task="drill") for i in range(2)]
    prompts = [task_prompt(e) for e in examples]
    assert "multi_modal_data" not in prompts[-1]  # text-only requests in the same batches
    lengths = [1, 7, 3, 8, 2, 5, 6, 4]
    steps = []
    original = Scheduler._update_after_schedule

    def logged(self, output):
        fresh = [r for r in output.num_scheduled_tokens if self.requests[r].num_computed_tokens == 0]
        steps.append((len(fresh), len(output.num_scheduled_tokens) - len(fresh)))
        original(self, output)

    monkeypatch.setattr(Scheduler, "_update_after_schedule", logged)
    together = _generate(llm, prompts, lengths)
    monkeypatch.setattr(Scheduler, "_update_after_schedule", original)
    assert any(prefills and decodes for prefills, decodes in steps)  # new prompts prefilled while others decoded
    alone = [_generate(llm, [p], [n])[0] for p, n in zip(prompts, lengths)]
    assert together == alone


def test_preempted_requests_are_recomputed_and_evicted_again(engine, monkeypatch):
    # 11 usable blocks of 32 tokens: a short prompt (8 records, ~130 tokens) needs 5 to prefill and keeps 2,
    # so decoding 150 tokens each (6 blocks) makes the scheduler preempt (and later recompute) requests.
    # Stale eviction state after a preemption would make attention read the wrong blocks: answers at chance.
    llm = engine(CONFIG, max_model_len=352, kv_cache_memory_bytes=12 * 65536, max_num_seqs=8)
    preempted = []
    original = Scheduler._preempt_request

    def counting(self, request, *args, **kwargs):
        preempted.append(request.request_id)
        return original(self, request, *args, **kwargs)

    monkeypatch.setattr(Scheduler, "_preempt_request", counting)
    compacted: dict[str, list[int]] = {}
    batch.RECORDER.append(lambda name, req_id, query, key, value, modality, plan, *rest:
                          compacted.setdefault(req_id, []).append(plan.length))
    examples = make_dataset(12, "test", num_records=8)
    prompts, answers = [task_prompt(e) for e in examples], torch.stack([e.answer for e in examples])
    try:
        tokens = _generate(llm, prompts, [150] * len(examples))
    finally:
        batch.RECORDER.clear()
    monkeypatch.setattr(Scheduler, "_preempt_request", original)
    assert len(set(preempted)) >= 2, "the KV cache was large enough: nothing was preempted"
    assert all(len(t) == 150 for t in tokens)
    layers = 4  # a recomputed request is compacted again, over its prompt and the tokens it had generated
    again = [lengths for lengths in compacted.values() if len(lengths) > layers]
    assert again and all(lengths[layers] > lengths[0] for lengths in again)
    unpreempted = accuracy(_generate(engine(CONFIG), prompts, [2] * len(examples)), answers)
    assert accuracy(tokens, answers) >= unpreempted - 1 / len(examples), (accuracy(tokens, answers), unpreempted)


def test_a_prompt_longer_than_the_model_is_refused_by_vllm(engine):
    llm = engine(CONFIG)
    config = scheduler_of(llm).vllm_config
    assert config.scheduler_config.max_num_batched_tokens >= config.model_config.max_model_len  # one step per prompt
    with pytest.raises(VLLMValidationError, match="maximum context length is 1024"):
        llm.generate({"prompt_token_ids": [1] * 1100}, SamplingParams(max_tokens=1), use_tqdm=False)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"enable_prefix_caching": True}, "CSP needs enable_prefix_caching=False"),
    ({"enable_chunked_prefill": True}, "CSP needs enable_chunked_prefill=False"),
    ({"additional_config": {"csp": {"budget": 0}}}, r"CSPConfig.budget=0 is invalid"),
    ({"additional_config": {"csp": {"windw": 8}}}, r"has no field\(s\) \['windw'\]"),
])
def test_engine_settings_csp_cannot_run_with_are_refused_before_start(model_dir, overrides, message):
    kwargs = dict(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=1024, block_size=32,
                  enable_prefix_caching=False, enable_chunked_prefill=False, additional_config=csp_entry(CONFIG))
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        LLM(**kwargs)

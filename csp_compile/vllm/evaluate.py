"""``csp-compile eval --engine vllm``: the transformers path's records, measured through vLLM.

One engine per (policy, budget) (CSP is configured per engine). Records as ``evaluate`` writes
them: accuracy (both answer tokens), kl (full || policy) and top1_agreement at the first decode
step (answer token 2, read from the pruned cache), kept_fraction (every evicting layer and KV head
keeps the same count: the plan's ``kept / L``, mean over prompts) and kv_bytes_ratio: here the KV
**blocks** a request holds after prefill, CSP / full (vLLM allocates whole blocks).
"""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Any, Callable

import torch

from csp_compile.config import CSPConfig
from csp_compile.data import make_dataset
from csp_compile.evaluation.policy_spec import PolicySpec
from csp_compile.vllm.engine import BLOCK_SIZE, make_llm, task_prompt
from csp_compile.vllm.layout import plan_eviction

__all__ = ["evaluate_vllm"]

ANSWER_TOKENS = 2


def _run(model_dir: Path, config: CSPConfig | None, prompts: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens (n, 2), log-probabilities over the vocabulary at answer token 2 (n, vocab))."""
    from vllm import SamplingParams

    llm = make_llm(model_dir, config, max_logprobs=-1)  # the whole vocabulary, for the KL
    try:
        params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, ignore_eos=True, logprobs=-1)
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        del llm
        gc.collect()
    tokens = torch.tensor([list(o.outputs[0].token_ids) for o in outputs])
    rows = []
    for output in outputs:
        step = output.outputs[0].logprobs[1]
        row = torch.full((max(step) + 1,), -math.inf)
        for token, logprob in step.items():
            row[token] = logprob.logprob
        rows.append(row)
    width = max(len(r) for r in rows)
    logprobs = torch.stack([torch.nn.functional.pad(r, (0, width - len(r)), value=-math.inf) for r in rows])
    return tokens, logprobs


def _memory(lengths: list[int], config: CSPConfig) -> tuple[float, float]:
    """(kept fraction, blocks-after-prefill ratio) of ``config`` on prompts of ``lengths``."""
    plans = [plan_eviction(n, config, BLOCK_SIZE) for n in lengths]
    kept = sum(p.kept / p.length for p in plans) / len(plans)
    blocks = sum(math.ceil(p.kept / BLOCK_SIZE) for p in plans) / sum(math.ceil(n / BLOCK_SIZE) for n in lengths)
    return kept, blocks


def _score(tokens: torch.Tensor, logprobs: torch.Tensor, full_tokens: torch.Tensor, full_logprobs: torch.Tensor,
           answers: torch.Tensor) -> dict[str, float]:
    p_full = full_logprobs.exp()
    diff = torch.where(p_full > 0, full_logprobs - logprobs, 0.0)
    kl = (p_full * diff).sum(-1).clamp(min=0).mean()
    agree = (tokens[:, 1] == full_tokens[:, 1]).float().mean()
    return {"accuracy": float((tokens == answers).all(-1).float().mean()), "kl": float(kl),
            "top1_agreement": float(agree)}


def evaluate_vllm(model_dir: Path, n: int, seed: int, specs: list[PolicySpec], budgets: list[float], base: CSPConfig,
                  progress: Callable[[str], None] | None = None) -> tuple[list[dict[str, Any]], str]:
    """(records, data description) on the first ``n`` test prompts of the lookup task: the full
    cache (plain vLLM) first, then one record per (policy, budget), budgets outer."""
    examples = make_dataset(n, "test", seed)
    prompts = [task_prompt(e) for e in examples]
    answers = torch.stack([e.answer for e in examples])
    lengths = [len(e.input_ids) for e in examples]
    full_tokens, full_logprobs = _run(model_dir, None, prompts)
    records = [{"policy": "full", "budget": 1.0, "prefill_chunk": None,
                **_score(full_tokens, full_logprobs, full_tokens, full_logprobs, answers),
                "kept_fraction": 1.0, "kv_bytes_ratio": 1.0, "n": n}]
    if progress:
        progress("full cache")
    for budget in budgets:
        for spec in specs:
            if spec.policy == "full":
                continue
            config = spec.config(budget, base)
            tokens, logprobs = _run(model_dir, config, prompts)
            kept, blocks = _memory(lengths, config)
            records.append({"policy": spec.label, "budget": budget, "prefill_chunk": None,
                            **_score(tokens, logprobs, full_tokens, full_logprobs, answers),
                            "kept_fraction": kept, "kv_bytes_ratio": blocks, "n": n})
            if progress:
                progress(f"{spec.label} @ {budget}")
    description = f"{n} held-out prompts of the image-keyed lookup task (test split, seed {seed}), through vLLM"
    return records, description

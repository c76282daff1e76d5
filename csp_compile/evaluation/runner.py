"""Run an evaluation: every (policy, budget) through the compiled pass, compared with the full cache.

Each answer has ``evalset.answer_tokens`` tokens (2 for the lookup task, 4 for the grid task).
The first comes from the prefill, which attends to the whole prompt whatever the policy, so its
distribution equals the full cache's by construction; the rest are decoded from the pruned cache.
``kl`` and ``top1_agreement`` are therefore measured at the first decode step (answer token 2),
where eviction shows first; accuracy needs every answer token right. With chunked prefill (``prefill_chunk``) the
last chunk already attends to a pruned cache, so answer token 1 (and accuracy) can change too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

import csp_compile
from csp_compile.config import CSPConfig
from csp_compile.evaluation.eval_set import EvalSet
from csp_compile.evaluation.policy_spec import PolicySpec, chunk_label

__all__ = ["Outcome", "evaluate", "run_config", "run_full", "score"]


@dataclass(frozen=True)
class Outcome:
    """Greedy ``tokens`` (n, answer_tokens), ``decode_logprobs`` (n, vocab) at the first decode
    step, the ``kept_fraction`` of real prompt tokens left in the cache (mean over sequences,
    evicted layers and KV heads) and the KV ``cache_bytes`` after prefill (summed over batches)."""

    tokens: torch.Tensor
    decode_logprobs: torch.Tensor
    kept_fraction: float
    cache_bytes: int


def _generate(model: PreTrainedModel, inputs: dict[str, torch.Tensor],
              answer_tokens: int) -> tuple[torch.Tensor, torch.Tensor, DynamicCache]:
    cache = DynamicCache(config=model.config.get_text_config())
    with torch.no_grad():
        out = model.generate(**inputs, cache=cache, max_new_tokens=answer_tokens, min_new_tokens=answer_tokens,
                             do_sample=False, output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    return tokens, torch.log_softmax(out.logits[1].float(), dim=-1), cache


def _prefill_bytes(cache: DynamicCache, answer_tokens: int) -> int:
    """KV bytes of the cache right after the prefill (generate appended answer_tokens - 1 steps since)."""
    total = 0
    for layer in cache.layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        slots = layer.keys.shape[-2] - (answer_tokens - 1)
        per_slot = (layer.keys.nbytes + layer.values.nbytes) // layer.keys.shape[-2]
        total += slots * per_slot
    return total


def _batches(evalset: EvalSet, batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
    for start in range(0, len(evalset), batch_size):
        yield evalset.rows(start, start + batch_size)


def _run(model: PreTrainedModel, evalset: EvalSet, batch_size: int, *, optimized: bool) -> Outcome:
    tokens, logprobs, size, kept, count = [], [], 0, 0.0, 0
    for inputs in _batches(evalset, batch_size):
        t, lp, cache = _generate(model, inputs, evalset.answer_tokens)
        tokens.append(t), logprobs.append(lp)
        size += _prefill_bytes(cache, evalset.answer_tokens)
        if optimized:
            k, c = _kept_fraction(model, inputs["attention_mask"])
            kept, count = kept + k, count + c
    return Outcome(torch.cat(tokens), torch.cat(logprobs), kept / count if optimized else 1.0, size)


def run_full(model: PreTrainedModel, evalset: EvalSet, batch_size: int = 256) -> Outcome:
    """The unmodified model (full cache)."""
    return _run(model, evalset, batch_size, optimized=False)


def _kept_fraction(model: PreTrainedModel, attention_mask: torch.Tensor) -> tuple[float, int]:
    """(sum over sequences of the kept fraction, count of sequences) from the kept positions."""
    real = attention_mask.sum(-1).float()  # (b,)
    per_layer = [(kept >= 0).sum(-1).float().mean(-1) / real for kept in csp_compile.kept_positions(model)
                 if kept is not None]
    if not per_layer:
        raise RuntimeError("the optimised model evicted no layer: nothing was rewritten at prefill")
    return float(torch.stack(per_layer).mean(0).sum()), int(real.numel())


def run_config(model: PreTrainedModel, evalset: EvalSet, config: CSPConfig, batch_size: int = 256) -> Outcome:
    """``model`` optimised with ``config`` (restored afterwards, also on error)."""
    csp_compile.optimize(model, config)
    try:
        return _run(model, evalset, batch_size, optimized=True)
    finally:
        csp_compile.restore(model)


def score(outcome: Outcome, full: Outcome, answers: torch.Tensor | None) -> dict:
    """accuracy (exact match of every answer token; None without answers), kl (full || policy) and
    top1_agreement at the first decode step, kept_fraction, kv_bytes_ratio (cache after prefill / full)."""
    p_full = full.decode_logprobs.exp()
    kl = (p_full * (full.decode_logprobs - outcome.decode_logprobs)).sum(-1).clamp(min=0).mean()
    agree = (outcome.decode_logprobs.argmax(-1) == full.decode_logprobs.argmax(-1)).float().mean()
    accuracy = None if answers is None else float((outcome.tokens == answers).all(-1).float().mean())
    return {"accuracy": accuracy, "kl": float(kl), "top1_agreement": float(agree),
            "kept_fraction": outcome.kept_fraction, "kv_bytes_ratio": outcome.cache_bytes / full.cache_bytes}


def evaluate(
    model: PreTrainedModel,
    evalset: EvalSet,
    specs: list[PolicySpec],
    budgets: list[float],
    base: CSPConfig | None = None,
    *,
    batch_size: int = 256,
    prefill_chunks: Sequence[int] = (),
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """The full-cache record, then one record per (policy, budget), budgets outer, each followed
    by one record per chunk size of ``prefill_chunks`` (chunked prefill, in the order given).

    Each record: policy, budget, prefill_chunk, accuracy, kl, top1_agreement, kept_fraction,
    kv_bytes_ratio, n. ``prefill_chunk`` is None for one-shot prefill (and the full cache); a
    chunked record's policy is labelled ``csp (chunk 32)``. ``progress`` is called with a label
    after each run.
    """
    base = base or CSPConfig()
    full = run_full(model, evalset, batch_size)
    records = [{"policy": "full", "budget": 1.0, "prefill_chunk": None, **score(full, full, evalset.answers),
                "n": len(evalset)}]
    if progress:
        progress("full cache")
    for budget in budgets:
        for spec in specs:
            if spec.policy == "full":
                continue  # the full-cache record above
            for chunk in (None, *prefill_chunks):
                config = spec.config(budget, base).replace(prefill_chunk=chunk)
                outcome = run_config(model, evalset, config, batch_size)
                label = chunk_label(spec.label, chunk)
                records.append({"policy": label, "budget": budget, "prefill_chunk": chunk,
                                **score(outcome, full, evalset.answers), "n": len(evalset)})
                if progress:
                    progress(f"{label} @ {budget}")
    return records

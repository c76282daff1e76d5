"""``eval`` on a real text model: every (policy, window, budget) on the retrieval tasks, replayed on
one recorded prefill per prompt (``replay``), against the full cache.

Per record: ``accuracy`` (greedy decoding writes the whole 5-digit answer), ``kl`` (full || policy,
mean over the answer tokens read from the pruned cache, teacher-forced), ``needle_kept`` (share of
the asked value's tokens kept, mean over layers and KV heads), ``kept_fraction`` and ``n``.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from csp_compile.config import CSPConfig
from csp_compile.evaluation.policy_spec import PolicySpec
from csp_compile.real.replay import ScoreCache, kept_positions, record_prefill, teacher_forced_logprobs
from csp_compile.real.tasks import RealExample, RealTask, example_depth, make_example

__all__ = ["DEFAULT_REAL_POLICIES", "evaluate_real", "example_scores"]

DEFAULT_REAL_POLICIES = ("csp,csp_giveback,csp+pyramid,csp+adaptive,snapkv,snapkv:k1,adakv,pyramidkv,h2o,"
                         "streaming,lookm_text_prior,random")


def _needle_kept(kept: list[torch.Tensor], example: RealExample) -> float:
    start, stop = example.needle_spans[0]
    inside = [((rows >= start) & (rows < stop)).sum(-1).float().mean() / (stop - start) for rows in kept]
    return float(torch.stack(inside).mean())


def _kept_fraction(kept: list[torch.Tensor], length: int) -> float:
    return float(torch.stack([(rows >= 0).sum(-1).float().mean() for rows in kept]).mean()) / length


def example_scores(model: Any, example: RealExample, configs: dict[tuple[str, int, float], CSPConfig]) -> dict:
    """Per config key and for ``"full"``: correct, kl, needle_kept, kept_fraction on one example."""
    record = record_prefill(model, example.input_ids)
    cache = ScoreCache(record)
    answer = example.answer.to(record.first_logprobs.device)
    full = teacher_forced_logprobs(model, record, [kept_positions(cache, CSPConfig(policy="full"))], answer)[0]
    out = {"full": {"correct": bool((full.argmax(-1) == answer).all()), "kl": 0.0, "needle_kept": 1.0,
                    "kept_fraction": 1.0}}
    by_budget: dict[float, list] = defaultdict(list)
    for key, config in configs.items():
        by_budget[key[2]].append(key)
    for keys in by_budget.values():
        kept = [kept_positions(cache, configs[key]) for key in keys]
        logprobs = teacher_forced_logprobs(model, record, kept, answer)
        p_full = full[1:].exp()
        kl = (p_full * (full[1:] - logprobs[:, 1:])).sum(-1).clamp(min=0).mean(-1)
        correct = (logprobs.argmax(-1) == answer).all(-1)
        for c, key in enumerate(keys):
            out[key] = {"correct": bool(correct[c]), "kl": float(kl[c]), "needle_kept": _needle_kept(kept[c], example),
                        "kept_fraction": _kept_fraction(kept[c], record.length)}
    return out


def _key_text(key: Any) -> str:
    return "full" if key == "full" else json.dumps(list(key))


def _run_examples(model: Any, tokenizer: Any, task: RealTask, lengths: Sequence[int], n: int,
                  configs: dict[tuple[str, int, float], CSPConfig], seed: int, log: Path | None,
                  deadline: float | None, progress: Callable[[str], None] | None) -> dict[int, list[dict]]:
    """Per length the per-example scores, the lengths taken in turn (example i of each, then i + 1),
    so a run stopped at ``deadline`` (or resumed from ``log``, one JSON line per example) stays balanced."""
    done: dict[tuple[int, int], dict] = {}
    if log is not None and log.is_file():
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            same_run = entry["task"] == task.name and entry["seed"] == seed and entry["n"] == n
            if same_run and all(_key_text(key) in entry["scores"] for key in configs):
                done[(entry["length"], entry["index"])] = entry["scores"]
    results: dict[int, list[dict]] = {length: [] for length in lengths}
    for index in range(n):
        for length in lengths:
            if (length, index) not in done:
                if deadline is not None and time.monotonic() > deadline:
                    return results
                example = make_example(task, tokenizer, length, index, example_depth(index, n), seed)
                scores = {_key_text(key): value for key, value in example_scores(model, example, configs).items()}
                done[(length, index)] = scores
                if log is not None:
                    with log.open("a") as file:
                        file.write(json.dumps({"task": task.name, "seed": seed, "n": n, "length": length,
                                               "index": index, "scores": scores}) + "\n")
            results[length].append(done[(length, index)])
            if progress:
                progress(f"{task.name} @ {length}")
    return results


def evaluate_real(
    model: Any,
    tokenizer: Any,
    task: RealTask,
    *,
    lengths: Sequence[int],
    n: int,
    specs: Sequence[PolicySpec],
    budgets: Sequence[float],
    windows: Sequence[int],
    seed: int = 0,
    log: Path | None = None,
    max_minutes: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[dict]:
    """One record per length for the full cache, then per (policy, window, budget); each with task,
    length, policy, window, budget, accuracy, kl, needle_kept, kept_fraction and n, the prompts
    scored (fewer than ``n`` when ``max_minutes`` ran out; ``log`` keeps them for a later run)."""
    configs = {(spec.label, window, budget): spec.config(budget, CSPConfig(window=window))
               for spec in specs if spec.policy != "full" for window in windows for budget in budgets}
    deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
    results = _run_examples(model, tokenizer, task, lengths, n, configs, seed, log, deadline, progress)
    records = []
    for length in lengths:
        scored = results[length]
        if not scored:
            continue
        for key in ["full", *configs]:
            policy, window, budget = ("full", None, 1.0) if key == "full" else key
            values = [entry[_key_text(key)] for entry in scored]
            mean = {name: sum(float(v[name]) for v in values) / len(values)
                    for name in ("correct", "kl", "needle_kept", "kept_fraction")}
            records.append({"task": task.name, "length": length, "policy": policy, "window": window, "budget": budget,
                            "accuracy": mean["correct"], "kl": mean["kl"], "needle_kept": mean["needle_kept"],
                            "kept_fraction": mean["kept_fraction"], "n": len(values)})
    return records

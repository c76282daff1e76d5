"""The bench's figures: what each compares, its target, and the table printed on stdout."""

from __future__ import annotations

import math
from typing import Any, Callable

__all__ = ["FIGURES", "TARGETS", "check_targets", "format_table", "what"]

# figure -> what it compares (for the JSON's "what" and the table)
FIGURES: dict[str, str] = {
    "prefill_overhead_ratio":
        "prefill time, Llava with csp_compile.optimize (budget {budget}) / the same Llava compiled plainly with the "
        "same attention op and causal shortcut; the worst of CSP and SnapKV x ({cases}) x ({prompt}, {long_prompt} "
        "tokens), here {worst}; each the median of the ratio within a round over {repeats} rounds (after warm-up) in "
        "each of {processes} fresh processes, the variants in rotating order and sharing one copy of the weights",
    "naive_scoring_speedup":
        "one layer's CSP self/cross scores, {prompt} tokens: authors' way (full L x L n-softmax in eager, then the "
        "window rows) / fused scoring ({fused_impl})",
    "reference_scoring_speedup":
        "one layer's CSP self/cross scores, {prompt} tokens: csp_compile.scoring reference (window rows only, "
        "plain PyTorch) / fused scoring ({fused_impl})",
    "scoring_peak_mem_ratio":
        "peak memory of one {long_prompt}-token prefill, with CSP / without (compiled both); {memory_method}",
    "decode_bound_b20":
        "memory-bound limit of the decode speedup: (weight bytes + full KV bytes) / (weight bytes + KV bytes kept "
        "at budget {budget}), weights = what a decode step reads (layers + LM head, not the embedding table), "
        "{long_prompt}-token prompt",
    "decode_speedup_b20":
        "per-token decode time, full cache / CSP at budget {budget}, both compiled, {long_prompt}-token prompt, "
        "median over {decode_steps} steps per variant (first {skipped} steps of each generate skipped: they compile)",
    "adaptive_decode_ratio":
        "per-token decode time, CSP with layer_budget=pyramid and head_budget=adaptive (a rectangular cache of W + 2K "
        "slots per head, empty ones masked per head) / CSP with uniform budgets, {long_prompt}-token prompt, medians "
        "as above",
    "kv_bytes_ratio_b20":
        "KV bytes in the cache tensors after a {long_prompt}-token prefill, CSP at budget {budget} / full",
    "decode_recompiles":
        "new Dynamo graphs compiled during CSP decoding after the first decode step (counters['stats']"
        "['unique_graphs'])",
    "chunked_prefill_peak_mem_ratio":
        "peak memory of one {chunk_prompt}-token prefill, CSP (budget {budget}) with prefill_chunk={prefill_chunk} / "
        "CSP one-shot, same final cache size; {memory_method}",
    "chunked_kv_bytes_ratio":
        "KV bytes in the cache after that {chunk_prompt}-token prefill, chunked / one-shot (the same B is kept)",
}

Check = Callable[[dict[str, Any]], bool]


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# figure -> (target as text, check)
TARGETS: dict[str, tuple[str, Check]] = {
    "prefill_overhead_ratio": ("<= 1.02", lambda r: _finite(r["prefill_overhead_ratio"])
                               and r["prefill_overhead_ratio"] <= 1.02),
    "naive_scoring_speedup": (">= 10", lambda r: _finite(r["naive_scoring_speedup"]) and r["naive_scoring_speedup"] >= 10),
    "reference_scoring_speedup": (">= 2", lambda r: _finite(r["reference_scoring_speedup"])
                                  and r["reference_scoring_speedup"] >= 2),
    "scoring_peak_mem_ratio": ("<= 1.05", lambda r: _finite(r["scoring_peak_mem_ratio"])
                               and r["scoring_peak_mem_ratio"] <= 1.05),
    "decode_bound_b20": (">= 2", lambda r: _finite(r["decode_bound_b20"]) and r["decode_bound_b20"] >= 2),
    "decode_speedup_b20": (">= 0.8 x decode_bound_b20", lambda r: _finite(r["decode_speedup_b20"])
                           and r["decode_speedup_b20"] >= 0.8 * r["decode_bound_b20"]),
    "adaptive_decode_ratio": ("<= 1.05", lambda r: _finite(r["adaptive_decode_ratio"])
                              and r["adaptive_decode_ratio"] <= 1.05),
    "kv_bytes_ratio_b20": ("budget +- 0.01", lambda r: _finite(r["kv_bytes_ratio_b20"])
                           and abs(r["kv_bytes_ratio_b20"] - r["budget"]) <= 0.01),
    "decode_recompiles": ("== 0", lambda r: r["decode_recompiles"] == 0),
    "chunked_prefill_peak_mem_ratio": ("<= 0.5", lambda r: _finite(r["chunked_prefill_peak_mem_ratio"])
                                       and r["chunked_prefill_peak_mem_ratio"] <= 0.5),
    "chunked_kv_bytes_ratio": ("1 +- 0.01", lambda r: _finite(r["chunked_kv_bytes_ratio"])
                               and abs(r["chunked_kv_bytes_ratio"] - 1) <= 0.01),
}


def what(context: dict[str, Any]) -> dict[str, str]:
    return {key: text.format(**context) for key, text in FIGURES.items()}


# figures whose target holds at any size (the others are set for the full sizes and the bench shape)
SIZE_FREE = ("kv_bytes_ratio_b20", "decode_recompiles", "chunked_kv_bytes_ratio")


def check_targets(result: dict[str, Any]) -> dict[str, str]:
    """"pass" / "fail" per target; a --quick run judges only the targets that hold at any size ("not judged")."""
    return {key: ("not judged" if result.get("quick") and key not in SIZE_FREE else "pass" if check(result) else "fail")
            for key, (_, check) in TARGETS.items()}


def _value(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def format_table(result: dict[str, Any]) -> str:
    """The figures (value, target, pass/fail, what they compare), then the setup and raw timings."""
    rows = [("figure", "value", "target", "", "what")]
    for key in FIGURES:
        rows.append((key, _value(result[key]), TARGETS[key][0], result["targets"][key], result["what"][key]))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row[:4], widths)) + "  " + row[4] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 4)
    details = [
        ("model", result["model"]),
        ("shape", f"{result['family']}: hidden {result['hidden_size']}, layers {result['num_hidden_layers']}, "
                  f"heads {result['num_attention_heads']}, kv heads {result['num_key_value_heads']}, head_dim "
                  f"{result['head_dim']}, vocab {result['vocab_size']}, {result['parameters_language_model']:,} "
                  f"language-model parameters"),
        ("prompts", f"{result['prompt_tokens']} and {result['long_prompt_tokens']} tokens, "
                    f"{result['image_token_share']:.0%} image tokens"),
        ("setup", f"{result['device']} ({result['device_name']}), {result['dtype']}, {result['threads']} threads, "
                  f"torch {result['torch_version']}, budget {result['budget']}, window {result['window']}"),
        ("prefill", "; ".join(f"{case} {ratio:.3f}" for case, ratio in result["prefill_overhead_cases"].items())),
        ("vs eager", "transformers' eager model / CSP, prefill time (not judged): " + "; ".join(
            f"{case} {ratio:.2f}x" for case, ratio in result["prefill_speedup_vs_eager"].items())),
        ("A/A", "plain copy / plain (the timing noise): " + "; ".join(
            f"{case} {ratio:.3f}" for case, ratio in result["prefill_noise_cases"].items())),
        ("scoring", f"naive {result['scoring_ms_naive']:.2f} ms, reference {result['scoring_ms_reference']:.2f} ms, "
                    f"fused {result['scoring_ms_fused']:.2f} ms ({result['fused_scoring_impl']})"),
        ("decode", f"{result['decode_step_ms_plain']:.2f} ms/token full, {result['decode_step_ms_csp']:.2f} ms/token "
                   f"CSP"),
        ("memory", f"peak {result['peak_prefill_bytes_plain'] / 2**20:.1f} MiB plain, "
                   f"{result['peak_prefill_bytes_csp'] / 2**20:.1f} MiB CSP"),
        ("KV", f"{result['kv_bytes_full'] / 2**20:.1f} MiB full, {result['kv_bytes_csp'] / 2**20:.1f} MiB CSP; weights "
               f"read per step {result['decode_weight_bytes'] / 2**20:.1f} MiB"),
        ("wall time", f"{result['wall_s']:.0f} s"),
    ]
    if result.get("quick"):
        details.append(("note", "--quick: the targets are set for the full sizes (4096/8192-token prompts, the bench "
                                 f"shape); only {', '.join(SIZE_FREE)} are judged at these sizes"))
    width = max(len(k) for k, _ in details)
    return "\n".join(lines + [""] + [f"{k.ljust(width)}  {v}" for k, v in details])

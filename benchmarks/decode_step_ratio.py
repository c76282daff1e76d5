"""Per-step decode time: compiled model with CSP at budget 0.2 vs the same model compiled plainly.

    python benchmarks/decode_step_ratio.py --prompt 2048 --json out/decode_step_ratio.json

Both runs use one process and one random-weight Llava (MHA language model, so the KV cache is a
large share of the bytes a decode step reads); the ratio is of medians over the decode steps
after the first two (which compile). Absolute times depend on the machine; the ratio is the figure.
``decode_bound`` is (weight bytes + full KV bytes) / (weight bytes + kept KV bytes): what a
memory-bound decode step could gain at most.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import csp_compile
from csp_compile.testing import build_tiny_vlm, make_inputs


class StepClock(LogitsProcessor):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores

    def decode_steps(self) -> list[float]:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        return gaps[2:]  # the first decode steps compile


def timed_generate(model, inputs, new_tokens: int) -> float:
    clock = StepClock()
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, logits_processor=LogitsProcessorList([clock]))
    return statistics.median(clock.decode_steps())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=2048, help="approximate prompt length in tokens")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shape = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8)
    model = build_tiny_vlm("llava", **shape)
    inputs = make_inputs(model, text_len=args.prompt - 16)
    length = inputs["input_ids"].shape[1]
    language_model = model.get_decoder()

    language_model.forward = torch.compile(type(language_model).forward.__get__(language_model))
    plain = timed_generate(model, inputs, args.new_tokens)
    del language_model.forward
    csp_compile.optimize(model, budget=args.budget, window=32)
    pruned = timed_generate(model, inputs, args.new_tokens)
    kept = csp_compile.kept_positions(model)[0].shape[-1]

    text = model.config.get_text_config()
    weight_bytes = sum(p.numel() * p.element_size() for p in language_model.parameters())
    weight_bytes += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * text.head_dim * 4  # fp32 K and V
    bound = (weight_bytes + kv_per_token * length) / (weight_bytes + kv_per_token * kept)

    result = {
        "model": f"random-weight Llava, language model {shape}",
        "prompt_tokens": length,
        "budget": args.budget,
        "decode_step_ms_compiled": plain * 1e3,
        "decode_step_ms_csp": pruned * 1e3,
        "decode_speedup": plain / pruned,
        "decode_bound": bound,
        "kept_tokens": kept,
        "weight_bytes": weight_bytes,
        "kv_bytes_full": kv_per_token * length,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

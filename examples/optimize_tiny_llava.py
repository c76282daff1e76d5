"""Optimise a tiny random-weight Llava with CSP and generate: the compiler pass end to end.

    python examples/optimize_tiny_llava.py --budget 0.2

Builds the model from config (no download), generates with the unmodified model, then with
`csp_compile.optimize(model)`, and prints the tokens side by side, what each layer kept and the
KV-cache memory after prefill. Random weights: the tokens say nothing about quality, only that
generation runs on the evicted cache (at --budget 1.0 they must be identical).
"""

from __future__ import annotations

import argparse

import torch
from transformers import LogitsProcessor, LogitsProcessorList

import csp_compile
from csp_compile.tiny_vlms import build_tiny_vlm, make_inputs


class CacheBytesAfterPrefill(LogitsProcessor):
    """Reads the KV-cache size right after the prefill forward (the first logits)."""

    def __init__(self, cache_holder: dict) -> None:
        self.cache_holder, self.bytes = cache_holder, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.bytes is None and "cache" in self.cache_holder:
            layers = self.cache_holder["cache"].layers
            self.bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
        return scores


def generate(model, inputs: dict, new_tokens: int) -> tuple[torch.Tensor, int]:
    from transformers.cache_utils import DynamicCache

    holder = {"cache": DynamicCache(config=model.config.get_text_config())}
    meter = CacheBytesAfterPrefill(holder)
    with torch.no_grad():
        out = model.generate(**inputs, cache=holder["cache"], max_new_tokens=new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([meter]))
    return out[:, inputs["input_ids"].shape[1]:], meter.bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=96)
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()

    model = build_tiny_vlm("llava")
    inputs = make_inputs(model, batch=2, text_len=args.text_len, pad_left=[0, 7])
    full_tokens, full_bytes = generate(model, inputs, args.new_tokens)
    csp_compile.optimize(model, budget=args.budget, window=args.window)
    csp_tokens, csp_bytes = generate(model, inputs, args.new_tokens)

    print(csp_compile.explain(model))
    length = inputs["input_ids"].shape[1]
    for b in range(full_tokens.shape[0]):
        print(f"sequence {b}: full cache {full_tokens[b].tolist()}")
        print(f"{'':12}CSP {args.budget:<9}{csp_tokens[b].tolist()}")
    for layer, kept in enumerate(csp_compile.kept_positions(model)):
        if kept is not None:
            counts = (kept >= 0).sum(-1)[:, 0].tolist()
            print(f"layer {layer}: kept {counts} of {inputs['attention_mask'].sum(-1).tolist()} real prompt tokens "
                  f"(padded length {length}); sequence 0, KV head 0 keeps {kept[0, 0].tolist()}")
    print(f"KV cache after prefill: {csp_bytes / 1024:.1f} KiB with CSP vs {full_bytes / 1024:.1f} KiB full "
          f"({csp_bytes / full_bytes:.2f}x)")


if __name__ == "__main__":
    main()

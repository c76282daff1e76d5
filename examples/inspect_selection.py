"""Which prompt tokens would CSP keep? The reference selection on a tiny random-weight VLM.

Runs one prefill of a tiny model built from config, records each language-model layer's
post-RoPE queries and keys through transformers' AttentionInterface, and applies
`csp_compile.select_kept` with every policy. Shows the kept share of text and image tokens per
policy. (The compiler pass, which does this inside the compiled model, is `csp_compile.optimize`.)

    python examples/inspect_selection.py --family llava --budget 0.3 --text-len 48
"""

from __future__ import annotations

import argparse

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import csp_compile
from csp_compile.modality import IMAGE, TEXT, modality_ids
from csp_compile.tiny_vlms import FAMILIES, build_tiny_vlm, make_inputs

RECORDER = "csp_example_recorder"


def record_layers(model, inputs: dict) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """(query, key, mask) of every language-model attention layer during one prefill."""
    records: list = []

    def recorder(module, query, key, value, attention_mask, **kwargs):
        records.append((query.detach(), key.detach(), attention_mask))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(RECORDER, recorder)
    AttentionMaskInterface.register(RECORDER, sdpa_mask)
    language_model = model.model.language_model
    previous = language_model.config._attn_implementation
    language_model.config._attn_implementation = RECORDER
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        language_model.config._attn_implementation = previous
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llava", choices=FAMILIES)
    parser.add_argument("--budget", type=float, default=0.3)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=48)
    args = parser.parse_args()

    model = build_tiny_vlm(args.family)
    inputs = make_inputs(model, text_len=args.text_len)
    modality = modality_ids(model, inputs["input_ids"], token_type_ids=inputs.get("token_type_ids"))
    records = record_layers(model, inputs)
    length = modality.shape[-1]
    n_image = int((modality == IMAGE).sum())
    print(f"{args.family}: {length} prompt tokens, {n_image} image tokens, {len(records)} LM layers, "
          f"budget {args.budget}, window {args.window}")
    print(f"{'policy':<18}{'kept':>6}{'text kept':>12}{'image kept':>12}")
    for policy in csp_compile.available_policies():
        config = csp_compile.CSPConfig(budget=args.budget, window=args.window, policy=policy)
        kept = torch.zeros(length)
        for query, key, mask in records:
            mask = mask if mask is not None and mask.shape[-2] == length else None
            selection = csp_compile.select_kept(query, key, modality, config, mask=mask)
            kept += selection.keep_mask[0].float().mean(0)  # share of KV heads keeping each token
        kept /= len(records)
        text_share = float(kept[modality[0] == TEXT].mean())
        image_share = float(kept[modality[0] == IMAGE].mean()) if n_image else float("nan")
        print(f"{policy:<18}{float(kept.mean()):>6.2f}{text_share:>12.2f}{image_share:>12.2f}")


if __name__ == "__main__":
    main()

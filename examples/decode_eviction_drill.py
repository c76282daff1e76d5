"""Decode-time eviction on the shipped tiny VLM: a long answer read back from a compressed cache.

The shipped task's answers are two tokens, so ``decode_budget`` cannot change them (the first
compression follows the first decoded token at the earliest). Its "drill" prompts (text only, the
same 16 keys' A- and B-records, then RECALL) have 24-token answers: ``key a b`` for 8 of the keys.
The model names the values, not the keys (it was trained with the keys given), so the answer is
teacher-forced: every answer token is fed in its own call on the cache (the decode path, where
``decode_every`` counts), and a value is right when the model's argmax before it is that value.
Reports value accuracy per config, and per query (1st .. 8th), with the cache's slots at the end.

    python examples/decode_eviction_drill.py --n 200 --configs "budget=1.0" "budget=0.2" \
        "budget=1.0,decode_budget=0.2,decode_every=3"
"""

from __future__ import annotations

import argparse

import torch

import csp_compile
from csp_compile import CSPConfig
from csp_compile.data import load_model
from csp_compile.data.lookup import DRILL_QUERIES, collate, make_dataset

def parse_config(text: str) -> CSPConfig:
    """``"budget=0.2,decode_budget=40,decode_every=3"`` -> CSPConfig: a number with a dot is a float (a
    fraction for budgets), one without an int (tokens); anything else (policy, a cross-ratio rule) a string."""
    fields: dict = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            fields[name] = float(value) if "." in value else int(value)
        except ValueError:
            fields[name] = value
    return CSPConfig(**fields)


def teacher_forced(model, inputs: dict, answers: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(argmax before every answer token (n, A), physical slots of the first full-attention layer at the end)."""
    mask = inputs["attention_mask"]
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache, predictions = out.past_key_values, [out.logits[:, -1].argmax(-1)]
        for step in range(answers.shape[1] - 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
            out = model(input_ids=answers[:, step:step + 1], attention_mask=mask, cache=cache, use_cache=True)
            predictions.append(out.logits[:, -1].argmax(-1))
    return torch.stack(predictions, dim=1), cache.layers[0].keys.shape[-2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="drill prompts (test split)")
    parser.add_argument("--configs", nargs="+", default=["budget=1.0", "budget=0.2",
                                                         "budget=1.0,decode_budget=0.2,decode_every=3"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model()
    examples = make_dataset(args.n, "test", 0, task="drill")
    inputs = {k: v for k, v in collate(examples).items() if k in ("input_ids", "attention_mask")}
    answers = torch.stack([e.answer for e in examples])
    scored = torch.stack([e.scored for e in examples])
    print(f"{args.n} drill prompts of {inputs['input_ids'].shape[1]} tokens, {answers.shape[1]}-token answers")
    for text in args.configs:
        config = parse_config(text)
        csp_compile.optimize(model, config)
        try:
            predictions, slots = teacher_forced(model, inputs, answers)
        finally:
            csp_compile.restore(model)
        right = (predictions == answers) & scored
        per_query = right.view(args.n, DRILL_QUERIES, 3)[..., 1:].float().mean((0, 2))
        accuracy = right.sum().item() / scored.sum().item()
        print(f"{text:50s} value accuracy {accuracy:.3f}  slots at end {slots:3d}  per query "
              + " ".join(f"{v:.2f}" for v in per_query.tolist()), flush=True)


if __name__ == "__main__":
    main()

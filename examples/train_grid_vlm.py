"""Train the glyph-grid task's tiny VLM (csp_compile.data.grid) from scratch.

The same standard `LlavaForConditionalGeneration` as the lookup task's model (Llama text model
with GQA, tiny CLIP vision tower), built from config over the grid vocabulary, seeded and
reproducible; saved with `save_pretrained` (safetensors) together with `training_log.json`
(test accuracy, time, curve).

    python examples/train_grid_vlm.py                                # the shipped model
    python examples/train_grid_vlm.py --steps 300 --out /tmp/pilot   # a quick pilot
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from csp_compile.data.grid import BODY_MAX, BODY_MIN, IMAGE_TOKENS, Example, collate, make_dataset, make_example, patch_targets
from csp_compile.data.model import GRID_MODEL_DIR, build_grid_model


def answer_loss(model, examples: list[Example], patch_layer: int = 0) -> tuple[torch.Tensor, ...]:
    """Mean cross-entropy over the answer tokens, the per-example exact match, the per-column
    accuracy (teacher forced) and, with ``patch_layer`` > 0, the cross-entropy of naming, at every
    image token, its cell and glyph (``patch_targets``) from that LM layer's hidden state (logit
    lens: final norm + lm_head): a training aid that makes the image tokens say what they show."""
    batch = collate(examples, with_answer=True, padding_side="right")
    labels = batch.pop("labels")
    out = model.model(**batch, output_hidden_states=patch_layer > 0)
    patch = torch.zeros(())
    if patch_layer > 0:  # right padding: the image tokens are positions 1 .. IMAGE_TOKENS of every row
        hidden = model.model.language_model.norm(out.hidden_states[patch_layer][:, 1 : 1 + IMAGE_TOKENS])
        targets = torch.stack([patch_targets(e) for e in examples])
        patch = F.cross_entropy(model.lm_head(hidden).float().flatten(0, 1), targets.flatten())
    rows, cols = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
    logits = model.lm_head(out.last_hidden_state[rows, cols]).float()  # position t predicts token t + 1
    targets = labels[rows, cols + 1]
    wrong = (logits.argmax(-1) != targets).view(len(examples), -1)
    return F.cross_entropy(logits, targets), ~wrong.any(-1), (~wrong).float().mean(0), patch


@torch.no_grad()
def accuracy(model, examples: list[Example], batch_size: int = 50) -> float:
    """Exact match of every answer token; teacher-forced argmax = greedy decoding's exact match."""
    model.eval()
    hits = [answer_loss(model, examples[i : i + batch_size])[1] for i in range(0, len(examples), batch_size)]
    model.train()
    return float(torch.cat(hits).float().mean())


@torch.no_grad()
def generate_accuracy(model, examples: list[Example], batch_size: int = 50) -> float:
    """Exact match under `generate` (greedy, left padding): the number the eval reports."""
    hits = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = collate(chunk, padding_side="left")
        width = max(len(e.answer) for e in chunk)
        out = model.generate(**batch, max_new_tokens=width, min_new_tokens=width, do_sample=False)
        out = out[:, batch["input_ids"].shape[1]:]
        hits += [torch.equal(o[: len(e.answer)], e.answer) for o, e in zip(out, chunk)]
    return sum(hits) / len(hits)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, constant, then a cosine decay to a tenth of `--lr` over the last `--decay` steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = max(0.0, (step - (args.steps - args.decay)) / args.decay)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=GRID_MODEL_DIR)
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--batch", type=int, default=32, help="prompts per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--decay", type=int, default=500, help="final steps of cosine learning-rate decay")
    parser.add_argument("--patch-layer", type=int, default=1,
                        help="LM layer whose hidden state at each image token must name its cell and glyph (0: off)")
    parser.add_argument("--patch-weight", type=float, default=1.0)
    parser.add_argument("--short-body", type=int, default=0,
                        help="train on bodies of 0 .. 16 words for this many first steps (a curriculum; 0: off)")
    parser.add_argument("--target", type=float, default=0.99, help="stop once validation accuracy reaches it")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=55.0, help="stop training after this wall time (then test and save)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = build_grid_model(args.seed)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters; up to {args.steps} steps of {args.batch} prompts")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    test = make_dataset(args.test_size, "test", args.seed)
    val = make_dataset(args.test_size, "val", args.seed)
    curve, start, cpu_start = [], time.time(), time.process_time()
    for step in range(args.steps):
        body = (0, 16) if step < args.short_body else (BODY_MIN, BODY_MAX)
        examples = [make_example(step * args.batch + i, "train", args.seed, body=body) for i in range(args.batch)]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            answer, hit, per_column, patch = answer_loss(model, examples, args.patch_layer)
            loss = answer + args.patch_weight * patch
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 20 == 0:
            columns = " ".join(f"{a:.2f}" for a in per_column.tolist())
            print(f"step {step:5d}  body {body[1]:3d}  loss {answer.item():.3f} (patch {patch.item():.3f})  train acc {hit.float().mean():.2f} "
                  f"(per column {columns})  {time.time() - start:6.0f}s", flush=True)
        if step >= args.short_body and (step + 1) % args.eval_every == 0:
            acc = accuracy(model, val)
            curve.append({"step": step + 1, "seconds": round(time.time() - start, 1), "val_accuracy": acc})
            print(f"step {step + 1:5d}  validation accuracy {acc:.3f}", flush=True)
            if acc >= args.target:
                break
        if time.time() - start > 60 * args.max_minutes:
            print(f"stopping at step {step + 1}: --max-minutes {args.max_minutes} reached", flush=True)
            break
    train_seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start

    model.eval()
    final = generate_accuracy(model, test)
    print(f"trained in {train_seconds / 60:.1f} min ({cpu_seconds / 60:.1f} CPU min); "
          f"full-cache test accuracy (greedy generate) {final:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    log = {
        "test_accuracy": final,
        "steps": step + 1,
        "test_size": args.test_size,
        "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1),
        "parameters": params,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "curve": curve,
    }
    (args.out / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()

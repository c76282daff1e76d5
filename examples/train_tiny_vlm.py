"""Train the shipped tiny VLM on the image-keyed lookup task (csp_compile.data) from scratch.

A standard `LlavaForConditionalGeneration` (Llama text model with GQA, tiny CLIP vision tower)
built from config, trained on one CPU thread, seeded and reproducible; saved with
`save_pretrained` (safetensors) together with `training_log.json` (test accuracy, time, curve).

    python examples/train_tiny_vlm.py                      # the shipped model
    python examples/train_tiny_vlm.py --steps 300 --out /tmp/pilot   # a quick pilot
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers

from csp_compile.data.lookup import NUM_KEYS, NUM_VALUES
from csp_compile.data import NUM_RECORDS, VOCAB, Example, collate, make_dataset, make_example
from csp_compile.data.model import SHIPPED_MODEL_DIR, build_model


class FactoredRecords:
    """Ties each record token's embedding to (key-name embedding + value embedding) / sqrt(2)
    during training: ``route_grads`` moves the record rows' gradient onto the key and value rows
    (the chain rule of that sum) before the optimizer step, ``apply`` rewrites the record rows
    after it. A record then means the same key in every record that names it, so a key match
    learned on some values holds for all (untied, 1024 record embeddings each seen a few hundred
    times learn the key far slower). The saved model is a plain Llava: the rows are just values."""

    def __init__(self, model: transformers.LlavaForConditionalGeneration) -> None:
        self.weight = model.get_input_embeddings().weight
        keys, values, records = [], [], []
        for key in range(NUM_KEYS):
            for value in range(NUM_VALUES):
                keys += [VOCAB.key(key)] * 2
                values += [VOCAB.a(value), VOCAB.b(value)]
                records += [VOCAB.a_record(key, value), VOCAB.b_record(key, value)]
        self.keys, self.values, self.records = (torch.tensor(x) for x in (keys, values, records))
        self.apply()

    @torch.no_grad()
    def apply(self) -> None:
        self.weight[self.records] = (self.weight[self.keys] + self.weight[self.values]) / 2 ** 0.5

    @torch.no_grad()
    def route_grads(self) -> None:
        grad = self.weight.grad
        if grad is None:
            return
        moved = grad[self.records] / 2 ** 0.5
        grad.index_add_(0, self.keys, moved)
        grad.index_add_(0, self.values, moved)
        grad[self.records] = 0.0


def flag_loss(model, hidden: torch.Tensor, examples: list[Example]) -> torch.Tensor:
    """Cross-entropy of telling, at every record token, whether it is a record of the shown key
    (YES) or not (NO), from ``hidden`` (an intermediate layer's states, logit lens)."""
    ids = torch.nn.utils.rnn.pad_sequence([e.input_ids for e in examples], batch_first=True)
    is_record = (ids >= VOCAB.first_a_record) & (ids < VOCAB.first_a_record + 2 * NUM_KEYS * NUM_VALUES)
    target = torch.zeros_like(ids, dtype=torch.bool)
    for row, example in enumerate(examples):
        target[row, example.record] = True
    rows, cols = torch.nonzero(is_record, as_tuple=True)
    logits = model.lm_head(model.model.language_model.norm(hidden[rows, cols])).float()[:, [VOCAB.no, VOCAB.yes]]
    weight = torch.tensor([1.0, 4.0])
    return F.cross_entropy(logits, target[rows, cols].long(), weight=weight)


def answer_loss(model, examples: list[Example], probe_layer: int = 0, flag_layer: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over the scored answer tokens, the per-example exact match (teacher
    forced) and, with ``probe_layer`` > 0, the cross-entropy of naming the shown key from that
    layer's hidden state at the last prompt position (logit lens: final norm + lm_head)."""
    batch = collate(examples, with_answer=True, padding_side="right")
    labels = batch.pop("labels")
    out = model.model(**batch, output_hidden_states=probe_layer > 0 or flag_layer > 0)
    rows, cols = torch.nonzero(labels[:, 1:] != -100, as_tuple=True)
    logits = model.lm_head(out.last_hidden_state[rows, cols]).float()  # position t predicts token t + 1
    targets = labels[rows, cols + 1]
    miss = torch.zeros(len(examples), dtype=torch.int64).index_add_(0, rows, (logits.argmax(-1) != targets).long())
    probe = torch.zeros(())
    if probe_layer > 0:
        last = torch.tensor([len(e.input_ids) - 1 for e in examples])
        hidden = model.model.language_model.norm(out.hidden_states[probe_layer][torch.arange(len(examples)), last])
        probe = F.cross_entropy(model.lm_head(hidden).float(), torch.tensor([VOCAB.key(e.key) for e in examples]))
    if flag_layer > 0:
        probe = probe + flag_loss(model, out.hidden_states[flag_layer], examples)
    return F.cross_entropy(logits, targets), miss == 0, probe


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
        out = model.generate(**batch, max_new_tokens=width, do_sample=False)[:, batch["input_ids"].shape[1]:]
        hits += [torch.equal(o[: len(e.answer)], e.answer) for o, e in zip(out, chunk)]
    return sum(hits) / len(hits)


@dataclass
class Curriculum:
    """Records per prompt: start short, grow by `step` whenever the running exact-match accuracy of
    the lookup batches reaches `threshold` (deterministic: it only sees the seeded training stream)."""

    records: int
    full: int
    threshold: float
    step: int
    running: float = 0.0

    def update(self, accuracy: float) -> None:
        self.running = 0.9 * self.running + 0.1 * accuracy
        if self.running >= self.threshold and self.records < self.full:
            self.records, self.running = min(self.full, self.records + self.step), 0.0


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up, constant, then a cosine decay to a tenth of `--lr` over the last `--decay` steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = max(0.0, (step - (args.steps - args.decay)) / args.decay)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SHIPPED_MODEL_DIR)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=32, help="lookup prompts per step")
    parser.add_argument("--drill-batch", type=int, default=16, help="auxiliary text-only recall prompts per step")
    parser.add_argument("--name-batch", type=int, default=16, help="auxiliary name-the-image prompts per step")
    parser.add_argument("--name-weight", type=float, default=2.0)
    parser.add_argument("--probe-layer", type=int, default=2,
                        help="LM layer whose hidden state at '?' must already name the shown key (0: off)")
    parser.add_argument("--flag-layer", type=int, default=2,
                        help="LM layer whose hidden state at each record must say whether it is the shown key's (0: off)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--records", type=int, default=NUM_RECORDS, help="records of a full-length prompt")
    parser.add_argument("--start-records", type=int, default=1)
    parser.add_argument("--grow-at", type=float, default=0.8, help="running lookup accuracy that lengthens prompts")
    parser.add_argument("--grow-by", type=int, default=3, help="records added each time")
    parser.add_argument("--decay", type=int, default=600, help="final steps of cosine learning-rate decay")
    parser.add_argument("--target", type=float, default=0.99, help="stop once full-length validation accuracy reaches it")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tie-records", type=int, default=1, help="1: record embedding = key + value while training (FactoredRecords)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-minutes", type=float, default=55.0, help="stop training after this wall time (then test and save)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model = build_model(args.seed)
    tied = FactoredRecords(model) if args.tie_records else None
    model.train()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters; {args.steps} steps of {args.batch} + {args.name_batch} prompts")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    test = make_dataset(args.test_size, "test", args.seed, num_records=args.records)
    val = make_dataset(args.test_size, "val", args.seed, num_records=args.records)
    curriculum = Curriculum(args.start_records, args.records, args.grow_at, args.grow_by)
    curve, start, cpu_start = [], time.time(), time.process_time()
    for step in range(args.steps):
        records = curriculum.records
        lookup = [make_example(step * args.batch + i, "train", args.seed, num_records=records) for i in range(args.batch)]
        drills = [make_example(step * args.drill_batch + i, "train", args.seed, num_records=records, task="drill")
                  for i in range(args.drill_batch)]
        names = [make_example(step * args.name_batch + i, "train", args.seed, task="name") for i in range(args.name_batch)]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lookup_loss, lookup_hit, probe_loss = answer_loss(model, lookup, args.probe_layer, args.flag_layer)
            drill_loss, drill_hit, _ = answer_loss(model, drills)
            name_loss, name_hit, _ = answer_loss(model, names)
            loss = lookup_loss + probe_loss + drill_loss + args.name_weight * name_loss
        loss.backward()
        if tied:
            tied.route_grads()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if tied:
            tied.apply()
        optimizer.zero_grad(set_to_none=True)
        curriculum.update(float(lookup_hit.float().mean()))
        if step % 20 == 0:
            print(f"step {step:5d}  records {records:2d}  loss {lookup_loss.item():.3f} (probe {probe_loss.item():.3f}, "
                  f"drill {drill_loss.item():.3f}, "
                  f"name {name_loss.item():.3f})  train acc {lookup_hit.float().mean():.2f} (drill "
                  f"{drill_hit.float().mean():.2f}, name {name_hit.float().mean():.2f})  "
                  f"{time.time() - start:6.0f}s", flush=True)
        if records == args.records and (step + 1) % args.eval_every == 0:
            acc = accuracy(model, val)
            curve.append({"step": step + 1, "records": records, "seconds": round(time.time() - start, 1),
                          "val_accuracy": acc})
            print(f"step {step + 1:5d}  validation accuracy {acc:.3f}", flush=True)
            if acc >= args.target:
                break
        if time.time() - start > 60 * args.max_minutes:
            print(f"stopping at step {step + 1}: --max-minutes {args.max_minutes} reached", flush=True)
            break
    train_seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start

    model.eval()
    final = generate_accuracy(model, test)
    print(f"trained in {train_seconds / 60:.1f} min ({cpu_seconds / 60:.1f} CPU min); full-cache test accuracy (greedy generate) {final:.3f}")
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

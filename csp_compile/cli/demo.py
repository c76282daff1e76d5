"""``csp-compile demo``: a shipped tiny VLM answering test prompts with the full cache and with CSP."""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from csp_compile.cli.common import add_model_argument, add_task_argument, get_task_or_fail, load_model_or_fail, set_threads

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from csp_compile.config import CSPConfig
    from csp_compile.evaluation import EvalSet

HELP = ("answer a few held-out prompts with a shipped tiny VLM, full cache vs CSP (default config); with a text "
        "model (--model smollm2): a chat and a pass-key question")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_task_argument(parser)
    parser.add_argument("--n", type=int, default=6, help="test prompts to answer (default 6)")
    parser.add_argument("--budget", type=float, default=None, help="fraction of the prompt kept (default: CSPConfig's)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    import torch

    from csp_compile.config import CSPConfig
    from csp_compile.evaluation import run_config, run_full
    from csp_compile.modality import is_text_only

    task = get_task_or_fail(args.task)
    render_tokens = task.data.render_tokens
    if not 1 <= args.n <= 64:
        raise ValueError(f"--n must be in 1 .. 64: got {args.n}")
    config = CSPConfig() if args.budget is None else CSPConfig(budget=args.budget)
    set_threads(args.threads)
    _started[0] = time.perf_counter()
    model, source = load_model_or_fail(args.model, task)
    if is_text_only(model):
        from csp_compile.cli.text_demo import load_tokenizer_or_fail, run_demo

        return run_demo(model, load_tokenizer_or_fail(args.model), source, config)
    if not task.is_task_model(model):
        raise ValueError(f"{source} is not a model of the {task.name} task: demo --task {task.name} needs its shipped "
                         f"tiny VLM (or one trained by {task.train_script}); use `csp-compile eval --model` for others")
    evalset = task.eval_set(args.n)
    print(f"model: {source}")
    print(f"config: budget={config.budget} window={config.window} cross_ratio={config.cross_ratio} policy={config.policy}")
    _stage("answering with the full cache")
    full = run_full(model, evalset)
    _stage("answering with CSP (the first call compiles the language model: about a minute on 2 cores)")
    pruned = run_config(model, evalset, config)
    _stage(None)
    answers = evalset.answers
    width = max(len(render_tokens(answers[0])), len("full cache")) + 2
    print(f"\n{task.prompt_header:<44}{'expected':<{width}}{'full cache':<{width}}CSP")
    for i in range(len(evalset)):
        ids = evalset.inputs["input_ids"][i][evalset.inputs["attention_mask"][i].bool()]
        text = render_tokens(ids)
        short = text if len(text) <= 40 else text[:24] + " ... " + text[-11:]
        marks = ["" if torch.equal(row[i], answers[i]) else " (wrong)" for row in (full.tokens, pruned.tokens)]
        print(f"{short:<44}{render_tokens(answers[i]):<{width}}{render_tokens(full.tokens[i]) + marks[0]:<{width}}"
              f"{render_tokens(pruned.tokens[i]) + marks[1]}")
    accuracy = [float((o.tokens == answers).all(-1).float().mean()) for o in (full, pruned)]
    length = float(evalset.inputs["attention_mask"].sum(-1).float().mean())
    print(f"\n{task.answer_explained}")
    print(f"accuracy: full cache {accuracy[0]:.2f}, CSP {accuracy[1]:.2f} on {len(evalset)} prompts of {length:.0f} tokens")
    print(f"kept fraction (measured from the cache): {pruned.kept_fraction:.3f}")
    print(f"KV cache after prefill: {pruned.cache_bytes / 1024:.1f} KiB with CSP vs {full.cache_bytes / 1024:.1f} KiB "
          f"full: {100 * (1 - pruned.cache_bytes / full.cache_bytes):.0f}% saved")
    if task.name == "lookup":
        _two_turns(model, evalset, config)
    else:
        print("(the two-turn conversation part of the demo is written for the lookup task: run `csp-compile demo`)")
    return 0


_started = [time.perf_counter()]


def _stage(what: str | None) -> None:
    """Progress on stderr (the results go to stdout): what runs now, and the time so far."""
    elapsed = time.perf_counter() - _started[0]
    print(f"[{elapsed:5.0f} s] {what}" if what else f"[{elapsed:5.0f} s] done", file=sys.stderr, flush=True)


def _two_turns(model: PreTrainedModel, evalset: EvalSet, config: CSPConfig) -> None:
    """The second part: a two-turn conversation, full cache vs CSP "evict" vs CSP "append"."""
    import textwrap

    import torch

    from csp_compile.data import render_tokens
    from csp_compile.evaluation.conversation import CHATTER, recomputed_second_answers, run_conversation, wrong_answers

    answers = evalset.answers
    _stage("two turns with the full cache")
    full = run_conversation(model, evalset)
    _stage("two turns with CSP, on_new_turn=\"evict\" (compiles the second-turn graphs)")
    evict = run_conversation(model, evalset, config.replace(on_new_turn="evict"))
    _stage("two turns with CSP, on_new_turn=\"append\" (compiles again)")
    append = run_conversation(model, evalset, config.replace(on_new_turn="append"))
    _stage("a control: turn 2 after a wrong turn-1 answer, full cache")
    decoy = recomputed_second_answers(model, evalset, wrong_answers(answers))
    _stage(None)

    def answer(tokens: torch.Tensor, i: int) -> str:
        return render_tokens(tokens[i]) + ("" if torch.equal(tokens[i], answers[i]) else " (wrong)")

    rows = [[answer(full.first.tokens, i), answer(full.second.tokens, i), answer(evict.first.tokens, i),
             answer(evict.second.tokens, i), answer(append.second.tokens, i)]
            + [f"{int(t.seen[i])}/{int(t.slots[i])}" for t in (evict.first, evict.second, append.second)]
            for i in range(len(evalset))]
    width = max(len(cell) for row in rows for cell in row) + 2
    header = ["turn 1", "turn 2", "turn 1", "evict 2", "append 2", "turn 1", "evict 2", "append 2"]
    print(f"\ntwo-turn conversation: the same prompts; turn 2 = the conversation so far + {CHATTER} filler "
          "words + the question \"?\" again")
    print(f"{'':8}{'full cache':<{2 * width}}{'CSP':<{3 * width}}CSP cache: tokens seen / slots held")
    print(f"{'prompt':<8}" + "".join(f"{h:<{width}}" for h in header).rstrip())
    for i, row in enumerate(rows):
        print(f"#{i:<7}" + "".join(f"{cell:<{width}}" for cell in row).rstrip())
    accuracy = [float((t.tokens == answers).all(-1).float().mean()) for t in (full.second, evict.second, append.second)]
    held = int((decoy == answers).all(-1).sum())
    print(textwrap.fill(
        "the task asks one question per image (the shown key's values) and the shipped model does not answer a "
        "question about another key in a conversation (it was trained on image-keyed lookups), so turn 2 asks the same question "
        "again. The model answers it from the records, not by copying its turn-1 answer: with a wrong turn-1 answer "
        f"forced into the history, the full-cache model still answers the records' values on {held}/{len(evalset)} "
        "prompts. With CSP, turn 2 is prefilled on the pruned cache, so both of its answer tokens are read back from "
        "what the cache kept", width=116))
    print(f"turn-2 accuracy: full cache {accuracy[0]:.2f}, CSP evict {accuracy[1]:.2f}, CSP append {accuracy[2]:.2f} "
          f"on {len(evalset)} prompts")
    print(f"cache slots after turn 2 (mean per prompt): full {full.second.slots.float().mean():.0f}, "
          f"CSP evict {evict.second.slots.float().mean():.0f} (re-selects budget {config.budget} of the tokens seen), "
          f"CSP append {append.second.slots.float().mean():.0f} (keeps turn 1's slots and adds turn 2's tokens)")

"""``csp-compile eval`` on a text model: the long-context retrieval tasks (``csp_compile.real``)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from csp_compile.cli import CLIError
from csp_compile.cli.common import load_model_or_fail, progress_bar, resolve_model_or_fail, set_threads

__all__ = ["PRESETS", "add_real_arguments", "is_real_task_run", "run_real"]

# --preset small: a few minutes on 2 cores; full: the published tables (hours on 2 cores, see docs/evals.md)
PRESETS = {
    "full": dict(lengths="1024,2048,4096", n=50, policies=None, budgets="0.05,0.1,0.2,0.4"),
    "small": dict(lengths="1024,2048", n=10, policies="csp,snapkv,h2o,streaming,random", budgets="0.1,0.2"),
}


def add_real_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", default=None, metavar="L[,L2,...]",
                        help="text models: prompt lengths in tokens (default 1024,2048,4096)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="full",
                        help="text models: full (every policy, 4 budgets, 3 lengths, n 50: hours on 2 cores) or small "
                             "(5 policies, budgets 0.1/0.2, 1k/2k tokens, n 10: minutes); explicit options win")
    parser.add_argument("--log", type=Path, default=None, metavar="FILE",
                        help="text models: one JSON line per scored prompt; a later run with the same FILE, task, "
                             "--n and --seed reuses them (resume an interrupted or --max-minutes run)")
    parser.add_argument("--max-minutes", type=float, default=None, metavar="M",
                        help="text models: start no new prompt after M minutes; the records then say the n scored")


def is_real_task_run(args: argparse.Namespace) -> bool:
    """True for a real-model task (``--task passkey``), or no ``--task`` and a text-only ``--model``."""
    from csp_compile.real.tasks import REAL_TASKS

    if args.task is not None:
        return args.task in REAL_TASKS
    if args.model is None:
        return False
    import transformers

    from csp_compile.modality import is_text_only

    directory = resolve_model_or_fail(args.model)
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception:  # load_model_or_fail gives the one-line error for what cannot load
        return False
    return is_text_only(config)


def _lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",")]
    except ValueError:
        raise CLIError(f"--lengths: expected comma-separated ints >= 64, got {text!r}") from None
    if not lengths or min(lengths) < 64:
        raise CLIError(f"--lengths: expected comma-separated ints >= 64, got {text!r}")
    return lengths


def run_real(args: argparse.Namespace) -> int:
    """Evaluate every (policy, window, budget) on the task's prompts; print, and write JSON / plots."""
    from csp_compile.data.model import load_tokenizer
    from csp_compile.evaluation import parse_budgets, parse_policies
    from csp_compile.evaluation.report import REAL_COLUMNS, format_table, plot_real_accuracy
    from csp_compile.modality import is_text_only
    from csp_compile.real.evaluate import DEFAULT_REAL_POLICIES, evaluate_real
    from csp_compile.real.tasks import get_real_task

    if args.model is None:
        raise CLIError(f"--task {args.task}: needs a text model: --model smollm2 (run `csp-compile prepare smollm2` "
                       "once) or a directory")
    task = get_real_task(args.task or "passkey")
    preset = PRESETS[args.preset]
    lengths = _lengths(args.lengths or preset["lengths"])
    n = args.n if args.n is not None else preset["n"]
    if n < 1:
        raise CLIError(f"--n must be >= 1: got {n}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise CLIError(f"--max-minutes must be > 0: got {args.max_minutes}")
    specs = parse_policies(args.policies or preset["policies"] or DEFAULT_REAL_POLICIES)
    budgets = parse_budgets(args.budgets or preset["budgets"])
    windows = [args.window] if args.window is not None else sorted({32, task.window})
    if args.engine != "transformers" or args.prefill_chunk:
        raise CLIError("--engine vllm and --prefill-chunk are not supported on the text-model tasks")
    set_threads(args.threads)
    model, source = load_model_or_fail(args.model)
    if not is_text_only(model):
        raise CLIError(f"--task {task.name}: needs a text-only causal LM; --model {args.model} is a "
                       f"{type(model).__name__}")
    tokenizer = load_tokenizer(resolve_model_or_fail(args.model))
    if not getattr(tokenizer, "chat_template", None):
        raise CLIError(f"--model {args.model}: its tokenizer has no chat template, which the {task.name} prompts use")
    print(f"model: {source}\ndata: {task.summary}, {n} prompts per length {lengths}, needle depths spread over the "
          f"prompt; windows {windows}")
    started = time.perf_counter()
    with progress_bar(n * len(lengths), "eval") as bar:
        records = evaluate_real(model, tokenizer, task, lengths=lengths, n=n, specs=specs, budgets=budgets,
                                windows=windows, seed=args.seed, log=args.log, max_minutes=args.max_minutes,
                                progress=lambda label: (bar.set_postfix_str(label), bar.update()))
    print(format_table(records, REAL_COLUMNS))
    print(f"took {time.perf_counter() - started:.0f} s")
    short = sorted({r["length"]: r["n"] for r in records if r["n"] < n}.items())
    if short:
        print(f"scored fewer than --n {n} prompts (--max-minutes): " + ", ".join(f"{k} at {length}" for length, k in short))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": source, "task": task.name, "data": task.summary, "windows": windows,
                   "evaluated_by": "replay: one recorded prefill per prompt, the reference selection per config, the "
                                   "answer teacher-forced on the pruned cache (equal to the compiled pass's tokens)",
                   "kl_over": "the answer tokens read from the pruned cache (all but the first), teacher-forced",
                   "records": records}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        for window in windows:
            path = args.plot.with_name(f"{args.plot.stem}_w{window}{args.plot.suffix}")
            plot_real_accuracy(records, path, window, title=f"{source.split(' (')[0]}: {task.summary}")
            print(f"wrote {path}")
    return 0


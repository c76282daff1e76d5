"""``csp-compile eval``: accuracy, KL and agreement with the full cache per policy and budget."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from csp_compile.cli.common import (
    add_model_argument,
    add_task_argument,
    get_task_or_fail,
    load_model_or_fail,
    progress_bar,
    set_threads,
)
from csp_compile.evaluation import eval_set_for, evaluate, parse_budgets, parse_policies, parse_prefill_chunks
from csp_compile.evaluation.report import format_table, plot_accuracy
from csp_compile.tasks import DEFAULT_TASK

HELP = ("evaluate eviction policies and budgets: on a VLM's task through the compiled pass (default: the shipped tiny "
        "VLM), or on a text model's long-context retrieval tasks (--model smollm2 --task passkey)")
DEFAULT_POLICIES = "csp,csp:population,csp:mass,snapkv,h2o,streaming,lookm_text_prior,random"
DEFAULT_BUDGETS = "0.05,0.1,0.2,0.4"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from csp_compile.cli.evaluate_real import add_real_arguments

    add_model_argument(parser)
    add_task_argument(parser)
    parser.set_defaults(task=None)  # resolved per model: lookup for a VLM, passkey for a text model
    parser.add_argument("--policies", default=None,
                        help=f"comma-separated policies; csp:<rule> sets the cross-ratio rule (default {DEFAULT_POLICIES}; "
                             "text models: every policy and alias)")
    parser.add_argument("--budgets", default=None, help=f"comma-separated fractions in (0, 1] (default {DEFAULT_BUDGETS})")
    parser.add_argument("--prefill-chunk", default=None, metavar="C[,C2,...]",
                        help="also evaluate every policy and budget with chunked prefill, C prompt tokens per chunk "
                             "(comma-separated ints >= 1; default: one-shot prefill only)")
    parser.add_argument("--n", type=int, default=None, help="test prompts (default 200; text models: 50 per length)")
    parser.add_argument("--window", type=int, default=None,
                        help="observation window (default: CSPConfig's; text models: 32 and the task's own window)")
    parser.add_argument("--seed", type=int, default=0, help="test-set seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=256, help="prompts per generate call (default 256)")
    parser.add_argument("--json", type=Path, default=None, help="write the records as JSON here")
    parser.add_argument("--plot", type=Path, default=None, help="write accuracy against budget as PNG here")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                        help="transformers (optimize + generate, default) or vllm (the csp_compile.vllm plugin; run "
                             "in the environment of scripts/install_vllm.sh; the lookup task's model only)")
    add_real_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from csp_compile.cli.evaluate_real import is_real_task_run, run_real
    from csp_compile.config import CSPConfig

    if is_real_task_run(args):
        return run_real(args)
    task = get_task_or_fail(args.task or DEFAULT_TASK)
    args.n = 200 if args.n is None else args.n
    specs, budgets = parse_policies(args.policies or DEFAULT_POLICIES), parse_budgets(args.budgets or DEFAULT_BUDGETS)
    chunks = parse_prefill_chunks(args.prefill_chunk)
    if args.n < 1:
        raise ValueError(f"--n must be >= 1: got {args.n}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1: got {args.batch_size}")
    base = CSPConfig() if args.window is None else CSPConfig(window=args.window)
    set_threads(args.threads)
    runs = 1 + len(budgets) * sum(spec.policy != "full" for spec in specs) * (1 + len(chunks))
    if args.engine == "vllm":
        if task.name != "lookup":
            raise ValueError(f"--engine vllm supports --task lookup only: got --task {task.name}")
        if chunks:
            raise ValueError("--prefill-chunk is not supported with --engine vllm")
        from csp_compile.vllm.cli import run_eval

        source, description, records = run_eval(args.model, args.n, args.seed, specs, budgets, base, runs)
        task_name = task.name
    else:
        model, source = load_model_or_fail(args.model, task)
        evalset = eval_set_for(model, args.n, args.seed, task.name)
        description = evalset.description
        task_name = task.name if evalset.answers is not None else None  # None: synthetic prompts, no task
        print(f"model: {source}\ndata: {description}")
        with progress_bar(runs, "eval") as bar:
            records = evaluate(model, evalset, specs, budgets, base, batch_size=args.batch_size, prefill_chunks=chunks,
                               progress=lambda label: (bar.set_postfix_str(label), bar.update()))
    print(format_table(records))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"model": source, "data": description, "window": base.window,
                   "task": task_name,
                   "kl_and_agreement_at": "first decode step (answer token 2, read from the pruned cache)",
                   "records": records}
        if args.engine == "vllm":
            payload["engine"] = "vllm"
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot_accuracy(records, args.plot, title=f"{source}: {description.split(' (')[0]}")
        print(f"wrote {args.plot}")
    return 0

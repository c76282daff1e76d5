"""``csp-compile bench``: measure what CSP costs at prefill and gains at decode, as ratios.

Thin: arguments and printing. The measurements live in ``csp_compile.bench``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from csp_compile.cli import CLIError

HELP = "benchmark CSP: prefill overhead, scoring speed, peak memory, decode speedup (ratios, one process)"

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# --quick: smaller model, shorter prompts, fewer repeats (a few minutes on 2 cores at most)
_QUICK = dict(prompt=512, long_prompt=1024, chunk_prompt=2048, prefill_chunk=256, overhead_processes=1,
              scoring_repeats=5, new_tokens=6, decode_rounds=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the results as one flat JSON object")
    parser.add_argument("--quick", action="store_true",
                        help="a much smaller run: half-size model, 512/1024-token prompts, fewer repeats")
    parser.add_argument("--threads", type=int, metavar="N", help="torch threads (default: all cores)")
    parser.add_argument("--device", default=None, metavar="DEVICE",
                        help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--budget", type=float, default=0.2, help="kept fraction of the prompt, in (0, 1) (default 0.2)")
    parser.add_argument("--dtype", default="float32", metavar="DTYPE", help=f"one of {', '.join(_DTYPES)}")
    parser.add_argument("--prompt", type=int, metavar="TOKENS",
                        help="prompt length for prefill and scoring (default 4096; --quick 512)")
    parser.add_argument("--long-prompt", type=int, metavar="TOKENS",
                        help="prompt length for decode, memory and KV bytes (default 8192; --quick 1024)")
    parser.add_argument("--chunk-prompt", type=int, metavar="TOKENS",
                        help="prompt length for the chunked-prefill memory figure (default 32768; --quick 2048)")
    parser.add_argument("--prefill-chunk", type=int, metavar="TOKENS",
                        help="chunk size of the chunked prefill (default 2048; --quick 256)")
    parser.add_argument("--layers", type=int, metavar="N", help="language-model layers (default 4; --quick 2)")
    parser.add_argument("--repeats", type=int, metavar="N",
                        help="prefill-overhead rounds per process, one timed prefill per variant each (default 2; "
                             "--engine vllm: timed prefill steps, default 3)")
    parser.add_argument("--overhead-processes", type=int, metavar="N",
                        help="fresh processes the prefill-overhead rounds run in (default 3; --quick 1)")
    parser.add_argument("--new-tokens", type=int, metavar="N",
                        help="tokens generated per decode run, the first 2 untimed (default 16; --quick 6)")
    parser.add_argument("--model", default=None, metavar="smollm2|DIR",
                        help="bench a real pretrained causal LM instead of the random-weight bench Llava: smollm2 "
                             "(run `csp-compile prepare smollm2` once) or a local directory; prefill 2k/4k/8k, decode "
                             "256/2k/8k x batch 1/8 (--quick: 1k/2k, batch 1; --long: prefill 4k/8k and decode "
                             "256/8k, batch 1); see docs/bench_smollm2.md")
    parser.add_argument("--long", action="store_true",
                        help="with --model: only the judged long lengths at batch 1 (prefill 4k/8k, decode 256/8k)")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="with --model: also write the tables as markdown")
    parser.add_argument("--max-batch-tokens", type=int, metavar="N",
                        help="with --model: skip decode cases of batch > 1 whose batch x prompt exceeds N tokens (default 16384)")
    parser.add_argument("--requests", type=int, metavar="N",
                        help="--engine vllm: requests in the concurrency workload (default 40)")
    parser.add_argument("--full-capacity", type=int, metavar="N",
                        help="--engine vllm: full-cache requests the KV memory is sized to hold (default 8)")
    parser.add_argument("--window", type=int, metavar="N", help="--engine vllm: CSP's observation window (default 8)")
    parser.add_argument("--engine", choices=("transformers", "vllm"), default="transformers",
                        help="transformers (the compiled pass, default) or vllm (the csp_compile.vllm plugin on the "
                             "shipped tiny VLM or --model: blocks per request, concurrency, throughput and prefill ratios under "
                             "one KV memory; run in the environment of scripts/install_vllm.sh; its defaults: --prompt "
                             "2048 --new-tokens 256 --repeats 3, --quick: 1024 and 32)")


def _device(name: str | None) -> str:
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise CLIError(f"--device {name!r}: allowed cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA device is available here (torch.cuda.is_available() is False)")
    return name


def _settings(args: argparse.Namespace):
    from csp_compile.bench import BENCH_SHAPE, QUICK_SHAPE, BenchSettings

    if not math.isfinite(args.budget) or not 0.0 < args.budget < 1.0:
        raise CLIError(f"--budget {args.budget}: allowed a fraction in (0, 1)")
    if args.dtype not in _DTYPES:
        raise CLIError(f"--dtype {args.dtype!r}: allowed {', '.join(_DTYPES)}")
    for flag in ("threads", "prompt", "long_prompt", "chunk_prompt", "prefill_chunk", "layers", "repeats",
                 "overhead_processes", "new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CLIError(f"--{flag.replace('_', '-')} {value}: allowed a positive integer")
    device = _device(args.device)
    if _DTYPES[args.dtype] != torch.float32 and device == "cpu":
        raise CLIError(f"--dtype {args.dtype}: on cpu the bench runs float32 only")
    base = dict(_QUICK) if args.quick else {}
    shape = QUICK_SHAPE if args.quick else BENCH_SHAPE
    if args.layers is not None:
        shape = shape.replace(num_hidden_layers=args.layers)
    overrides = {"prompt": args.prompt, "long_prompt": args.long_prompt, "prefill_repeats": args.repeats,
                 "overhead_processes": args.overhead_processes,
                 "new_tokens": args.new_tokens, "chunk_prompt": args.chunk_prompt, "prefill_chunk": args.prefill_chunk}
    base.update({k: v for k, v in overrides.items() if v is not None})
    if args.quick and args.prompt is not None and args.long_prompt is None:
        base["long_prompt"] = max(base["long_prompt"], args.prompt)
    return BenchSettings(shape=shape, budget=args.budget, device=device, dtype=_DTYPES[args.dtype],
                         threads=args.threads, quick=args.quick, **base)


def _write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {path}")


def _run_vllm(args: argparse.Namespace) -> int:
    from csp_compile.vllm.cli import format_bench, run_bench

    from csp_compile.cli.common import resolve_model_or_fail

    quick = dict(prompt=1024, new_tokens=32, repeats=2) if args.quick else {}
    overrides = {**quick, "budget": args.budget, "repeats": args.repeats}
    names = ("prompt", "new_tokens", "requests", "full_capacity", "window")
    overrides.update({k: getattr(args, k) for k in names if getattr(args, k) is not None})
    result = run_bench(resolve_model_or_fail(args.model), overrides)
    print(format_bench(result))
    _write_json(args.json, result)
    return 0


_VLLM_ONLY = ("requests", "full_capacity", "window")
_TINY_ONLY = ("prompt", "long_prompt", "chunk_prompt", "prefill_chunk", "layers", "repeats", "overhead_processes")


def _real_settings(args: argparse.Namespace):
    from csp_compile.bench.real import PRESETS, RealSettings
    from csp_compile.cli.common import resolve_model_or_fail

    for flag in _TINY_ONLY:
        if getattr(args, flag) is not None:
            raise CLIError(f"--{flag.replace('_', '-')}: not used with --model (the real-model bench sets its lengths)")
    if not math.isfinite(args.budget) or not 0.0 < args.budget < 1.0:
        raise CLIError(f"--budget {args.budget}: allowed a fraction in (0, 1)")
    for flag in ("threads", "new_tokens", "max_batch_tokens"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CLIError(f"--{flag.replace('_', '-')} {value}: allowed a positive integer")
    if args.device not in (None, "cpu") or args.dtype != "float32":
        raise CLIError("--device/--dtype: the real-model bench runs on cpu in float32")
    if args.quick and args.long:
        raise CLIError("--quick and --long: pick one")
    path = resolve_model_or_fail(args.model)
    if not (path / "config.json").is_file():
        raise CLIError(f"--model {args.model}: {str(path)!r} holds no config.json (a save_pretrained directory)")
    preset = "quick" if args.quick else "long" if args.long else "full"
    options = dict(PRESETS[preset], budget=args.budget, threads=args.threads, preset=preset, model_name=args.model)
    if args.new_tokens is not None:
        options["new_tokens"] = args.new_tokens
    if args.max_batch_tokens is not None:
        options["max_batch_tokens"] = args.max_batch_tokens
    return RealSettings(model=path, **options)


def _run_real(args: argparse.Namespace) -> int:
    settings = _real_settings(args)
    from csp_compile.bench.real import format_markdown, run_real_bench

    result = _with_progress_bar(run_real_bench, settings)
    table = format_markdown(result)
    print(table)
    _write_json(args.json, result)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
        print(f"wrote {args.markdown}")
    return 0


def _with_progress_bar(bench, settings):
    """``bench(settings, progress=..., steps_total=...)`` under a tqdm bar of its steps on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=0, desc="csp-compile bench", unit="step", file=sys.stderr, dynamic_ncols=True)
    started: list[str] = []

    def progress(description: str) -> None:
        if started:
            bar.update(1)
        started.append(description)
        bar.set_postfix_str(description)

    try:
        result = bench(settings, progress=progress, steps_total=lambda n: setattr(bar, "total", n))
        bar.update(1)
    finally:
        bar.close()
    return result


def run(args: argparse.Namespace) -> int:
    if args.engine != "vllm" and any(getattr(args, k) is not None for k in _VLLM_ONLY):
        raise CLIError("--requests/--full-capacity/--window: only with --engine vllm")
    if args.engine == "vllm":
        return _run_vllm(args)
    if args.model is not None:
        return _run_real(args)
    if args.markdown is not None or args.max_batch_tokens is not None or args.long:
        raise CLIError("--markdown/--max-batch-tokens/--long: only with --model")
    settings = _settings(args)
    from csp_compile.bench import format_table, run_bench

    result = _with_progress_bar(run_bench, settings)
    print(format_table(result))
    _write_json(args.json, result)
    return 0

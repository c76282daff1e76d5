"""The ``csp-compile`` command line (also ``python -m csp_compile``).

Each subcommand is one module in ``csp_compile.cli`` listed in ``SUBCOMMANDS``; a module exposes
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``. A ``CLIError`` (or a
``ValueError`` / ``FileNotFoundError`` from the library) becomes one line on stderr and exit code 2,
never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

__all__ = ["CLIError", "SUBCOMMANDS", "main"]

# subcommand name -> module under csp_compile.cli
SUBCOMMANDS: dict[str, str] = {
    "bench": "csp_compile.cli.bench",
    "demo": "csp_compile.cli.demo",
    "eval": "csp_compile.cli.evaluate",
    "prepare": "csp_compile.cli.prepare",
    "show-kept": "csp_compile.cli.show_kept",
}


class CLIError(Exception):
    """A user error: the message says what was wrong and what is allowed."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="csp-compile", description="Cross-Self Pruning of VLM KV caches as a torch.compile pass."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the subcommand, return its exit code."""
    args = _parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, NotImplementedError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"csp-compile {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"csp-compile {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

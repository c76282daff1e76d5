"""Pieces the subcommands share: the --model and --task arguments, loading, threads, the progress bar."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Iterator

__all__ = ["add_model_argument", "add_task_argument", "get_task_or_fail", "load_model_or_fail", "progress_bar",
           "set_threads"]


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="local save_pretrained directory of a VLM (default: the shipped model of --task)")


def add_task_argument(parser: argparse.ArgumentParser) -> None:
    from csp_compile.tasks import DEFAULT_TASK, TASKS

    parser.add_argument("--task", default=DEFAULT_TASK,
                        help=f"shipped task: {', '.join(TASKS)} (default {DEFAULT_TASK}): its test prompts and, "
                             "without --model, its shipped model")


def get_task_or_fail(name: str):
    """The task called ``name``; a CLIError naming --task, the value and the allowed names otherwise."""
    from csp_compile.cli import CLIError
    from csp_compile.tasks import get_task

    try:
        return get_task(name, "--task")
    except ValueError as error:
        raise CLIError(str(error)) from None


def load_model_or_fail(path: Path | None, task=None):
    """(model, description); a CLIError naming --model, the path and what it must hold when it cannot
    load (missing directory, no or corrupt config.json, missing or corrupt weights, not a VLM).
    Without ``path``, the shipped model of ``task`` (default: the lookup task's)."""
    from csp_compile.cli import CLIError
    from csp_compile.tasks import DEFAULT_TASK, get_task

    task = task or get_task(DEFAULT_TASK)
    try:
        model = task.load_model(path)
    except (FileNotFoundError, ValueError) as error:
        if path is None:  # the shipped model is missing: the message already says to pass --model DIR
            raise
        raise CLIError(f"--model: {error}") from None
    source = f"the shipped tiny VLM of the {task.name} task" if path is None else str(path)
    if path is None:
        source += f" ({task.model_dir.name}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters)"
    return model, source


def set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1: got {threads}")
        torch.set_num_threads(threads)


@contextlib.contextmanager
def progress_bar(total: int, label: str) -> Iterator:
    """A tqdm bar of ``total`` steps on stderr (stdout keeps the table clean)."""
    from tqdm import tqdm

    with tqdm(total=total, desc=label, file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar

"""Pieces the subcommands share: the --model and --task arguments, loading, threads, the progress bar."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Iterator

__all__ = ["add_model_argument", "add_task_argument", "get_task_or_fail", "load_model_or_fail", "progress_bar",
           "resolve_model_or_fail", "set_threads"]


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=str, default=None, metavar="smollm2|DIR",
                        help="smollm2 (SmolLM2-135M-Instruct, real weights: run `csp-compile prepare smollm2` once) "
                             "or a local save_pretrained directory of a VLM or a text-only causal LM "
                             "(default: the shipped model of --task)")


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


def resolve_model_or_fail(name_or_path: str | Path | None) -> Path | None:
    """``--model``'s directory: a model name (smollm2) resolved to its prepared directory, a path as
    given, None as None; a CLIError naming --model when the named model is not prepared."""
    from csp_compile.cli import CLIError
    from csp_compile.real.prepare import resolve_model_path

    if name_or_path is None:
        return None
    try:
        return resolve_model_path(name_or_path)
    except FileNotFoundError as error:
        raise CLIError(f"--model: {error}") from None


def load_model_or_fail(path: str | Path | None, task=None):
    """(model, description); a CLIError naming --model, the value and what it must hold when it cannot
    load (a name not prepared, missing directory, no or corrupt config.json, missing or corrupt weights,
    neither a VLM nor a text-only causal LM). ``path`` is a directory or a model name (smollm2); without
    it, the shipped model of ``task`` (default: the lookup task's)."""
    from csp_compile.cli import CLIError
    from csp_compile.real.prepare import MODEL_NAMES
    from csp_compile.tasks import DEFAULT_TASK, get_task

    task = task or get_task(DEFAULT_TASK)
    directory = resolve_model_or_fail(path)
    try:
        model = task.load_model(directory)
    except (FileNotFoundError, ValueError) as error:
        if path is None:  # the shipped model is missing: the message already says to pass --model DIR
            raise
        raise CLIError(f"--model: {error}") from None
    millions = f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters"
    if path is None:
        source = f"the shipped tiny VLM of the {task.name} task ({task.model_dir.name}, {millions})"
    elif str(path) in MODEL_NAMES:
        source = f"{path} ({type(model).__name__}, {millions}, prepared in {directory})"
    else:
        source = str(path)
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

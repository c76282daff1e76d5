"""What an evaluation runs on: one left-padded batch of prompts and, when known, their answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

__all__ = ["EvalSet", "eval_set_for", "is_task_model", "synthetic_eval_set", "task_eval_set"]

SYNTHETIC_ANSWER_TOKENS = 2  # tokens generated for prompts without a task: one from the prefill, one from the cache


@dataclass(frozen=True)
class EvalSet:
    """``inputs`` for ``generate`` (all rows padded to one length); ``answers`` (n, answer_tokens)
    or None when the prompts have no known answer; ``description`` says which data this is;
    ``answer_tokens`` how many tokens to generate (the task's answer length)."""

    inputs: dict[str, torch.Tensor]
    answers: torch.Tensor | None
    description: str
    answer_tokens: int = SYNTHETIC_ANSWER_TOKENS

    def __len__(self) -> int:
        return self.inputs["input_ids"].shape[0]

    def rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        return {name: value[start:stop] for name, value in self.inputs.items()}


def is_task_model(model: PreTrainedModel, task: str = "lookup") -> bool:
    """True when ``model`` speaks the vocabulary of ``task`` (its shipped model or a retrained one)."""
    from csp_compile.tasks import get_task

    return get_task(task).is_task_model(model)


def task_eval_set(n: int, seed: int = 0, task: str = "lookup") -> EvalSet:
    """The first ``n`` prompts of ``task``'s held-out test split (seeded, reproducible)."""
    from csp_compile.tasks import get_task

    return get_task(task).eval_set(n, seed)


def synthetic_eval_set(model: PreTrainedModel, n: int, text_len: int = 192) -> EvalSet:
    """Random-token prompts with one image for a model that has no task data: agreement with
    the full cache is measurable, accuracy is not."""
    from csp_compile.tiny_vlms import make_inputs

    inputs = make_inputs(model, batch=n, text_len=text_len)
    return EvalSet(
        inputs=inputs, answers=None,
        description=f"{n} random-token prompts with an image ({inputs['input_ids'].shape[1]} tokens): "
        "the model has no task test data, so accuracy is not measured",
    )


def eval_set_for(model: PreTrainedModel, n: int, seed: int = 0, task: str = "lookup") -> EvalSet:
    """The test set of ``task`` for a model of that task, synthetic prompts for a model of no
    shipped task; a ValueError when ``model`` is a model of another shipped task."""
    from csp_compile.tasks import get_task, task_of_model

    if n < 1:
        raise ValueError(f"--n must be >= 1: got {n}")
    wanted, actual = get_task(task, "--task"), task_of_model(model)
    if actual is None:
        return synthetic_eval_set(model, n)
    if actual is not wanted:
        raise ValueError(f"--task {task!r}: the model is a model of the {actual.name!r} task: pass --task {actual.name}")
    return wanted.eval_set(n, seed)

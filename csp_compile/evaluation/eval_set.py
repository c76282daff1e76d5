"""What an evaluation runs on: one left-padded batch of prompts and, when known, their answers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from csp_compile.data import VOCAB, collate, make_dataset

__all__ = ["EvalSet", "eval_set_for", "is_task_model", "synthetic_eval_set", "task_eval_set"]

ANSWER_TOKENS = 2  # the lookup's answer: A-value (from the prefill), B-value (from the cache)


@dataclass(frozen=True)
class EvalSet:
    """``inputs`` for ``generate`` (all rows padded to one length); ``answers`` (n, ANSWER_TOKENS)
    or None when the prompts have no known answer; ``description`` says which data this is."""

    inputs: dict[str, torch.Tensor]
    answers: torch.Tensor | None
    description: str

    def __len__(self) -> int:
        return self.inputs["input_ids"].shape[0]

    def rows(self, start: int, stop: int) -> dict[str, torch.Tensor]:
        return {name: value[start:stop] for name, value in self.inputs.items()}


def is_task_model(model: PreTrainedModel) -> bool:
    """True when ``model`` speaks the lookup task's vocabulary (the shipped model or a retrained one)."""
    config = model.config
    return (
        getattr(config, "model_type", None) == "llava"
        and config.get_text_config().vocab_size == VOCAB.size
        and getattr(config, "image_token_index", getattr(config, "image_token_id", None)) == VOCAB.image
    )


def task_eval_set(n: int, seed: int = 0) -> EvalSet:
    """The first ``n`` prompts of the lookup task's held-out test split (seeded, reproducible)."""
    examples = make_dataset(n, "test", seed)
    return EvalSet(
        inputs=collate(examples, padding_side="left"),
        answers=torch.stack([example.answer for example in examples]),
        description=f"{n} held-out prompts of the image-keyed lookup task (test split, seed {seed})",
    )


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


def eval_set_for(model: PreTrainedModel, n: int, seed: int = 0) -> EvalSet:
    """The lookup test set for a task model, synthetic prompts otherwise."""
    if n < 1:
        raise ValueError(f"--n must be >= 1: got {n}")
    return task_eval_set(n, seed) if is_task_model(model) else synthetic_eval_set(model, n)

"""The shipped synthetic tasks, by name: what ``--task`` selects in ``eval``, ``demo`` and ``show-kept``.

A task entry ties together its data module (pure functions of (split, seed, index)), its answer
length, its shipped model and how to recognise a model of it. ``lookup`` (the default) is the
image-keyed record lookup, ``grid`` the glyph-grid reading (answers read from image tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from csp_compile.data import grid as _grid
from csp_compile.data import lookup as _lookup

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from csp_compile.evaluation.eval_set import EvalSet

__all__ = ["DEFAULT_TASK", "TASKS", "Task", "get_task", "task_of_model"]


@dataclass(frozen=True)
class Task:
    """One shipped task. ``data`` is its module (``make_example(index, split, seed)``,
    ``make_dataset``, ``collate``, ``render_tokens``, ``token_name``, ``VOCAB``, ``IMAGE_SIZE``);
    ``answer_tokens`` the answer length (token 1 from the prefill, the rest decoded from the
    cache); ``model_dir_name`` the name in ``csp_compile.data.model`` of its shipped model's
    directory (looked up on use, so tests can move it); ``train_script`` what trains it."""

    name: str
    summary: str
    answer_explained: str
    answer_tokens: int
    data: ModuleType
    model_dir_name: str
    train_script: str
    prompt_header: str

    @property
    def model_dir(self) -> Path:
        """The directory of the task's shipped model."""
        from csp_compile.data import model

        return getattr(model, self.model_dir_name)

    def eval_set(self, n: int, seed: int = 0) -> EvalSet:
        """The first ``n`` prompts of the task's held-out test split (seeded, reproducible)."""
        import torch

        from csp_compile.evaluation.eval_set import EvalSet

        examples = self.data.make_dataset(n, "test", seed)
        return EvalSet(
            inputs=self.data.collate(examples, padding_side="left"),
            answers=torch.stack([example.answer for example in examples]),
            description=f"{n} held-out prompts of the {self.summary} (test split, seed {seed})",
            answer_tokens=self.answer_tokens,
        )

    def is_task_model(self, model: PreTrainedModel) -> bool:
        """True when ``model`` speaks this task's vocabulary (its shipped model or a retrained one)."""
        config = model.config
        vocab = self.data.VOCAB
        return (
            getattr(config, "model_type", None) == "llava"
            and config.get_text_config().vocab_size == vocab.size
            and getattr(config, "image_token_index", getattr(config, "image_token_id", None)) == vocab.image
        )

    def load_model(self, path: str | Path | None = None) -> PreTrainedModel:
        """``path`` (a local save_pretrained directory), or the task's shipped model."""
        from csp_compile.data.model import load_model

        return load_model(path, shipped=self.model_dir, train_script=self.train_script)

    def highlight(self, example) -> list[int]:
        """Prompt positions the answer is read from (boxed by show-kept)."""
        if self.name == "grid":
            return sorted(int(p) for p in example.cells.flatten())
        return sorted(int(p) for p in example.record)

    def describe_image(self, example) -> str:
        if self.name == "grid":
            rows = " / ".join(" ".join(f"g{int(g)}" for g in row) for row in example.grid)
            return f"the prompt's own 4 x 4 glyph grid ({rows}), asked for row {example.row}"
        return f"the prompt's own glyph of key k{example.key:02d}"


TASKS: dict[str, Task] = {
    "lookup": Task(
        name="lookup",
        summary="image-keyed lookup task",
        answer_explained="the image shows a key; the answer is that key's A-value, then its B-value, which is read "
                         "back from the (pruned) cache",
        answer_tokens=_lookup.ANSWER_TOKENS,
        data=_lookup,
        model_dir_name="SHIPPED_MODEL_DIR",
        train_script="examples/train_tiny_vlm.py",
        prompt_header="prompt (image = glyph of the key)",
    ),
    "grid": Task(
        name="grid",
        summary="glyph-grid reading task",
        answer_explained="the image is a 4 x 4 grid of glyphs; the last token asks for one row; the answer is the "
                         "row's 4 glyphs left to right: the first from the prefill, the other 3 read back from the "
                         "image tokens in the (pruned) cache",
        answer_tokens=_grid.ANSWER_TOKENS,
        data=_grid,
        model_dir_name="GRID_MODEL_DIR",
        train_script="examples/train_grid_vlm.py",
        prompt_header="prompt (image = 4 x 4 glyph grid)",
    ),
}
DEFAULT_TASK = "lookup"


def get_task(name: str, argument: str = "task") -> Task:
    """The task called ``name``; a ValueError naming ``argument``, the value and the allowed names otherwise."""
    if name not in TASKS:
        raise ValueError(f"{argument}: unknown task {name!r}: allowed {', '.join(TASKS)}")
    return TASKS[name]


def task_of_model(model: PreTrainedModel) -> Task | None:
    """The task whose vocabulary ``model`` speaks, or None."""
    return next((task for task in TASKS.values() if task.is_task_model(model)), None)

"""Long-context retrieval tasks for a real chat model, built with the model's own chat template.

Each example is a user turn (instructions, a haystack of a target token length with the needle(s)
at a depth spread over the prompt, the question) followed by the assistant turn's answer prefix, as
RULER does; the answer is the 5-digit value, tokenized as the model would write it after the prefix.

- ``passkey``: one pass key hidden in repeated filler (RULER's / Landmark attention's pass key).
- ``multikey``: RULER's ``niah_multikey`` kind: several "special magic number for <word>" needles
  with distinct words spread through the filler; the question names one of them, so the others
  are distractors of the same form.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["LENGTHS", "REAL_TASKS", "RealExample", "RealTask", "example_depth", "get_real_task", "make_example",
           "make_examples", "spread_order"]

LENGTHS = (1024, 2048, 4096)
FILLER_SENTENCES = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
KEY_WORDS = (
    "apple", "river", "candle", "falcon", "garden", "harbor", "island", "jacket", "kettle", "ladder", "meadow",
    "needle", "orchid", "pepper", "quartz", "rocket", "saddle", "tiger", "violin", "walnut", "yogurt", "zebra",
    "anchor", "basket", "cactus", "dragon", "engine", "forest", "glacier", "hammer", "igloo", "jungle",
)


@dataclass(frozen=True)
class RealExample:
    """One prompt: ``input_ids`` (L,), the ``answer`` token ids (T,), the prompt ``needle_spans``
    [(start, stop)] of the value the question asks for, its ``depth`` in [0, 1] and the ``value``."""

    input_ids: torch.Tensor
    answer: torch.Tensor
    needle_spans: tuple[tuple[int, int], ...]
    depth: float
    value: str


@dataclass(frozen=True)
class _Parts:
    instruction: str
    needles: list[tuple[float, str]]  # (depth, sentence), the asked one first
    question: str
    answer_prefix: str
    value: str


@dataclass(frozen=True)
class RealTask:
    """A retrieval task: ``build(rng, depth)`` gives its text parts; ``window`` is the question's
    span in tokens (the observation window that covers it), used as the task's own window."""

    name: str
    summary: str
    build: Callable[[random.Random, float], _Parts]
    window: int


def _value(rng: random.Random) -> str:
    return str(rng.randrange(10000, 100000))


def _passkey(rng: random.Random, depth: float) -> _Parts:
    key = _value(rng)
    return _Parts(
        instruction="There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                    "I will quiz you about the important information there.\n\n",
        needles=[(depth, f"The pass key is {key}. Remember it. {key} is the pass key. ")],
        question="\n\nWhat is the pass key?",
        answer_prefix="The pass key is",
        value=key,
    )


def _multikey(rng: random.Random, depth: float, needles: int = 4) -> _Parts:
    words = rng.sample(KEY_WORDS, needles)
    values = [_value(rng) for _ in words]
    others = [(rng.uniform(0.02, 0.98), f"One of the special magic numbers for {w} is: {v}. ")
              for w, v in zip(words[1:], values[1:])]
    return _Parts(
        instruction="Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                    "I will quiz you about the numbers afterwards.\n\n",
        needles=[(depth, f"One of the special magic numbers for {words[0]} is: {values[0]}. "), *others],
        question=f"\n\nWhat is the special magic number for {words[0]} mentioned in the provided text?",
        answer_prefix=f"The special magic number for {words[0]} mentioned in the provided text is",
        value=values[0],
    )


REAL_TASKS: dict[str, RealTask] = {
    "passkey": RealTask("passkey", "pass-key retrieval (one 5-digit key in filler)", _passkey, window=16),
    "multikey": RealTask("multikey", "multi-key retrieval (4 word-keyed 5-digit values, one asked)", _multikey,
                         window=32),
}


def get_real_task(name: str, argument: str = "--task") -> RealTask:
    if name not in REAL_TASKS:
        raise ValueError(f"{argument}: unknown real-model task {name!r}: allowed {', '.join(REAL_TASKS)}")
    return REAL_TASKS[name]


def _chat_prefix(tokenizer: Any, user: str, answer_prefix: str) -> str:
    turn = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                        tokenize=False)
    return turn + answer_prefix


def _haystack(parts: _Parts, filler_units: int) -> tuple[str, list[int]]:
    """Filler of ``filler_units`` sentences with each needle inserted at its depth; returns the text
    and the character offset of each needle (in ``parts.needles`` order)."""
    units = [FILLER_SENTENCES[i % len(FILLER_SENTENCES)] + " " for i in range(filler_units)]
    slots = sorted(((round(depth * filler_units), i) for i, (depth, _) in enumerate(parts.needles)))
    pieces, offsets, cursor, at = [], [0] * len(parts.needles), 0, 0
    for position, index in slots:
        chunk = "".join(units[cursor:position])
        pieces.append(chunk)
        at += len(chunk)
        offsets[index] = at
        pieces.append(parts.needles[index][1])
        at += len(parts.needles[index][1])
        cursor = position
    pieces.append("".join(units[cursor:]))
    return "".join(pieces), offsets


def _encode(tokenizer: Any, parts: _Parts, filler_units: int) -> tuple[list[int], tuple[int, int]]:
    haystack, offsets = _haystack(parts, filler_units)
    user = parts.instruction + haystack + parts.question
    text = _chat_prefix(tokenizer, user, parts.answer_prefix)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    start_char = text.index(user) + len(parts.instruction) + offsets[0]
    value_start = start_char + parts.needles[0][1].index(parts.value)
    value_stop = value_start + len(parts.value)
    span = [i for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < value_stop and b > value_start]
    return encoded["input_ids"], (span[0], span[-1] + 1)


def make_example(task: RealTask, tokenizer: Any, length: int, index: int, depth: float, seed: int = 0) -> RealExample:
    """The example ``index`` of ``task`` at about ``length`` prompt tokens (never more), needle at ``depth``."""
    rng = random.Random(f"{task.name}/{seed}/{length}/{index}")
    parts = task.build(rng, depth)
    filler = " ".join(FILLER_SENTENCES) + " "
    unit_tokens = max(1, len(tokenizer(filler, add_special_tokens=False)["input_ids"]) // len(FILLER_SENTENCES))
    bare, _ = _encode(tokenizer, parts, 0)
    units = max(1, (length - len(bare)) // unit_tokens)
    ids, span = _encode(tokenizer, parts, units)
    while len(ids) + unit_tokens <= length:  # the estimate falls short: grow towards the length
        units += max(1, (length - len(ids)) // unit_tokens)
        ids, span = _encode(tokenizer, parts, units)
    while len(ids) > length and units > 1:
        units -= max(1, (len(ids) - length) // unit_tokens)
        ids, span = _encode(tokenizer, parts, units)
    answer = tokenizer(" " + parts.value, add_special_tokens=False)["input_ids"]
    return RealExample(torch.tensor(ids), torch.tensor(answer), (span,), depth, parts.value)


def spread_order(n: int) -> list[int]:
    """0 .. n-1 in bit-reversed order: every prefix of it is spread over the range (0, 4, 2, 6, 1, ...)."""
    bits = max(1, (n - 1).bit_length())
    reversed_bits = (int(format(i, f"0{bits}b")[::-1], 2) for i in range(1 << bits))
    return [i for i in reversed_bits if i < n]


def example_depth(index: int, n: int) -> float:
    """The needle depth of example ``index`` of ``n``: the ``index``-th of ``spread_order(n)`` over
    the even grid (k + 0.5) / n, so the first examples already span the prompt."""
    return (spread_order(n)[index] + 0.5) / n


def make_examples(task: RealTask, tokenizer: Any, length: int, n: int, seed: int = 0) -> list[RealExample]:
    """``n`` examples at about ``length`` tokens, needle depths spread evenly over (0, 1) (``example_depth``)."""
    if n < 1:
        raise ValueError(f"--n must be >= 1: got {n}")
    return [make_example(task, tokenizer, length, i, example_depth(i, n), seed) for i in range(n)]

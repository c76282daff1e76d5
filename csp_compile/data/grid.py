"""Glyph-grid reading: the second shipped task, where the answer must be read from image tokens.

A prompt is ``<bos> <image>*64 body ROWr``. The image (32 x 32, 8 x 8 patches of 4 pixels) is a
``GRID`` x ``GRID`` grid of glyph cells; each cell is 8 x 8 pixels (2 x 2 patches, so 4 image
tokens) and shows one of ``NUM_GLYPHS`` glyph classes (a 4 x 4 binary pattern drawn at 2 pixels
a bit), drawn independently per cell. The body is ``BODY_MIN`` .. ``BODY_MAX`` distractor words:
filler tokens and glyph-name tokens ``g0`` .. ``g9`` (the names of the classes, in random order,
unrelated to the image). The last token ``ROWr`` asks for row ``r`` of the grid.

The answer is ``GRID`` tokens, one per cell of the row, left to right: ``r2c0:g3 r2c1:g7 r2c2:g0
r2c3:g5``. An answer token names its cell and the glyph class there (like the lookup task's
separate A- and B-values), so a decode step knows which cell comes next from the token it was
fed: each answer token is one attention hop (next cell -> its image tokens), which a 4-layer
model learns on two CPU cores (docs/design.md §3). No text token says what
a cell shows: every answer token must be read from the image tokens of its cell. The first answer
token (cell ``(r, 0)``) comes from the (unpruned) prefill; the second to fourth (cells
``(r, 1)`` .. ``(r, 3)``) are decoded from the (possibly pruned) KV cache, so a policy that drops
those cells' image tokens leaves only a guess among the glyph classes.

Everything is a pure function of (split, seed, index): the same call gives the same example.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IMAGE_SIZE = 32
PATCH_SIZE = 4
PATCHES = IMAGE_SIZE // PATCH_SIZE  # patches per side
IMAGE_TOKENS = PATCHES**2
GRID = 4  # cells per side; also the answer length (one token per column of the asked row)
CELL_PIXELS = IMAGE_SIZE // GRID  # 8: a cell is 2 x 2 patches
GLYPH_BITS = 4  # a glyph is a GLYPH_BITS x GLYPH_BITS binary pattern ...
BIT_PIXELS = CELL_PIXELS // GLYPH_BITS  # ... of 2 x 2 pixel squares
NUM_GLYPHS = 10
NUM_FILLERS = 16
BODY_MIN, BODY_MAX = 64, 128  # distractor words in the body (uniform)
NAME_SHARE = 0.3  # the share of body words that are glyph names (distractors), the rest fillers
ANSWER_TOKENS = GRID
SPLIT_SEEDS = {"train": 7_000_003, "val": 9_000_011, "test": 8_000_009}


@dataclass(frozen=True)
class Vocab:
    """Token ids of the task; no tokenizer. ``image`` is the last id (Llava's image placeholder)."""

    pad: int = 0
    bos: int = 1
    eos: int = 2
    first_row: int = 3
    first_filler: int = 3 + GRID
    first_name: int = 3 + GRID + NUM_FILLERS
    first_answer: int = 3 + GRID + NUM_FILLERS + NUM_GLYPHS
    size: int = 3 + GRID + NUM_FILLERS + NUM_GLYPHS + GRID * GRID * NUM_GLYPHS + 1

    @property
    def image(self) -> int:
        return self.size - 1

    def row(self, r: int) -> int:
        """The question "what is in row ``r``?" (the prompt's last token)."""
        return self.first_row + r

    def filler(self, i: int) -> int:
        return self.first_filler + i

    def name(self, glyph: int) -> int:
        """A glyph-name word of the body (a distractor: it says nothing about the image)."""
        return self.first_name + glyph

    def answer(self, row: int, column: int, glyph: int) -> int:
        """The answer token "cell (``row``, ``column``) shows glyph ``glyph``"."""
        return self.first_answer + NUM_GLYPHS * (GRID * row + column) + glyph


VOCAB = Vocab()


@dataclass(frozen=True)
class Example:
    """One prompt: ``input_ids`` (L,) with the image placeholders expanded, ``pixel_values``
    (3, 32, 32), ``answer`` (GRID,) token ids, the asked ``row``, the ``grid`` (GRID, GRID) of
    glyph classes and ``cells`` (GRID, 4): the prompt positions of the image tokens of each
    answer cell (row ``row``, column 0 .. GRID-1), ``scored`` (GRID,) all True."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    answer: torch.Tensor
    row: int
    grid: torch.Tensor
    cells: torch.Tensor
    scored: torch.Tensor


def _glyph_bank() -> torch.Tensor:
    """(NUM_GLYPHS, GLYPH_BITS, GLYPH_BITS) binary patterns, pairwise at least 5 bits apart,
    fixed for every split."""
    rng = random.Random("csp-grid-glyphs")
    glyphs: list[tuple[int, ...]] = []
    while len(glyphs) < NUM_GLYPHS:
        bits = tuple(rng.randint(0, 1) for _ in range(GLYPH_BITS * GLYPH_BITS))
        if 5 <= sum(bits) <= 11 and all(sum(a != b for a, b in zip(bits, g)) >= 5 for g in glyphs):
            glyphs.append(bits)
    return torch.tensor(glyphs, dtype=torch.float32).view(NUM_GLYPHS, GLYPH_BITS, GLYPH_BITS)


GLYPHS = _glyph_bank()


def render_grid(grid: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """(3, 32, 32) image of ``grid`` (GRID, GRID) glyph classes: one random background and
    foreground colour per image, Gaussian noise."""
    bits = GLYPHS[grid.long()]  # (GRID, GRID, BITS, BITS)
    mask = bits.permute(0, 2, 1, 3).reshape(GRID * GLYPH_BITS, GRID * GLYPH_BITS)
    mask = mask.repeat_interleave(BIT_PIXELS, 0).repeat_interleave(BIT_PIXELS, 1).bool()
    background = torch.tensor([rng.uniform(-1.0, -0.2) for _ in range(3)])
    foreground = torch.tensor([rng.uniform(0.2, 1.0) for _ in range(3)])
    image = torch.where(mask, foreground[:, None, None], background[:, None, None])
    noise = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(rng.getrandbits(63)))
    return image + 0.15 * noise


def cell_positions(row: int, column: int) -> list[int]:
    """Prompt positions of the 4 image tokens of cell (``row``, ``column``) (row-major patches
    after ``<bos>``)."""
    per = CELL_PIXELS // PATCH_SIZE
    return [1 + (row * per + dy) * PATCHES + column * per + dx for dy in range(per) for dx in range(per)]


def patch_targets(example: Example) -> torch.Tensor:
    """(IMAGE_TOKENS,) for each image token (row-major patches), the answer token of its cell:
    ``r{row}c{column}:g{glyph}`` (a training aid: what each patch shows)."""
    per = CELL_PIXELS // PATCH_SIZE
    rows = torch.arange(PATCHES).repeat_interleave(PATCHES) // per
    cols = torch.arange(PATCHES).repeat(PATCHES) // per
    return VOCAB.first_answer + NUM_GLYPHS * (GRID * rows + cols) + example.grid[rows, cols]


def _rng(split: str, seed: int, index: int) -> random.Random:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}: allowed {list(SPLIT_SEEDS)}")
    return random.Random(f"{SPLIT_SEEDS[split]}/{seed}/grid/{index}")


def make_example(index: int, split: str = "test", seed: int = 0, *, body: tuple[int, int] = (BODY_MIN, BODY_MAX)) -> Example:
    """Example ``index`` of ``split`` (train, val and test draw from different seeds). ``body``
    is the (min, max) number of distractor words (a curriculum may shorten it)."""
    low, high = body
    if not 0 <= low <= high:
        raise ValueError(f"body must be (min, max) with 0 <= min <= max: got {body}")
    rng = _rng(split, seed, index)
    grid = torch.tensor([[rng.randrange(NUM_GLYPHS) for _ in range(GRID)] for _ in range(GRID)])
    pixel_values = render_grid(grid, rng)
    row = rng.randrange(GRID)
    words = [VOCAB.name(rng.randrange(NUM_GLYPHS)) if rng.random() < NAME_SHARE else VOCAB.filler(rng.randrange(NUM_FILLERS))
             for _ in range(rng.randint(low, high))]
    ids = [VOCAB.bos] + [VOCAB.image] * IMAGE_TOKENS + words + [VOCAB.row(row)]
    answer = [VOCAB.answer(row, column, int(grid[row, column])) for column in range(GRID)]
    cells = [cell_positions(row, column) for column in range(GRID)]
    return Example(torch.tensor(ids), pixel_values, torch.tensor(answer), row, grid, torch.tensor(cells),
                   torch.ones(GRID, dtype=torch.bool))


def make_dataset(n: int, split: str = "test", seed: int = 0, **kwargs) -> list[Example]:
    """Examples ``0 .. n-1`` of ``split``; ``kwargs`` go to ``make_example``."""
    return [make_example(i, split, seed, **kwargs) for i in range(n)]


def collate(examples: list[Example], *, with_answer: bool = False, padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Batch for ``model(**batch)`` / ``generate``: input_ids, attention_mask, pixel_values.

    With ``with_answer`` each row is prompt + answer and ``labels`` holds the answer ids at their
    positions (-100 elsewhere, unshifted: position t's label is input_ids[t]).
    """
    rows = [torch.cat([e.input_ids, e.answer]) if with_answer else e.input_ids for e in examples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), VOCAB.pad, dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (row, example) in enumerate(zip(rows, examples)):
        start = width - len(row) if padding_side == "left" else 0
        input_ids[i, start : start + len(row)] = row
        attention_mask[i, start : start + len(row)] = 1
        if with_answer:
            end = start + len(row)
            labels[i, end - len(example.answer) : end] = example.answer
    batch = {"input_ids": input_ids, "attention_mask": attention_mask,
             "pixel_values": torch.stack([e.pixel_values for e in examples])}
    if with_answer:
        batch["labels"] = labels
    return batch


def token_name(token: int) -> str:
    """Readable name of one token id: ``ROW2``, ``f03``, ``g7`` (a body word), ``r2c1:g7`` (an answer)."""
    names = {VOCAB.pad: "<pad>", VOCAB.bos: "<bos>", VOCAB.eos: "<eos>", VOCAB.image: "<img>"}
    if token in names:
        return names[token]
    if VOCAB.first_row <= token < VOCAB.first_row + GRID:
        return f"ROW{token - VOCAB.first_row}"
    if VOCAB.first_filler <= token < VOCAB.first_filler + NUM_FILLERS:
        return f"f{token - VOCAB.first_filler:02d}"
    if VOCAB.first_name <= token < VOCAB.first_name + NUM_GLYPHS:
        return f"g{token - VOCAB.first_name}"
    if VOCAB.first_answer <= token < VOCAB.first_answer + GRID * GRID * NUM_GLYPHS:
        cell, glyph = divmod(token - VOCAB.first_answer, NUM_GLYPHS)
        return f"r{cell // GRID}c{cell % GRID}:g{glyph}"
    return f"<{token}>"


def render_tokens(ids: torch.Tensor | list[int]) -> str:
    """Readable text of token ids: ``<bos> <img>x64 f03 g7 ... ROW2``, ``r2c0:g3 r2c1:g7 ...``."""
    words: list[str] = []
    for token in ids.tolist() if isinstance(ids, torch.Tensor) else list(ids):
        word = token_name(token)
        if words and word == "<img>" and words[-1].startswith("<img>"):
            words[-1] = f"<img>x{int(words[-1][6:] or 1) + 1}"
        else:
            words.append(word)
    return " ".join(words)

"""Image-keyed record lookup: the synthetic task of the shipped tiny VLM.

A prompt is ``<bos> <image>*64 body ?``. The image is a rendered 32 x 32 glyph of one of
``NUM_KEYS`` classes. The body holds, for each of ``NUM_RECORDS`` distinct keys (of ``NUM_KEYS``), two record tokens
in random order among filler words: an A-record, one token naming the key and an A-value, and a
B-record, one token naming the key and a B-value. The answer is ``a b``, the A-value and the
B-value of the key the image shows. Both records carry the shown key, so the prompt's last token,
looking up "the records of the shown key", attends to both: attention at prefill points at what
decoding needs. The first answer token comes from the (unpruned) prefill; the second must be read
back from the (possibly pruned) KV cache at the first decode step, so a policy that drops the
B-record leaves only a guess among the B-values.

A record is one token so that a lookup is one attention hop (shown key -> record), which a
4-layer model learns on two CPU cores; key -> value across separate tokens needs induction heads
and trains an order of magnitude slower (docs/design.md §3).

Auxiliary tasks (training only): "name", ``<bos> <image>*64 NAME`` -> ``key``, names the glyph;
"drill", the body alone (no image) ending in ``RECALL`` -> ``k a b`` for several keys, only the
values scored: the text-keyed form of the lookup.

Everything is a pure function of (split, seed, index): the same call gives the same example.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

IMAGE_SIZE = 32
PATCH_SIZE = 4
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
GLYPH_CELLS = 6  # a glyph is a GLYPH_CELLS x GLYPH_CELLS binary pattern ...
CELL_PIXELS = 4  # ... of CELL_PIXELS x CELL_PIXELS pixel cells
NUM_KEYS = 32
NUM_VALUES = 16  # A-values and, separately, B-values
NUM_FILLERS = 16
NUM_RECORDS = 16  # keys in a full-length prompt (each with an A-record and a B-record)
MAX_FILLERS = 10  # filler words before each record: uniform in 0 .. MAX_FILLERS (at full length)
SPLIT_SEEDS = {"train": 1_000_003, "val": 3_000_017, "test": 2_000_003}
TASKS = ("lookup", "name", "drill")
DRILL_QUERIES = 8  # text-keyed lookups appended to a drill prompt
ANSWER_TOKENS = 2  # the lookup's answer: A-value (from the prefill), B-value (from the cache)


@dataclass(frozen=True)
class Vocab:
    """Token ids of the task; no tokenizer. ``image`` is the last id (Llava's image placeholder)."""

    pad: int = 0
    bos: int = 1
    eos: int = 2
    no: int = 3  # auxiliary training targets: is this record the shown key's?
    query: int = 4
    name: int = 5
    recall: int = 6
    yes: int = 7
    first_key: int = 8
    first_a: int = 8 + NUM_KEYS
    first_b: int = 8 + NUM_KEYS + NUM_VALUES
    first_filler: int = 8 + NUM_KEYS + 2 * NUM_VALUES
    first_a_record: int = 8 + NUM_KEYS + 2 * NUM_VALUES + NUM_FILLERS
    first_b_record: int = 8 + NUM_KEYS + 2 * NUM_VALUES + NUM_FILLERS + NUM_KEYS * NUM_VALUES
    size: int = 8 + NUM_KEYS + 2 * NUM_VALUES + NUM_FILLERS + 2 * NUM_KEYS * NUM_VALUES + 8

    @property
    def image(self) -> int:
        return self.size - 1

    def key(self, i: int) -> int:
        return self.first_key + i

    def a(self, i: int) -> int:
        return self.first_a + i

    def b(self, i: int) -> int:
        return self.first_b + i

    def filler(self, i: int) -> int:
        return self.first_filler + i

    def a_record(self, key: int, value: int) -> int:
        """The one-token record "key has A-value ``value``"."""
        return self.first_a_record + NUM_VALUES * key + value

    def b_record(self, key: int, value: int) -> int:
        return self.first_b_record + NUM_VALUES * key + value


VOCAB = Vocab()


@dataclass(frozen=True)
class Example:
    """One prompt: ``input_ids`` (L,) with the image placeholders expanded, ``pixel_values``
    (3, 32, 32), ``answer`` (n,) token ids, the shown ``key`` class, ``record`` (2,) the prompt
    positions of the shown key's A-record and B-record (empty for the other tasks) and
    ``scored`` (n,) bool, False at answer tokens no model can predict (a drill's query keys)."""

    input_ids: torch.Tensor
    pixel_values: torch.Tensor
    answer: torch.Tensor
    key: int
    record: torch.Tensor
    scored: torch.Tensor


def _glyph_bank() -> torch.Tensor:
    """(NUM_KEYS, GLYPH_CELLS, GLYPH_CELLS) distinct binary patterns, fixed for every split."""
    rng = random.Random("csp-glyphs")
    seen: set[tuple[int, ...]] = set()
    glyphs = []
    while len(glyphs) < NUM_KEYS:
        cells = tuple(rng.randint(0, 1) for _ in range(GLYPH_CELLS * GLYPH_CELLS))
        if cells not in seen and 12 <= sum(cells) <= 24:
            seen.add(cells)
            glyphs.append(cells)
    return torch.tensor(glyphs, dtype=torch.float32).view(NUM_KEYS, GLYPH_CELLS, GLYPH_CELLS)


_GLYPHS = _glyph_bank()


def render_glyph(key: int, rng: random.Random) -> torch.Tensor:
    """(3, 32, 32) image of glyph ``key``, centred, one glyph cell per patch: random colours, Gaussian noise."""
    size = GLYPH_CELLS * CELL_PIXELS
    mask = _GLYPHS[key].repeat_interleave(CELL_PIXELS, 0).repeat_interleave(CELL_PIXELS, 1)
    background = torch.tensor([rng.uniform(-1.0, -0.2) for _ in range(3)])
    foreground = torch.tensor([rng.uniform(0.2, 1.0) for _ in range(3)])
    image = background[:, None, None].expand(3, IMAGE_SIZE, IMAGE_SIZE).clone()
    top = left = (IMAGE_SIZE - size) // 2
    patch = torch.where(mask.bool(), foreground[:, None, None], background[:, None, None])
    image[:, top : top + size, left : left + size] = patch
    noise = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(rng.getrandbits(63)))
    return image + 0.15 * noise


def _rng(split: str, seed: int, task: str, index: int) -> random.Random:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}: allowed {list(SPLIT_SEEDS)}")
    return random.Random(f"{SPLIT_SEEDS[split]}/{seed}/{task}/{index}")


def make_example(
    index: int,
    split: str = "test",
    seed: int = 0,
    *,
    num_records: int = NUM_RECORDS,
    task: str = "lookup",
) -> Example:
    """Example ``index`` of ``split`` (train and test draw from different seeds).

    ``num_records`` (1 .. NUM_KEYS) shortens the body for a curriculum; ``task`` is "lookup"
    (answer: the shown key's A-value and B-value), "name" (no body; answer: the shown key) or "drill" (no
    image; answer: ``key a b`` of DRILL_QUERIES keys, the values scored).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: allowed {list(TASKS)}")
    if not 1 <= num_records <= NUM_KEYS:
        raise ValueError(f"num_records must be in 1 .. {NUM_KEYS}: got {num_records}")
    rng = _rng(split, seed, task, index)
    keys = rng.sample(range(NUM_KEYS), num_records)
    target = rng.choice(keys)
    pixel_values = render_glyph(target, rng)
    ids = [VOCAB.bos] + [VOCAB.image] * IMAGE_TOKENS
    if task == "name":
        return _example(ids + [VOCAB.name], pixel_values, [VOCAB.key(target)], target, [])
    a_values = {key: rng.randrange(NUM_VALUES) for key in keys}
    b_values = {key: rng.randrange(NUM_VALUES) for key in keys}
    records = [VOCAB.a_record(key, a_values[key]) for key in keys] + [VOCAB.b_record(key, b_values[key]) for key in keys]
    rng.shuffle(records)
    target_records = {VOCAB.a_record(target, a_values[target]), VOCAB.b_record(target, b_values[target])}
    record: list[int] = []
    max_fillers = round(MAX_FILLERS * num_records / NUM_RECORDS)  # a shortened body is denser too
    for token in records:
        ids += [VOCAB.filler(rng.randrange(NUM_FILLERS)) for _ in range(rng.randint(0, max_fillers))]
        if token in target_records:
            record.append(len(ids))
        ids.append(token)
    answer = {key: [VOCAB.a(a_values[key]), VOCAB.b(b_values[key])] for key in keys}
    if task == "lookup":
        a_first = sorted(record, key=lambda pos: ids[pos] >= VOCAB.first_b_record)
        return _example(ids + [VOCAB.query], pixel_values, answer[target], target, a_first)
    queried = rng.sample(keys, min(DRILL_QUERIES, num_records))
    text = [VOCAB.bos] + ids[1 + IMAGE_TOKENS :] + [VOCAB.recall]
    drill = [tok for key in queried for tok in (VOCAB.key(key), *answer[key])]
    return _example(text, pixel_values, drill, target, [], [i % 3 != 0 for i in range(len(drill))])


def _example(ids: list[int], pixel_values: torch.Tensor, answer: list[int], key: int, record: list[int],
             scored: list[bool] | None = None) -> Example:
    scored = [True] * len(answer) if scored is None else scored
    return Example(torch.tensor(ids), pixel_values, torch.tensor(answer), key,
                   torch.tensor(record, dtype=torch.int64), torch.tensor(scored))


def make_dataset(n: int, split: str = "test", seed: int = 0, **kwargs) -> list[Example]:
    """Examples ``0 .. n-1`` of ``split``; ``kwargs`` go to ``make_example``."""
    return [make_example(i, split, seed, **kwargs) for i in range(n)]


def collate(examples: list[Example], *, with_answer: bool = False, padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Batch for ``model(**batch)`` / ``generate``: input_ids, attention_mask, pixel_values (when
    the prompts hold image placeholders).

    With ``with_answer`` each row is prompt + answer and ``labels`` holds the scored answer ids at
    their positions (-100 elsewhere, unshifted: position t's label is input_ids[t]).
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
            labels[i, end - len(example.answer) : end] = example.answer.masked_fill(~example.scored, -100)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if bool((input_ids == VOCAB.image).any()):
        batch["pixel_values"] = torch.stack([e.pixel_values for e in examples])
    if with_answer:
        batch["labels"] = labels
    return batch


def render_tokens(ids: torch.Tensor | list[int]) -> str:
    """Readable text of token ids: ``<img>x64``, ``k07=a12`` (a record), ``a12``, ``f03``, ``?`` ..."""
    return " ".join(_words(ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)))


def token_name(token: int) -> str:
    """Readable name of one token id."""
    names = {VOCAB.pad: "<pad>", VOCAB.bos: "<bos>", VOCAB.eos: "<eos>", VOCAB.no: "NO", VOCAB.yes: "YES", VOCAB.query: "?",
             VOCAB.name: "NAME", VOCAB.recall: "RECALL", VOCAB.image: "<img>"}
    if token in names:
        return names[token]
    for first, count, prefix in ((VOCAB.first_key, NUM_KEYS, "k"), (VOCAB.first_a, NUM_VALUES, "a"),
                                 (VOCAB.first_b, NUM_VALUES, "b"), (VOCAB.first_filler, NUM_FILLERS, "f")):
        if first <= token < first + count:
            return f"{prefix}{token - first:02d}"
    for first, prefix in ((VOCAB.first_a_record, "a"), (VOCAB.first_b_record, "b")):
        if first <= token < first + NUM_KEYS * NUM_VALUES:
            key, value = divmod(token - first, NUM_VALUES)
            return f"k{key:02d}={prefix}{value:02d}"
    return f"<{token}>"


def _words(ids: list[int]) -> list[str]:
    words: list[str] = []
    for token in ids:
        word = token_name(token)
        if words and word == "<img>" and words[-1].startswith("<img>"):
            count = int(words[-1][6:] or 1) + 1
            words[-1] = f"<img>x{count}"
        else:
            words.append(word)
    return words

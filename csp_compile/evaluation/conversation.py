"""Two-turn conversations on the lookup task: the question, its answer, then the question again.

Contract. Turn 1 is a lookup prompt (``<bos> <image>*64 body ?``) answered greedily with
``ANSWER_TOKENS`` tokens ``a b`` (the shown key's A-value and B-value). Turn 2 appends to the whole
conversation so far (prompt + answer) a user turn of ``chatter`` filler words (the task's own
filler vocabulary) followed by the task's question token ``?``, and is answered greedily with
``ANSWER_TOKENS`` tokens from the cache of turn 1. The expected turn-2 answer is the turn-1
expected answer: the task has one question per image (the shown key's values), and the shipped
model does not answer a question about another key after a lookup (asked in the training drill's
form ``RECALL kNN``, the full-cache model gets both values right on 0 of 16 test prompts), so
asking again is the meaningful second question the task supports.
The model answers it from the records, not by copying its previous answer: with a wrong turn-1
answer forced into the history, the full-cache model still answers the records' values (see
tests/test_demo_conversation.py). With CSP, turn 2 is prefilled on the pruned cache, so both of
its answer tokens are read back from what the cache kept.

Cache accounting, per conversation row: ``seen`` = real (unpadded) tokens the cache has seen,
``slots`` = slots holding real tokens. With ``on_new_turn="evict"``, after turn 2
``slots = B(seen at the turn-2 prefill) + (ANSWER_TOKENS - 1)`` (B from ``resolve_budget``; the
decoded tokens are appended after the re-selection); with "append", turn 2 adds exactly its new
tokens to ``slots``; with the full cache ``slots == seen``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import DynamicCache

import csp_compile
from csp_compile.config import CSPConfig
from csp_compile.data import VOCAB
from csp_compile.data.lookup import ANSWER_TOKENS, NUM_FILLERS, NUM_VALUES
from csp_compile.evaluation.eval_set import EvalSet

__all__ = ["CHATTER", "Conversation", "Turn", "converse", "recomputed_second_answers", "run_conversation",
           "second_turn_inputs", "wrong_answers"]

CHATTER = 32  # filler words before turn 2's question (the default window: the turn fills the observation window)


@dataclass(frozen=True)
class Turn:
    """One answered turn: greedy ``tokens`` (n, ANSWER_TOKENS); after it, per row, ``seen`` (n,) real
    tokens the cache has seen and ``slots`` (n,) cache slots holding real tokens (both counted in an
    evicted layer; every layer of the full cache holds all it saw); ``logical`` (the cache's
    ``get_seq_length()``, padding included) and ``physical`` (slot axis of its largest layer)."""

    tokens: torch.Tensor
    seen: torch.Tensor
    slots: torch.Tensor
    logical: int
    physical: int


@dataclass(frozen=True)
class Conversation:
    """The two turns of a batch of conversations and ``turn2_inputs``, what turn 2 was given."""

    first: Turn
    second: Turn
    turn2_inputs: dict[str, torch.Tensor]


def second_turn_inputs(first: dict[str, torch.Tensor], sequences: torch.Tensor, chatter: int = CHATTER,
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` of turn 2 for ``generate`` on turn 1's cache.

    ``first``: turn 1's inputs (left-padded ``input_ids``, ``attention_mask``); ``sequences``: turn
    1's ``generate`` output (prompt + answer). Turn 2 = ``chatter`` filler words (drawn from
    ``seed``) then ``?``, no padding inside it. ``pixel_values`` is not carried: the image is
    already in the cache.
    """
    if chatter < 0:
        raise ValueError(f"chatter must be >= 0: got {chatter}")
    n = sequences.shape[0]
    generator = torch.Generator().manual_seed(seed)
    fillers = VOCAB.filler(0) + torch.randint(0, NUM_FILLERS, (n, chatter), generator=generator)
    question = torch.full((n, 1), VOCAB.query, dtype=sequences.dtype)
    ids = torch.cat([sequences, fillers.to(sequences.dtype), question], dim=1)
    grown = ids.shape[1] - first["input_ids"].shape[1]
    mask = first["attention_mask"]
    return {"input_ids": ids, "attention_mask": torch.cat([mask, mask.new_ones(n, grown)], dim=1)}


def _answer(model: PreTrainedModel, inputs: dict[str, torch.Tensor], cache: DynamicCache) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(**inputs, cache=cache, max_new_tokens=ANSWER_TOKENS, min_new_tokens=ANSWER_TOKENS,
                             do_sample=False, return_dict_in_generate=True)
    return out.sequences


def _turn(model: PreTrainedModel, sequences: torch.Tensor, prompt_width: int, cache: DynamicCache,
          attention_mask: torch.Tensor) -> Turn:
    """The Turn after ``generate`` returned ``sequences`` for a prompt ``prompt_width`` wide."""
    seen = attention_mask.sum(-1) + (ANSWER_TOKENS - 1)  # the last answer token is sampled, not fed
    physical = max(layer.keys.shape[-2] for layer in cache.layers)
    slots = seen.clone()
    if csp_compile.is_optimized(model):
        evicted = [(kept, layer) for kept, layer in zip(csp_compile.kept_positions(model), cache.layers)
                   if kept is not None]
        if evicted:  # the slots of the last selection, then those appended since (all real: no padding there)
            kept, layer = evicted[0]
            slots = (kept[:, 0] >= 0).sum(-1) + (layer.keys.shape[-2] - kept.shape[-1])
    return Turn(sequences[:, prompt_width:], seen, slots, cache.get_seq_length(), physical)


def converse(model: PreTrainedModel, inputs: dict[str, torch.Tensor], chatter: int = CHATTER,
             seed: int = 0) -> Conversation:
    """Turn 1 on ``inputs`` (a lookup batch, left-padded), then turn 2 (``second_turn_inputs``) on
    the same cache, both greedy; ``model`` as it is (optimised or not)."""
    cache = DynamicCache(config=model.config.get_text_config())
    sequences = _answer(model, inputs, cache)
    first = _turn(model, sequences, inputs["input_ids"].shape[1], cache, inputs["attention_mask"])
    turn2 = second_turn_inputs(inputs, sequences, chatter, seed)
    sequences = _answer(model, turn2, cache)
    second = _turn(model, sequences, turn2["input_ids"].shape[1], cache, turn2["attention_mask"])
    return Conversation(first, second, turn2)


def run_conversation(model: PreTrainedModel, evalset: EvalSet, config: CSPConfig | None = None,
                     chatter: int = CHATTER, seed: int = 0) -> Conversation:
    """``converse`` over ``evalset`` (one batch) with the full cache (``config`` None) or ``model``
    optimised with ``config`` (restored afterwards, also on error)."""
    if config is None:
        return converse(model, evalset.inputs, chatter, seed)
    csp_compile.optimize(model, config)
    try:
        return converse(model, evalset.inputs, chatter, seed)
    finally:
        csp_compile.restore(model)


def recomputed_second_answers(model: PreTrainedModel, evalset: EvalSet, turn1_answers: torch.Tensor,
                              chatter: int = CHATTER, seed: int = 0) -> torch.Tensor:
    """Greedy turn-2 answers (n, ANSWER_TOKENS) of ``model`` as it is, fed the whole conversation
    (prompt, ``turn1_answers`` (n, ANSWER_TOKENS), turn 2) in one prefill without a cache: with the
    model's own turn-1 answers this equals the full-cache conversation's turn 2; with
    ``wrong_answers`` it shows whether turn 2 reads the records or copies the history."""
    inputs = evalset.inputs
    turn2 = second_turn_inputs(inputs, torch.cat([inputs["input_ids"], turn1_answers], dim=1), chatter, seed)
    if "pixel_values" in inputs:
        turn2["pixel_values"] = inputs["pixel_values"]
    sequences = _answer(model, turn2, DynamicCache(config=model.config.get_text_config()))
    return sequences[:, turn2["input_ids"].shape[1]:]


def wrong_answers(answers: torch.Tensor) -> torch.Tensor:
    """``answers`` (n, 2) of the lookup with each value moved to another one (A + 5, B + 7, mod NUM_VALUES)."""
    a = VOCAB.first_a + (answers[:, 0] - VOCAB.first_a + 5) % NUM_VALUES
    b = VOCAB.first_b + (answers[:, 1] - VOCAB.first_b + 7) % NUM_VALUES
    return torch.stack([a, b], dim=1)

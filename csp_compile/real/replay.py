"""Prefill once, evict many ways: one prompt's prefill recorded, then any number of eviction configs
replayed on it.

At prefill no policy changes what the model computes (every policy attends to the whole prompt
and evicts afterwards), so one recorded prefill serves them all: each layer's post-RoPE queries
and its KV cache. A config's kept positions are the reference selection (``select_from_scores``,
the contract every compiled path is tested to equal) on those queries and keys; its cache is the
full cache gathered to them; the answer is then teacher-forced on that cache, all configs of one
batch at once, with empty slots (adaptive budgets) masked per KV head. Greedy decoding reproduces
the answer exactly when every teacher-forced step's argmax is the answer's next token, so one
forward pass per answer token gives both accuracy and the KL to the full cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from csp_compile.config import CSPConfig
from csp_compile.modality import modality_ids
from csp_compile.policies import PolicyScores, get_policy
from csp_compile.scoring import AttentionInputs, accumulated_attention
from csp_compile.selection import make_attention_inputs, select_from_scores

__all__ = ["RecordedPrefill", "ScoreCache", "kept_positions", "record_prefill", "teacher_forced_logprobs"]

_ATTENTION = "csp_replay"
_ACCUMULATED_POLICIES = ("h2o", "lookm_text_prior")  # their scores read accumulated_attention, window-free


@dataclass
class RecordedPrefill:
    """One prompt's prefill: per layer the post-RoPE ``queries`` (1, hq, L, D), ``keys`` / ``values``
    (1, hkv, L, D) of its cache and softmax ``scales``; ``modality`` (1, L); the log-probabilities
    ``first_logprobs`` (vocab,) of the token after the prompt."""

    queries: list[torch.Tensor]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    scales: list[float]
    modality: torch.Tensor
    first_logprobs: torch.Tensor

    @property
    def length(self) -> int:
        return self.modality.shape[-1]


class _Replay:
    """What the registered attention function does on this call: record queries, or mask slots."""

    def __init__(self) -> None:
        self.queries: dict[int, tuple[torch.Tensor, float]] | None = None
        self.slot_valid: list[torch.Tensor] | None = None  # per layer (C, hkv, P)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if self.queries is not None:
            self.queries[module.layer_idx] = (query, float(scaling if scaling is not None else module.scaling))
        if self.slot_valid is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                          **kwargs)
        valid = self.slot_valid[module.layer_idx]  # the kept slots, then the new tokens causally
        groups, rows, new = query.shape[1] // key.shape[1], query.shape[2], key.shape[2] - valid.shape[-1]
        slots = valid.repeat_interleave(groups, dim=1)[:, :, None, :].expand(-1, -1, rows, -1)
        causal = torch.ones(rows, new, dtype=torch.bool, device=query.device).tril(new - rows)
        mask = torch.cat([slots, causal.expand(*slots.shape[:2], -1, -1)], dim=-1)
        out = F.scaled_dot_product_attention(query, key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1),
                                             attn_mask=mask, scale=scaling)
        return out.transpose(1, 2).contiguous(), None


_REPLAY = _Replay()
AttentionInterface.register(_ATTENTION, _REPLAY)
AttentionMaskInterface.register(_ATTENTION, sdpa_mask)


@contextlib.contextmanager
def _replaying(model: PreTrainedModel) -> Iterator[_Replay]:
    previous = model.config._attn_implementation
    model.set_attn_implementation(_ATTENTION)
    try:
        yield _REPLAY
    finally:
        _REPLAY.queries, _REPLAY.slot_valid = None, None
        model.set_attn_implementation(previous)


def record_prefill(model: PreTrainedModel, input_ids: torch.Tensor) -> RecordedPrefill:
    """Run the unmodified ``model`` on one prompt ``input_ids`` (L,) and record what eviction reads."""
    ids = input_ids.reshape(1, -1).to(model.device)
    cache = DynamicCache(config=model.config)
    with _replaying(model) as replay, torch.no_grad():
        replay.queries = {}
        out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
        recorded = dict(replay.queries)
    layers = sorted(recorded)
    return RecordedPrefill(
        queries=[recorded[i][0] for i in layers],
        keys=[cache.layers[i].keys for i in layers],
        values=[cache.layers[i].values for i in layers],
        scales=[recorded[i][1] for i in layers],
        modality=modality_ids(model, ids),
        first_logprobs=torch.log_softmax(out.logits[0, -1].float(), dim=-1),
    )


class ScoreCache:
    """Each layer's policy scores of one recorded prefill, computed once per (policy fields, window):
    scores do not depend on the budget, so the budgets of one policy share them; the accumulated
    attention (H2O, LOOK-M) does not depend on the window either and is computed once per layer."""

    def __init__(self, record: RecordedPrefill) -> None:
        self.record = record
        self._scores: dict[tuple, list[PolicyScores]] = {}
        self._accumulated: dict[int, torch.Tensor] = {}

    @property
    def layers(self) -> int:
        return len(self.record.queries)

    def scores(self, config: CSPConfig) -> list[PolicyScores]:
        key = (config.replace(budget=1.0, layer_budget="uniform", head_budget="uniform"), self.window(config))
        if key not in self._scores:
            policy = get_policy(config.policy)
            shared = config.policy in _ACCUMULATED_POLICIES
            self._scores[key] = [policy.score(self.inputs(layer, config, with_accumulated=shared), config)
                                 for layer in range(self.layers)]
        return self._scores[key]

    def window(self, config: CSPConfig) -> int:
        return int(self.inputs(0, config).window[0])

    def inputs(self, layer: int, config: CSPConfig, *, with_accumulated: bool = False) -> AttentionInputs:
        r = self.record
        inputs = make_attention_inputs(r.queries[layer], r.keys[layer], r.modality, config, scale=r.scales[layer])
        if not with_accumulated:
            return inputs
        if layer not in self._accumulated:
            self._accumulated[layer] = accumulated_attention(inputs)
        return dataclasses.replace(inputs, accumulated=self._accumulated[layer])


def kept_positions(scores: ScoreCache, config: CSPConfig) -> list[torch.Tensor]:
    """Per layer the kept positions (hkv, P) of ``config`` (ascending, -1 at empty slots)."""
    if config.policy == "full":
        return [torch.arange(scores.record.length).expand(k.shape[1], -1) for k in scores.record.keys]
    layer_scores = scores.scores(config) if get_policy(config.policy).score is not None else [None] * scores.layers
    return [select_from_scores(scores.inputs(i, config), config, layer_scores[i], layer=(i, scores.layers)).indices[0]
            for i in range(scores.layers)]


def _pruned_cache(model: PreTrainedModel, record: RecordedPrefill,
                  kept: Sequence[list[torch.Tensor]]) -> tuple[DynamicCache, list[torch.Tensor]]:
    """A cache of len(kept) rows, row c holding config c's kept slots (padded with empty slots to the
    longest), and the per-layer slot validity (C, hkv, P)."""
    cache, valid = DynamicCache(config=model.config), []
    for layer in range(len(record.keys)):
        width = max(rows[layer].shape[-1] for rows in kept)
        index = torch.stack([F.pad(rows[layer], (0, width - rows[layer].shape[-1]), value=-1) for rows in kept])
        ok = index >= 0
        gather = index.clamp(min=0)[..., None].expand(-1, -1, -1, record.keys[layer].shape[-1])
        keys = record.keys[layer].expand(len(kept), -1, -1, -1).gather(2, gather) * ok[..., None]
        values = record.values[layer].expand(len(kept), -1, -1, -1).gather(2, gather) * ok[..., None]
        cache.update(keys, values, layer)
        valid.append(ok)
    return cache, valid


def teacher_forced_logprobs(model: PreTrainedModel, record: RecordedPrefill, kept: Sequence[list[torch.Tensor]],
                            answer: torch.Tensor) -> torch.Tensor:
    """(C, T, vocab) log-probabilities of each answer position for each config's kept positions
    ``kept[c]`` (per layer (hkv, P)): position 0 from the prefill (the same for all), position t from
    the pruned cache after the answer's first t tokens."""
    configs, steps = len(kept), answer.numel()
    first = record.first_logprobs.expand(configs, 1, -1)
    if steps == 1:
        return first.clone()
    cache, valid = _pruned_cache(model, record, kept)
    tokens = answer[:-1].to(model.device).expand(configs, -1)
    positions = torch.arange(record.length, record.length + steps - 1, device=model.device).expand(configs, -1)
    with _replaying(model) as replay, torch.no_grad():
        replay.slot_valid = valid
        logits = model(input_ids=tokens, position_ids=positions, cache=cache, use_cache=True).logits
    return torch.cat([first, torch.log_softmax(logits.float(), dim=-1)], dim=1)

"""A second turn without the compiler: the unmodified eager model fed the pruned cache by hand.

Turn 1 comes from ``eager_oracle.evicting_generate`` (a plain DynamicCache pruned by hand). Turn 2
feeds the uncached tokens with explicit logical ``position_ids`` (the model's own
``_prepare_position_ids_for_generation`` over the whole conversation, told the logical length),
a 2-D padding mask over the physical slots (plain DynamicLayers size masks physically), and for
``on_new_turn="evict"`` re-selects every pruned layer after the turn's prefill with the float64
brute force of ``bruteforce.py`` per sequence and KV head (budget from the logical real-token
count, window = the turn's last ``min(window, q)`` tokens, causal in slot order). Greedy decoding
then runs step by step. Shares no code with the pass beyond ``modality_ids``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from bruteforce import brute_force_csp, causal, contract_budget
from csp_compile import CSPConfig
from csp_compile.modality import modality_ids


class _LogicalLength:
    """Stands in for the cache where generate's position helper asks for the logical length."""

    def __init__(self, length: int) -> None:
        self.length = length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length


def second_turn(model, cache, slot_valid, slot_positions, first_modality, turn2: dict, logical: int,
                config: CSPConfig, max_new_tokens: int):
    """Greedy continuation of ``turn2`` (the whole conversation's ids/mask + new-turn extras) from the
    hand-pruned ``cache`` holding ``logical`` tokens. ``slot_valid`` (b, P) and ``slot_positions``
    (per layer (b, hkv, P) or None) describe the prefill's kept slots; later slots are the decoded
    tokens. Returns (tokens (b, n), logits list of (b, vocab))."""
    ids, mask = turn2["input_ids"], turn2["attention_mask"]
    extras = {k: v for k, v in turn2.items() if k not in ("input_ids", "attention_mask")}
    language_model = model.get_decoder()
    layer_types = getattr(language_model.config, "layer_types", None) or []
    sliding = any("sliding" in kind for kind in layer_types)
    position_kwargs = {"attention_mask": mask, "cache": _LogicalLength(logical), **extras}
    positions = model._prepare_position_ids_for_generation(ids, position_kwargs)
    if model.config.model_type == "paligemma":  # its prepare_inputs_for_generation makes positions 1-indexed
        positions = positions + 1
    physical = cache.layers[_first_full(cache)].keys.shape[-2]
    decoded = physical - slot_valid.shape[-1]
    valid = torch.cat([slot_valid, mask[:, logical - decoded: logical].bool()], dim=-1)  # (b, physical)
    new_ids = ids[:, logical:]
    new_mask = mask[:, logical:]
    modality_all = modality_ids(model, ids, attention_mask=mask, **_type_ids(turn2))
    records: dict[int, torch.Tensor] = {}
    tokens, logits = [], []
    step_ids, step_pos = new_ids, positions[..., logical:]
    step_extras = {k: (v[..., logical:] if k in ("token_type_ids", "mm_token_type_ids") else v) for k, v in extras.items()}
    for step in range(max_new_tokens):
        q = step_ids.shape[-1]
        full_valid = torch.cat([valid, (new_mask if step == 0 else torch.ones_like(step_ids)).bool()], dim=-1)
        out = _forward(model, language_model, cache, step_ids, step_pos, full_valid, mask, sliding, records,
                       q, step_extras)
        if step == 0 and config.on_new_turn == "evict" and q > 1 and slot_positions is not None:
            valid = _reselect(cache, records, slot_positions, slot_valid, decoded, logical, q, full_valid,
                              modality_all, mask, config)
        else:
            valid = full_valid
        records.clear()
        next_logits = out.logits[:, -1]
        logits.append(next_logits)
        token = next_logits.argmax(-1, keepdim=True)
        tokens.append(token)
        step_ids = token
        step_pos = step_pos[..., -1:] + 1
        step_extras = {k: (torch.zeros_like(v[..., -1:]) if k in ("token_type_ids", "mm_token_type_ids") else None)
                       for k, v in extras.items() if k in ("token_type_ids", "mm_token_type_ids")}
        mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
    return torch.cat(tokens, dim=-1), logits


def _type_ids(inputs: dict) -> dict:
    return {k: inputs[k] for k in ("token_type_ids", "mm_token_type_ids") if k in inputs}


def _first_full(cache) -> int:
    return next(i for i, layer in enumerate(cache.layers) if not isinstance(layer, DynamicSlidingWindowLayer))


def _forward(model, language_model, cache, ids, positions, physical_valid, logical_mask, sliding, records, q, extras):
    attention_modules = {m for m in language_model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")}
    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    implementation = language_model.config._attn_implementation
    original = mapping.get(implementation)

    def recording(module, query, key, value, attention_mask, **kwargs):
        if module in attention_modules:
            records[module.layer_idx] = (query, kwargs.get("scaling"))
        if original is None:  # eager attention is not in the mapping
            from transformers.models.llama.modeling_llama import eager_attention_forward
            return eager_attention_forward(module, query, key, value, attention_mask, **kwargs)
        return original(module, query, key, value, attention_mask, **kwargs)

    def full_layer_mask(module, args, kwargs):
        masks = kwargs.get("attention_mask")
        if not isinstance(masks, dict) or masks.get("full_attention") is None:
            return None
        total = physical_valid.shape[-1]
        key = torch.arange(total)
        query = torch.arange(total - q, total)
        allowed = physical_valid[:, None, None, :] & (key[None, None, None, :] <= query[None, None, :, None])
        like = masks["full_attention"]
        if like.dtype != torch.bool:
            allowed = torch.zeros(allowed.shape, dtype=like.dtype).masked_fill(~allowed, torch.finfo(like.dtype).min)
        return args, {**kwargs, "attention_mask": {**masks, "full_attention": allowed}}

    handle = language_model.register_forward_pre_hook(full_layer_mask, with_kwargs=True)
    mapping[implementation] = recording
    try:
        with torch.no_grad():
            mask = logical_mask[:, : logical_mask.shape[-1]] if sliding else physical_valid.long()
            return model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache, use_cache=True,
                         **{k: v for k, v in extras.items() if v is not None})
    finally:
        if original is None:
            mapping.pop(implementation, None)
        else:
            mapping[implementation] = original
        handle.remove()


def _reselect(cache, records, slot_positions, slot_valid, decoded, logical, q, full_valid, modality_all, mask, config):
    """Re-select every pruned layer by brute force; returns the new (b, P') slot validity."""
    real_logical = mask[:, : logical + q].sum(-1).tolist()
    new_valid = None
    for index, kept in enumerate(slot_positions):
        if kept is None:
            continue
        layer = cache.layers[index]
        query, scale = records[index]
        b, hq, _, dim = query.shape
        keys = layer.keys
        hkv, length = keys.shape[1], keys.shape[2]
        group = hq // hkv
        w_rows = min(config.window, q)
        tail = torch.arange(logical - decoded, logical + q).expand(b, hkv, -1)
        positions = torch.cat([kept, tail], dim=-1)  # (b, hkv, length) logical position per slot
        lists, counts = [], []
        for s in range(b):
            kept_b, _ = contract_budget(int(real_logical[s]), config.budget, config.window)
            per_head = []
            for g in range(hkv):
                qg = torch.zeros(group, length, dim, dtype=torch.float64)
                qg[:, length - w_rows:] = query[s, g * group:(g + 1) * group, q - w_rows:].double()
                modality = [int(modality_all[s, p]) if p >= 0 else 0 for p in positions[s, g].tolist()]
                heads, _ = brute_force_csp(
                    qg, keys[s, g:g + 1].double(), modality, full_valid[s].tolist(), causal,
                    budget=kept_b, window=w_rows, cross_ratio=config.cross_ratio, n=config.n,
                    scale=scale if scale is not None else dim ** -0.5,
                )
                per_head.append(heads[0])
            lists.append(per_head)
            counts.append(len(per_head[0]))
        slots = max(counts)
        index_tensor = torch.full((b, hkv, slots), -1, dtype=torch.int64)
        new_valid = torch.zeros(b, slots, dtype=torch.bool)
        for s in range(b):
            for g in range(hkv):
                index_tensor[s, g, slots - counts[s]:] = torch.tensor(lists[s][g])
            new_valid[s, slots - counts[s]:] = True
        gather = index_tensor.clamp(min=0)[..., None]
        keep = new_valid[:, None, :, None]
        layer.keys = torch.where(keep, layer.keys.gather(2, gather.expand(-1, -1, -1, layer.keys.shape[-1])), 0)
        layer.values = torch.where(keep, layer.values.gather(2, gather.expand(-1, -1, -1, layer.values.shape[-1])), 0)
    return new_valid

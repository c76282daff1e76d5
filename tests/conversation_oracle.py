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
                config: CSPConfig, max_new_tokens: int, initial_queries: dict | None = None):
    """Greedy continuation of ``turn2`` (the whole conversation's ids/mask + new-turn extras) from the
    hand-pruned ``cache`` holding ``logical`` tokens. ``slot_valid`` (b, P) and ``slot_positions``
    (per layer (b, hkv, P) or None) describe the prefill's kept slots; later slots are the decoded
    tokens. With ``config.decode_budget`` every ``decode_every``-th single-token forward compresses
    each pruned layer by hand, observing the last ``window`` tokens' queries (``initial_queries``:
    per layer the prefill's last rows). Returns (tokens (b, n), logits list of (b, vocab))."""
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
    tail = torch.arange(logical - decoded, logical)
    slot_map = {i: torch.cat([kept, tail.expand(*kept.shape[:2], -1)], dim=-1)
                for i, kept in enumerate(slot_positions or []) if kept is not None}
    new_ids = ids[:, logical:]
    new_mask = mask[:, logical:]
    modality_all = modality_ids(model, ids, attention_mask=mask, **_type_ids(turn2))
    recent = dict(initial_queries or {})
    records: dict[int, tuple] = {}
    tokens, logits = [], []
    step_ids, step_pos = new_ids, positions[..., logical:]
    step_extras = {k: (v[..., logical:] if k in _sliced_type_ids(model) else v) for k, v in extras.items()}
    blocks = _image_blocks(model, turn2, logical)
    seen, since = logical, 0
    for step in range(max_new_tokens):
        q = step_ids.shape[-1]
        valid = torch.cat([valid, (new_mask if step == 0 else torch.ones_like(step_ids)).bool()], dim=-1)
        out = _forward(model, language_model, cache, step_ids, step_pos, valid, mask, sliding, records, q, step_extras,
                       blocks if step == 0 else None)
        step_positions = torch.arange(seen, seen + q)
        seen += q
        for index in slot_map:
            slot_map[index] = torch.cat([slot_map[index], step_positions.expand(*slot_map[index].shape[:2], -1)], -1)
            rows = records[index][0][:, :, -config.window:]
            joined = rows if index not in recent or (q > 1 and config.on_new_turn == "evict") else (
                torch.cat([recent[index], rows], dim=2))
            recent[index] = joined[:, :, -config.window:]
        real = mask[:, :seen].sum(-1).tolist() if mask.shape[-1] >= seen else None
        if q > 1:
            since = 0
            if config.on_new_turn == "evict" and slot_map:
                valid = _reselect(cache, records, slot_map, valid, real, modality_all, config, config.budget,
                                  {i: records[i][0][:, :, -min(config.window, q):] for i in slot_map})
        else:
            since += 1
            if config.decode_budget is not None and since % config.decode_every == 0 and slot_map:
                valid = _reselect(cache, records, slot_map, valid, real, modality_all, config, config.decode_budget,
                                  recent)
        records.clear()
        next_logits = out.logits[:, -1]
        logits.append(next_logits)
        token = next_logits.argmax(-1, keepdim=True)
        tokens.append(token)
        step_ids = token
        step_pos = step_pos[..., -1:] + 1
        step_extras = {k: torch.zeros_like(v[..., -1:]) for k, v in extras.items() if k in ("token_type_ids", "mm_token_type_ids")}
        mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
        modality_all = torch.cat([modality_all, modality_ids(model, token)], dim=-1)  # ids decide, even a generated one
    return torch.cat(tokens, dim=-1), logits


def _sliced_type_ids(model) -> tuple[str, ...]:
    """The type-id inputs generate hands the model for the uncached tokens only: all but Gemma3's
    token_type_ids (its prepare_inputs_for_generation passes them whole at a turn's first forward, since
    its bidirectional image blocks are read by absolute position)."""
    return ("mm_token_type_ids",) if model.config.model_type == "gemma3" else ("token_type_ids", "mm_token_type_ids")


def _image_blocks(model, turn2: dict, logical: int) -> torch.Tensor | None:
    """(b, q) for Gemma3: the id of the image block each new token belongs to (-1 = text), numbered by
    hand; tokens of one block attend to each other both ways. None for the other families."""
    if model.config.model_type != "gemma3" or "token_type_ids" not in turn2:
        return None
    is_image = turn2["token_type_ids"][:, logical:] == 1
    starts = is_image & ~torch.cat([torch.zeros_like(is_image[:, :1]), is_image[:, :-1]], dim=-1)
    return torch.where(is_image, starts.long().cumsum(-1), -1)


def _type_ids(inputs: dict) -> dict:
    return {k: inputs[k] for k in ("token_type_ids", "mm_token_type_ids") if k in inputs}


def _first_full(cache) -> int:
    return next(i for i, layer in enumerate(cache.layers) if not isinstance(layer, DynamicSlidingWindowLayer))


def _forward(model, language_model, cache, ids, positions, physical_valid, logical_mask, sliding, records, q, extras,
             blocks=None):
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
        if blocks is not None:  # the new tokens' image blocks (b, q), both ways within a block
            same = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
            allowed[..., total - q:] |= same[:, None] & physical_valid[:, None, None, total - q:]
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


def _reselect(cache, records, slot_map, valid, real_logical, modality_all, config, budget, window_queries):
    """Re-select every pruned layer by brute force (``budget`` of the logical real count, the window
    = the rows of ``window_queries``); updates ``slot_map`` and returns the new (b, P') validity."""
    new_valid = None
    for index, positions in slot_map.items():
        layer = cache.layers[index]
        query = window_queries[index]
        scale = records[index][1]
        b, hq, w_rows, dim = query.shape
        keys = layer.keys
        hkv, length = keys.shape[1], keys.shape[2]
        group = hq // hkv
        lists, counts = [], []
        for s in range(b):
            kept_b, _ = contract_budget(int(real_logical[s]), budget, config.window)
            per_head = []
            for g in range(hkv):
                qg = torch.zeros(group, length, dim, dtype=torch.float64)
                qg[:, length - w_rows:] = query[s, g * group:(g + 1) * group].double()
                modality = [int(modality_all[s, p]) if p >= 0 else 0 for p in positions[s, g].tolist()]
                heads, _ = brute_force_csp(
                    qg, keys[s, g:g + 1].double(), modality, valid[s].tolist(), causal,
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
        slot_map[index] = torch.where(index_tensor >= 0, positions.gather(2, index_tensor.clamp(min=0)), -1)
    return new_valid


def chunked_generate(model, inputs: dict, config: CSPConfig, max_new_tokens: int):
    """Greedy generate of the unmodified model with the prompt prefilled ``config.prefill_chunk`` tokens
    at a time by hand (at the language model, after the vision features are merged): after each chunk
    every full-attention layer is re-selected by brute force (budget of the real tokens so far, window
    = the last ``window`` tokens' queries across chunks); decoding then runs on the pruned cache with
    the padding mask over its physical slots. Returns the generate output (with logits)."""
    language_model = model.get_decoder()
    original_forward = language_model.forward
    chunk = config.prefill_chunk
    mask_2d = inputs["attention_mask"]
    modality_all = modality_ids(model, inputs["input_ids"], attention_mask=mask_2d, **_type_ids(inputs))
    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    implementation = language_model.config._attn_implementation
    original_attention = mapping[implementation]
    records: dict[int, tuple] = {}
    state: dict = {"valid": None}

    def recording(module, query, key, value, attention_mask, **kwargs):
        records[module.layer_idx] = (query, kwargs.get("scaling"))
        return original_attention(module, query, key, value, attention_mask, **kwargs)

    def chunking_forward(*args, **kwargs):
        cache, embeds = kwargs.get("cache"), kwargs.get("inputs_embeds")
        if cache is None or cache.get_seq_length() > 0 or embeds.shape[1] <= chunk:
            return original_forward(*args, **kwargs)
        length = embeds.shape[1]
        positions = kwargs.get("position_ids")
        slot_map, recent, valid, hidden = {}, {}, None, []
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            chunk_valid = mask_2d[:, start:stop].bool()
            valid = chunk_valid if valid is None else torch.cat([valid, chunk_valid], dim=-1)
            mapping[implementation] = recording
            try:
                out = original_forward(**{**kwargs, "inputs_embeds": embeds[:, start:stop], "attention_mask": valid.long(),
                                          "position_ids": None if positions is None else positions[..., start:stop]})
            finally:
                mapping[implementation] = original_attention
            hidden.append(out.last_hidden_state)
            for index, layer in enumerate(cache.layers):
                if isinstance(layer, DynamicSlidingWindowLayer):
                    continue
                fresh = torch.arange(start, stop).expand(layer.keys.shape[0], layer.keys.shape[1], -1)
                slot_map[index] = fresh if index not in slot_map else torch.cat([slot_map[index], fresh], dim=-1)
                rows = records[index][0]
                recent[index] = (rows if index not in recent else torch.cat([recent[index], rows], dim=2))[:, :, -config.window:]
            real = mask_2d[:, :stop].sum(-1).tolist()
            valid = _reselect(cache, records, slot_map, valid, real, modality_all, config, config.budget, recent)
            records.clear()
        state["valid"] = valid
        out.last_hidden_state = torch.cat(hidden, dim=1)
        return out

    def physical_mask_at_decode(module, args, kwargs):
        cache = kwargs.get("cache")
        mask = kwargs.get("attention_mask")
        if state["valid"] is None or cache is None or cache.get_seq_length() == 0 or mask is None:
            return None
        length = mask_2d.shape[1]
        physical = torch.cat([state["valid"].to(mask.dtype), mask[:, length:]], dim=-1)
        return args, {**kwargs, "attention_mask": physical}

    language_model.forward = chunking_forward
    handle = model.register_forward_pre_hook(physical_mask_at_decode, with_kwargs=True)
    try:
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                  return_dict_in_generate=True)
    finally:
        del language_model.forward
        handle.remove()

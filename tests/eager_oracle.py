"""Eviction without the compiler: the unmodified eager model + the reference selection by hand.

The model's own SDPA attention function is wrapped to record each language-model layer's
(query, key, mask) at prefill; after the language model's prefill every full-attention
DynamicCache layer is gathered to ``select_kept``'s positions (left-aligned: empty slots first);
decode steps get the 2-D padding mask over the physical slots. Shares no code with the pass.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicSlidingWindowLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from csp_compile import CSPConfig, resolve_budget, select_kept
from csp_compile.modality import modality_ids


def _cache(kwargs):
    return kwargs.get("cache") if kwargs.get("cache") is not None else kwargs.get("past_key_values")


def evicting_generate(model, inputs: dict, config: CSPConfig, max_new_tokens: int, *, with_slots: bool = False):
    """(generate output with logits, kept positions per layer (b, hkv, P) or None); with ``with_slots``
    also the (b, P) slot validity after the prefill and per layer the prefill's last ``window``
    query rows (b, hq, window, D)."""
    language_model = model.get_decoder()
    attention_modules = {m for m in language_model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")}
    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    original = mapping["sdpa"]
    mask_2d = inputs.get("attention_mask")
    if mask_2d is None:
        mask_2d = torch.ones_like(inputs["input_ids"])
    modality = modality_ids(model, inputs["input_ids"], attention_mask=mask_2d)
    length = inputs["input_ids"].shape[1]
    records: dict[int, tuple] = {}
    state: dict = {"kept": None, "slot_valid": None}

    def recording_sdpa(module, query, key, value, attention_mask, **kwargs):
        if module in attention_modules and query.shape[2] == length and state["kept"] is None:
            mask = attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None
            is_causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
            if mask is None and not is_causal:
                mask = torch.ones(1, 1, length, length, dtype=torch.bool)
            records[module.layer_idx] = (query, key, mask, kwargs.get("scaling"))
        return original(module, query, key, value, attention_mask, **kwargs)

    def prune_after_prefill(module, args, kwargs, output):
        cache = _cache(kwargs)
        if state["kept"] is not None or not records or cache is None:
            return
        slots = length if config.policy == "full" else resolve_budget(length, config)[0]
        kept_per_layer = []
        for index, layer in enumerate(cache.layers):
            if isinstance(layer, DynamicSlidingWindowLayer) or index not in records:
                kept_per_layer.append(None)
                continue
            query, key, mask, scale = records[index]
            selection = select_kept(query, key, modality, config, attention_mask=mask_2d, mask=mask, scale=scale)
            kept = torch.full((*selection.indices.shape[:2], slots), -1, dtype=torch.int64)
            slot_valid = torch.zeros(kept.shape[0], slots, dtype=torch.bool)
            for b, count in enumerate(selection.num_kept.tolist()):
                kept[b, :, slots - count:] = selection.indices[b, :, :count]
                slot_valid[b, slots - count:] = True
            gather = kept.clamp(min=0)[..., None]
            keep = slot_valid[:, None, :, None]
            layer.keys = torch.where(keep, layer.keys.gather(2, gather.expand(-1, -1, -1, layer.keys.shape[-1])), 0)
            layer.values = torch.where(keep, layer.values.gather(2, gather.expand(-1, -1, -1, layer.values.shape[-1])), 0)
            kept_per_layer.append(kept)
            state["slot_valid"] = slot_valid
        state["kept"] = kept_per_layer
        state["slots"] = slots

    layer_types = getattr(language_model.config, "layer_types", None) or []
    sliding = any("sliding" in kind for kind in layer_types)

    def physical_mask_at_decode(module, args, kwargs):
        cache = _cache(kwargs)
        if state["kept"] is None or cache is None or cache.get_seq_length() == 0 or state["slots"] >= length:
            return None
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            return None
        physical = torch.cat([state["slot_valid"].to(mask.dtype), mask[:, length:]], dim=-1)
        if sliding:  # the sliding layers keep the logical mask; the full layers' mask is fixed below
            state["physical"] = physical
            return None
        return args, {**kwargs, "attention_mask": physical}

    def full_attention_mask_at_decode(module, args, kwargs):
        masks = kwargs.get("attention_mask")
        if state.get("physical") is None or not isinstance(masks, dict) or masks.get("full_attention") is None:
            return None
        allowed = state["physical"].bool()[:, None, None, :]  # decode: one query sees every real slot
        return args, {**kwargs, "attention_mask": {**masks, "full_attention": allowed}}

    handles = [
        language_model.register_forward_hook(prune_after_prefill, with_kwargs=True),
        model.register_forward_pre_hook(physical_mask_at_decode, with_kwargs=True),
        language_model.register_forward_pre_hook(full_attention_mask_at_decode, with_kwargs=True),
    ]
    mapping["sdpa"] = recording_sdpa
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
    finally:
        mapping["sdpa"] = original
        for handle in handles:
            handle.remove()
    if with_slots:
        windows = {i: record[0][:, :, -config.window:] for i, record in records.items()}
        return out, state["kept"], state["slot_valid"], windows
    return out, state["kept"]

"""The forward hooks ``optimize`` installs: what the compiled graph cannot see, around each call.

Model pre-hook: refuses calls that would skip eviction; turns the cache's full-attention layers
into ``LogicalLayer`` s (logical length + slot map); at a prefill records the prompt's modality ids
and padding; on a non-empty cache (decode, a new turn) refuses a new image transformers would place
wrongly (``turn_checks``), logs the new tokens and hands transformers the padding mask in the frame the
layers' masks use (``masks.masks_over_slots``).
Model post-hook: after a prefill stores each evicted layer's slot map on the cache; after a new
turn of more than one token with ``on_new_turn="evict"`` re-selects every evicting layer
(``reselect``). Language-model pre-hook: dynamic cache and mask lengths, so decoding compiles once;
for models that build one mask per layer type, the evicted type's slot columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from csp_compile.adaptive import is_adaptive
from csp_compile.backend import CSPState
from csp_compile.cache import (
    LayerEviction,
    LogicalLayer,
    SlotMap,
    adopt_logical_layers,
    check_cache,
    slot_validity,
    synced_slots,
    token_log,
)
from csp_compile.internals import is_sliding_layer_type, mark_dynamic_length
from csp_compile.masks import masks_over_slots
from csp_compile.modality import modality_ids
from csp_compile.ops import kept_slots
from csp_compile.reselect import apply_reselection, reselect
from csp_compile.turn_checks import check_new_turn

SUPPORTED_ATTENTION = ("sdpa", "eager")


@dataclass
class _Pending:
    """The call between a model's pre-hook and its post-hook."""

    kind: str  # "prefill", "continued" or "chunked" (a chunked prefill, finished by the language model)
    cache: DynamicCache
    new_tokens: int


def cache_of(kwargs: dict) -> Any:
    cache = kwargs.get("cache")  # transformers >= 5.2x; older releases call it past_key_values
    return cache if cache is not None else kwargs.get("past_key_values")


def check_call(language_model: nn.Module, kwargs: dict) -> None:
    """Refuse, in one line, a call the compiled pass would run without evicting."""
    implementation = getattr(language_model.config, "_attn_implementation", None)
    if implementation not in SUPPORTED_ATTENTION:
        raise RuntimeError(
            f"csp: the language model's attention implementation is now {implementation!r} (changed after optimize); "
            f"set it back to one of {list(SUPPORTED_ATTENTION)} or call csp_compile.restore(model) first"
        )
    if kwargs.get("output_attentions"):
        raise ValueError("csp: output_attentions=True is not supported on an optimised model (the fused attention "
                         "returns no weights): call csp_compile.restore(model) to get attention weights")


def model_pre_hook(model: nn.Module, language_model: nn.Module, state: CSPState):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        check_call(language_model, kwargs)
        cache = cache_of(kwargs)
        check_cache(cache)
        if cache is None:
            if kwargs.get("use_cache", getattr(model.config, "use_cache", True)) is False:
                return None
            cache = DynamicCache(config=model.config)  # the language model would make one inside the graph
            kwargs = {**kwargs, "cache": cache}
        adopt_logical_layers(cache)
        if cache.get_seq_length() == 0:
            _start_prefill(model, language_model, state, cache, args, kwargs)
        else:
            _continue(model, state, cache, args, kwargs)
        return args, kwargs

    return hook


def _start_prefill(model, language_model, state: CSPState, cache, args: tuple, kwargs: dict) -> None:
    if torch.is_grad_enabled() and any(p.requires_grad for p in language_model.parameters()):
        raise RuntimeError("csp: optimised models are inference only: call them under torch.no_grad() or "
                           "torch.inference_mode() (generate does)")
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    attention_mask = kwargs.get("attention_mask")
    modality = modality_ids(
        model, input_ids,
        token_type_ids=kwargs.get("token_type_ids"),
        mm_token_type_ids=kwargs.get("mm_token_type_ids"),
        attention_mask=attention_mask,
    )
    batch, length = modality.shape
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.int64, device=modality.device)
    state.reset()
    state.modality = modality
    state.attention_mask_2d = attention_mask.to(torch.int64)
    state.prompt_length = length
    token_log(cache, reset=True).append(modality, attention_mask)
    state.pending = _Pending("prefill", cache, length)


def _continue(model, state: CSPState, cache, args: tuple, kwargs: dict) -> None:
    """Log a call on a non-empty cache; leave the slot validity for the language model's masks."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    embeds = kwargs.get("inputs_embeds")
    new_tokens = input_ids.shape[-1] if input_ids is not None else embeds.shape[1]
    batch = input_ids.shape[0] if input_ids is not None else embeds.shape[0]
    device = input_ids.device if input_ids is not None else embeds.device
    attention_mask = kwargs.get("attention_mask")
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        new_valid = attention_mask[:, -new_tokens:]
    else:
        new_valid = torch.ones(batch, new_tokens, dtype=torch.int64, device=device)
    log = token_log(cache)
    logical = cache.get_seq_length()
    layers = [layer for layer in cache.layers if isinstance(layer, LogicalLayer)]
    pruned = [layer for layer in layers if layer.slots is not None]
    if is_adaptive(state.config) and new_tokens > 1 and state.config.on_new_turn == "evict" and pruned:
        raise NotImplementedError(
            f"csp: a new turn of {new_tokens} tokens with on_new_turn='evict' would re-select a cache evicted with "
            f"layer_budget={state.config.layer_budget!r} / head_budget={state.config.head_budget!r}, which is not "
            "supported yet: optimise with on_new_turn='append', or use uniform budgets"
        )
    if log.length != logical and (pruned or state.config.on_new_turn == "evict"):
        raise ValueError(
            f"csp: this cache holds {logical} tokens that did not go through this optimised model (its log has "
            f"{log.length}): continue from the cache the optimised model returned, or start a new conversation"
        )
    if log.length == logical:
        modality = modality_ids(
            model, input_ids,
            token_type_ids=_last(kwargs.get("token_type_ids"), new_tokens),
            mm_token_type_ids=_last(kwargs.get("mm_token_type_ids"), new_tokens),
            attention_mask=new_valid,
        )
        check_new_turn(model, kwargs, logical, modality, new_valid)
        slot_valid = slot_validity(pruned[0], log) if pruned else None
        log.append(modality, new_valid)
    else:
        slot_valid = None
    state.pending = _Pending("continued", cache, new_tokens)
    if slot_valid is not None and not (pruned[0].physical_length == logical and bool(slot_valid.all())):
        state.slot_valid_for_masks = slot_valid  # the language model's pre-hook puts it in the masks' slot columns


def _last(type_ids: torch.Tensor | None, count: int) -> torch.Tensor | None:
    return type_ids[..., -count:] if isinstance(type_ids, torch.Tensor) else None


def model_post_hook(state: CSPState):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        pending, state.pending = state.pending, None
        try:
            if pending is None:
                return
            if pending.kind == "prefill":
                _finish_prefill(state, pending.cache)
            elif pending.kind == "continued":
                _after_continued(state, pending)
        finally:
            state.window_queries.clear()

    return hook


def _finish_prefill(state: CSPState, cache) -> None:
    """Store each evicted layer's slot map and window queries on the cache; raise if a prefill that
    should evict did not."""
    if not state.layers:
        if state.prompt_length and kept_slots(state.prompt_length, state.config) < state.prompt_length:
            raise RuntimeError(
                "csp: the prefill ran without evicting any layer (its attention did not go through the compiled "
                "pass); call csp_compile.restore(model) and report the model"
            )
        return
    modality = state.modality
    for index, eviction in state.layers.items():
        layer = cache.layers[index]
        if not isinstance(layer, LogicalLayer):
            raise RuntimeError(f"csp: cache layer {index} is a {type(layer).__name__}, expected an evicting layer")
        kept, slot_valid = eviction.kept, eviction.slot_valid
        slot_modality = torch.where(kept >= 0, modality[:, None, :].expand(-1, kept.shape[1], -1).gather(
            2, kept.clamp(min=0)), 0)
        if slot_valid.dim() == 3:  # adaptive budgets: validity per head
            layer.slots = SlotMap(kept, slot_modality, torch.ones_like(slot_valid[:, 0]), slot_valid)
        else:
            layer.slots = SlotMap(kept, slot_modality, slot_valid)
        layer.recent_queries = state.window_queries.get(index)
    token_log(cache).decoded = 0


def _after_continued(state: CSPState, pending: _Pending) -> None:
    """After a call on a non-empty cache: a new turn re-selects (``on_new_turn="evict"``); decoded
    tokens are counted and, with ``decode_budget``, compressed every ``decode_every`` of them."""
    config, cache = state.config, pending.cache
    log = token_log(cache)
    if config.decode_budget is not None:
        restart = pending.new_tokens > 1 and config.on_new_turn == "evict"  # the turn's window only
        for index in state.layers:
            cache.layers[index].remember_queries(_window_rows(state, index), config.window, restart=restart)
    if pending.new_tokens > 1:
        log.decoded = 0
        if config.on_new_turn == "evict":
            reselect_layers(state, cache, config, lambda index, layer: _window_rows(state, index))
        return
    log.decoded += 1
    if config.decode_budget is not None and log.decoded % config.decode_every == 0:
        reselect_layers(state, cache, config.decode_config, lambda index, layer: layer.recent_queries)


def _window_rows(state: CSPState, index: int) -> torch.Tensor:
    rows = state.window_queries.get(index)
    if rows is None:
        raise RuntimeError(
            f"csp: layer {index} ran outside the compiled graph on this call (no window queries): the cache cannot be "
            "re-selected; call csp_compile.restore(model) and report the model"
        )
    return rows


def reselect_layers(state: CSPState, cache, config, window_rows) -> None:
    """Re-select every evicting layer over its current slots (``reselect``), observing the queries
    ``window_rows(index, layer)`` (b, hq, w, D) of the last ``w`` tokens, with ``config``'s budget."""
    log = token_log(cache)
    for index in sorted(state.layers):
        layer = cache.layers[index]
        real_counts = log.columns(0, layer.cumulative_length)[1].sum(-1)
        slots = synced_slots(layer, log)
        indices, slot_valid = reselect(window_rows(index, layer), layer.keys, slots, real_counts, config,
                                       state.scales[index])
        apply_reselection(layer, slots, indices, slot_valid)
        state.layers[index] = LayerEviction(kept=layer.slots.positions, slot_valid=slot_valid)
        state.physical_length = slot_valid.shape[-1]


def language_model_pre_hook(language_model: nn.Module, state: CSPState):
    """At decode: contiguous cache tensors with dynamic lengths and dynamic mask lengths, so
    decoding compiles once; with sliding-window layers beside evicted ones, the evicted layer
    type's mask gets the slot validity in its slot columns (the sliding layers' stays logical)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cache = cache_of(kwargs)
        masks = kwargs.get("attention_mask")
        if cache is None or cache.get_seq_length() == 0:
            _refuse_unmappable_padding(language_model, state, masks)
            return None
        _check_uniform_eviction(cache, state)
        for layer in cache.layers:
            if getattr(layer, "keys", None) is not None:
                # A sliding layer stores a strided view after prefill and a fresh tensor after the
                # first decode step: make the layouts agree so the decode graph's stride guards hold.
                layer.keys, layer.values = layer.keys.contiguous(), layer.values.contiguous()
                mark_dynamic_length(layer.keys, 2)
                mark_dynamic_length(layer.values, 2)
        if is_adaptive(state.config):  # only adaptive decode graphs take per-head slot validity
            state.head_valid_for_call = _head_validity(cache, state)
        slot_valid, state.slot_valid_for_masks = state.slot_valid_for_masks, None
        if slot_valid is not None:
            evicted_types = _evicted_layer_types(language_model, state) if isinstance(masks, dict) else set()
            masks = masks_over_slots(masks, slot_valid, cache.get_seq_length(), _new_token_count(args, kwargs),
                                     evicted_types)
            kwargs = {**kwargs, "attention_mask": masks}
        for mask in masks.values() if isinstance(masks, dict) else [masks]:
            if isinstance(mask, torch.Tensor) and mask.dim() >= 2:
                mark_dynamic_length(mask, mask.dim() - 1)
        return args, kwargs

    return hook


def _head_validity(cache: Any, state: CSPState) -> dict[int, torch.Tensor]:
    """Per evicted layer with per-head validity, (b, hkv, cached slots) for this call's decode graph."""
    validity = {}
    for index in state.layers:
        layer = cache.layers[index]
        slots = getattr(layer, "slots", None)
        if slots is None or slots.head_valid is None:
            continue
        appended = layer.physical_length - slots.physical
        ones = torch.ones(*slots.head_valid.shape[:2], appended, dtype=torch.bool, device=slots.head_valid.device)
        validity[index] = torch.cat([slots.head_valid, ones], dim=-1)
    return validity


def _new_token_count(args: tuple, kwargs: dict) -> int:
    embeds = kwargs.get("inputs_embeds")
    ids = kwargs.get("input_ids", args[0] if args else None)
    return embeds.shape[1] if embeds is not None else ids.shape[-1]


def _check_uniform_eviction(cache: Any, state: CSPState) -> None:
    """Every evicting layer must hold the same physical length; a layer that ran outside the
    compiled prefill (a graph break, Dynamo's recompile limit) would make its masks wrong."""
    lengths = {i: layer.keys.shape[-2] for i, layer in enumerate(cache.layers)
               if isinstance(layer, LogicalLayer) and getattr(layer, "keys", None) is not None}
    if state.evicted and len(set(lengths.values())) > 1:
        missing = sorted(i for i in lengths if i not in state.layers)
        raise RuntimeError(
            f"csp: full-attention cache layers hold different lengths {lengths}; layers {missing} were not evicted "
            "(the prefill did not run as one compiled graph: a graph break or Dynamo's recompile limit). Call "
            "csp_compile.restore(model) and report the model."
        )


def _evicted_layer_types(language_model: nn.Module, state: CSPState) -> set[str]:
    layer_types = getattr(language_model.config, "layer_types", None) or ()
    evicted = {layer_types[i] for i in state.layers if i < len(layer_types)}
    shared = evicted & {kind for i, kind in enumerate(layer_types) if i not in state.layers}
    if shared:
        raise NotImplementedError(f"layer type(s) {sorted(shared)} mix evicted and whole layers: cannot build their mask")
    return evicted


def _refuse_unmappable_padding(language_model: nn.Module, state: CSPState, masks: Any) -> None:
    """A padded batch on a model with sliding-window layers needs per-layer-type masks (a dict):
    with one 2-D mask for all layers the evicted and the sliding ones cannot both be right."""
    evicting = state.prompt_length is not None and kept_slots(state.prompt_length, state.config) < state.prompt_length
    padded = state.attention_mask_2d is not None and bool((state.attention_mask_2d == 0).any())
    if evicting and padded and _has_sliding_layers(language_model) and not isinstance(masks, dict):
        raise NotImplementedError(
            f"{type(language_model).__name__} has sliding-window layers and receives one padding mask for all "
            "layers: padded batches with eviction are not supported for it; run one sequence per call or use budget=1.0"
        )


def _has_sliding_layers(language_model: nn.Module) -> bool:
    layer_types = getattr(language_model.config, "layer_types", None) or ()
    return any(is_sliding_layer_type(kind) for kind in layer_types)


_CHUNKABLE_INPUTS = {"inputs_embeds", "attention_mask", "position_ids", "cache", "past_key_values", "use_cache",
                     "return_dict", "input_ids"}


def chunked_prefill(language_model: nn.Module, compiled_forward: Any, state: CSPState) -> Any:
    """The language model's forward with ``config.prefill_chunk``: a prompt longer than the chunk is
    prefilled chunk by chunk (each through the module, so its hooks run), every evicting layer
    re-selected after each chunk, observing the last ``window`` tokens' queries (across chunks);
    the output's hidden states are the chunks' joined."""

    def forward(*args: Any, **kwargs: Any) -> Any:
        chunk = state.config.prefill_chunk
        cache, embeds = cache_of(kwargs), kwargs.get("inputs_embeds")
        if (chunk is None or args or cache is None or embeds is None or embeds.shape[1] <= chunk
                or cache.get_seq_length() > 0 or not state.hooked):
            return compiled_forward(*args, **kwargs)
        if state.pending is None or state.pending.kind != "prefill":
            raise RuntimeError("csp: a chunked prefill of the optimised language model needs the whole model's call "
                               "(model(...) / model.generate(...)), not the language model alone")
        _check_chunkable(language_model, kwargs)
        length = embeds.shape[1]
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        modality, padding = state.modality, state.attention_mask_2d
        outputs, hidden = None, []
        for start in range(0, length, chunk):
            stop = min(start + chunk, length)
            part = {**kwargs, "inputs_embeds": embeds[:, start:stop],
                    "attention_mask": None if mask is None else mask[:, :stop],
                    "position_ids": None if positions is None else positions[..., start:stop]}
            if start == 0:
                state.modality, state.attention_mask_2d = modality[:, :stop].contiguous(), padding[:, :stop].contiguous()
                state.prompt_length = stop
                outputs = language_model(**part)
                _finish_prefill(state, cache)
            else:
                layers = [cache.layers[i] for i in sorted(state.layers)]
                if layers:
                    state.slot_valid_for_masks = slot_validity(layers[0], token_log(cache))
                outputs = language_model(**part)
                _chunk_reselect(state, cache)
            state.window_queries.clear()
            hidden.append(outputs.last_hidden_state)
        state.modality, state.attention_mask_2d, state.prompt_length = modality, padding, length
        state.pending.kind = "chunked"  # the model's post-hook has nothing left to do
        outputs.last_hidden_state = torch.cat(hidden, dim=1)
        return outputs

    return forward


def _chunk_reselect(state: CSPState, cache) -> None:
    for index in state.layers:
        cache.layers[index].remember_queries(_window_rows(state, index), state.config.window)
    reselect_layers(state, cache, state.config, lambda index, layer: layer.recent_queries)


def _check_chunkable(language_model: nn.Module, kwargs: dict) -> None:
    mask = kwargs.get("attention_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        raise NotImplementedError(
            f"csp: prefill_chunk needs a language model that builds its own masks from a 2-D padding mask; "
            f"{type(language_model).__name__} is handed prebuilt masks ({type(mask).__name__}): use prefill_chunk=None"
        )
    extra = sorted(k for k, v in kwargs.items()
                   if k not in _CHUNKABLE_INPUTS and (isinstance(v, (torch.Tensor, list, tuple, dict)) or k.startswith("output_")
                                                       and bool(v)))
    if extra:
        raise NotImplementedError(
            f"csp: prefill_chunk cannot split the language model's inputs {extra} into chunks: use prefill_chunk=None"
        )

"""``optimize(model)``: give a Hugging Face VLM CSP eviction at prefill, no manual patching.

The language model (``model.get_decoder()``) is compiled with ``CSPBackend``; the vision tower
is never compiled. Two forward pre-hooks carry what the compiled graph cannot see: the model's
hook computes each prompt's modality ids and padding mask at prefill and, at decode after an
eviction, maps the 2-D padding mask onto the cache's physical slots; the language model's hook
marks cache and mask lengths dynamic so decoding compiles once (and, for models that pass one
mask per layer type, rebuilds the evicted type's mask).
"""

from __future__ import annotations

import functools
import itertools
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from csp_compile.backend import CSPBackend, CSPState
from csp_compile.cache import check_cache, physical_attention_mask
from csp_compile.config import CSPConfig
from csp_compile.modality import modality_ids
from csp_compile.ops import kept_slots
from csp_compile.passes.evict_prefill import PrefillPlan, plan_prefill
from csp_compile.templates.lowering import choose_scoring

_ATTR = "_csp_compile"
_TRAMPOLINES = itertools.count()
SUPPORTED_ATTENTION = ("sdpa", "eager")


class NoAttentionFoundError(ValueError):
    """The language model holds no attention the pass can rewrite."""


@dataclass
class _Installed:
    state: CSPState
    language_model: nn.Module
    language_model_path: str
    handles: list = field(default_factory=list)
    dry_plan: PrefillPlan | None = None


def optimize(model: nn.Module, config: CSPConfig | None = None, **overrides: Any) -> nn.Module:
    """Compile ``model``'s language model with CSP eviction at prefill; returns ``model``.

    ``overrides`` are CSPConfig fields (``optimize(model, budget=0.1)``). Optimising again
    replaces the previous setup; ``restore(model)`` undoes it. On any error the model is left as
    it was.
    """
    config = CSPConfig() if config is None else config
    if not isinstance(config, CSPConfig):
        raise TypeError(f"config must be a CSPConfig, got {type(config).__name__}")
    if overrides:
        config = config.replace(**overrides)
    language_model, path = _language_model(model)
    dry_plan = _dry_trace(language_model)
    restore(model)
    state = CSPState(config=config, hooked=True)
    installed = _Installed(state, language_model, path, dry_plan=dry_plan)
    installed.handles.append(
        model.register_forward_pre_hook(_model_pre_hook(model, language_model, state), with_kwargs=True)
    )
    installed.handles.append(
        language_model.register_forward_pre_hook(_language_model_pre_hook(language_model, state), with_kwargs=True)
    )
    forward = _own_code_object(type(language_model).forward.__get__(language_model))
    language_model.forward = _capturing_data_dependent_ops(torch.compile(forward, backend=CSPBackend(state)))
    setattr(model, _ATTR, installed)
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo ``optimize``: remove the hooks and the compiled forward; a no-op on other models."""
    installed: _Installed | None = model.__dict__.pop(_ATTR, None)
    if installed is not None:
        for handle in installed.handles:
            handle.remove()
        installed.language_model.__dict__.pop("forward", None)
    return model


def is_optimized(model: nn.Module) -> bool:
    return _ATTR in model.__dict__


def kept_positions(model: nn.Module) -> list[torch.Tensor | None]:
    """After a prefill: per language-model layer the kept prompt positions, (b, kv_heads, kept)
    padded with -1, or None for a layer not evicted (or before any prefill)."""
    installed = _installed(model)
    num_layers = installed.language_model.config.num_hidden_layers
    return [installed.state.layers[i].kept if i in installed.state.layers else None for i in range(num_layers)]


def explain(model: nn.Module) -> str:
    """Which attention subgraphs were found and rewritten, and which were left alone and why."""
    installed = _installed(model)
    plan = installed.state.plans[-1] if installed.state.plans else installed.dry_plan
    source = "last compiled prefill" if installed.state.plans else "trace of a short probe prefill"
    config = installed.state.config
    lines = [
        f"csp_compile: {type(model).__name__}, language model {installed.language_model_path} "
        f"({type(installed.language_model).__name__}), from the {source}",
        f"config: budget={config.budget} window={config.window} cross_ratio={config.cross_ratio} "
        f"n={config.n} policy={config.policy}",
        f"rewritten ({len(plan.sites)}):",
    ]
    for site in plan.sites:
        m = site.match
        index = "?" if m.layer_index is None else m.layer_index
        lines.append(
            f"  layer {index:>3}  {m.module_path}  pattern={m.pattern}  heads={m.num_heads} "
            f"kv_heads={m.num_kv_heads} head_dim={m.head_dim}  mask={m.mask_kind}"
        )
        lines.append(f"{'':13}scoring={_scoring_of(m, config)}")
    lines.append(f"left alone ({len(plan.left_alone)}):")
    lines += [f"  {skip.module_path or '?'}: {skip.reason}" for skip in plan.left_alone]
    return "\n".join(lines)


# --- internals ---------------------------------------------------------------------------------

def _scoring_of(match: Any, config: CSPConfig) -> str:
    """``choose_scoring`` for a rewritten attention, from its query's example value."""
    query = match.query.meta.get("example_value") if isinstance(match.query, torch.fx.Node) else None
    device = query.device if isinstance(query, torch.Tensor) else torch.device("cpu")
    dtype = query.dtype if isinstance(query, torch.Tensor) else torch.float32
    return str(choose_scoring(device, config.policy, dtype))


def _installed(model: nn.Module) -> _Installed:
    installed = model.__dict__.get(_ATTR)
    if installed is None:
        raise ValueError(f"{type(model).__name__} is not optimised: call csp_compile.optimize(model) first")
    return installed


def _language_model(model: nn.Module) -> tuple[nn.Module, str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model or not hasattr(decoder, "config"):
        raise NoAttentionFoundError(
            f"{type(model).__name__} has no separate language model (model.get_decoder()): "
            "csp_compile optimises Hugging Face vision-language models (e.g. *ForConditionalGeneration)"
        )
    implementation = getattr(decoder.config, "_attn_implementation", None)
    if implementation not in SUPPORTED_ATTENTION:
        raise NoAttentionFoundError(
            f"language model attention implementation {implementation!r} is not supported: load the model with "
            f"attn_implementation in {list(SUPPORTED_ATTENTION)}"
        )
    path = next(name for name, module in model.named_modules() if module is decoder)
    return decoder, path


def _dry_trace(language_model: nn.Module) -> PrefillPlan:
    """Trace a short probe prefill of the language model (run eagerly, with a cache of its own)
    and plan the rewrite; raise if there is nothing to rewrite. Changes nothing."""
    from transformers.cache_utils import DynamicCache

    plans: list[PrefillPlan] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> Any:
        plans.append(plan_prefill(gm))
        return gm.forward

    hidden = language_model.config.hidden_size
    parameter = next(language_model.parameters())
    probe = torch.zeros(1, 8, hidden, dtype=parameter.dtype, device=parameter.device)
    traced = torch.compile(_own_code_object(type(language_model).forward.__get__(language_model)), backend=record,
                           dynamic=False)
    with torch.no_grad():
        traced(inputs_embeds=probe, cache=DynamicCache(config=language_model.config), use_cache=True)
    sites = [site for plan in plans for site in plan.sites]
    if not sites:
        found = [f"{m.module_path} ({m.pattern})" for plan in plans for m in plan.matches]
        skipped = [f"{s.module_path}: {s.reason}" for plan in plans for s in plan.left_alone]
        raise NoAttentionFoundError(
            f"no language-model self-attention to rewrite in {type(language_model).__name__}: looked for "
            "scaled_dot_product_attention (with/without mask, enable_gqa, after repeat_kv) and the eager "
            "matmul-softmax-matmul chain over a KV-cache update inside an attention module; "
            f"found {found or 'none'}; left alone {skipped or 'none'}"
        )
    return PrefillPlan(tuple(sites), tuple(s for p in plans for s in p.left_alone), tuple(m for p in plans for m in p.matches))


def _own_code_object(function: Callable) -> Callable:
    """``function`` behind a trampoline with a code object of its own. Dynamo keeps compiled
    graphs per code object, with a recompile limit; transformers' forwards share their decorators'
    code objects across all models, so without this a few optimised models would exhaust it."""

    def trampoline(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    code = trampoline.__code__.replace(co_name=f"csp_forward_{next(_TRAMPOLINES)}")
    return types.FunctionType(code, trampoline.__globals__, code.co_name, None, trampoline.__closure__)


def _capturing_data_dependent_ops(compiled: Callable) -> Callable:
    """Trace with data-dependent output shapes (e.g. Qwen3-VL's boolean-mask indexing) kept in
    the graph: a graph break there would split the prefill into per-layer graphs."""

    @functools.wraps(compiled)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            return compiled(*args, **kwargs)

    return forward


def _check_uniform_eviction(cache: Any, state: CSPState) -> None:
    """Every evicting layer must hold the same physical length; a layer that ran outside the
    compiled prefill (a graph break, Dynamo's recompile limit) would make its masks wrong."""
    lengths = {i: layer.keys.shape[-2] for i, layer in enumerate(cache.layers)
               if type(layer).__name__ == "DynamicLayer" and getattr(layer, "keys", None) is not None}
    if state.evicted and len(set(lengths.values())) > 1:
        missing = sorted(i for i in lengths if i not in state.layers)
        raise RuntimeError(
            f"csp: after the prefill, full-attention cache layers hold different lengths {lengths}; layers "
            f"{missing} were not evicted (the prefill did not run as one compiled graph: a graph break or "
            "Dynamo's recompile limit). Call csp_compile.restore(model) and report the model."
        )


def _cache_of(kwargs: dict) -> Any:
    cache = kwargs.get("cache")  # transformers >= 5.2x; older releases call it past_key_values
    return cache if cache is not None else kwargs.get("past_key_values")


def _model_pre_hook(model: nn.Module, language_model: nn.Module, state: CSPState):
    """At prefill: record the prompt's modality ids and padding mask. At decode after an eviction:
    give the model the 2-D padding mask over the cache's physical slots."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cache = _cache_of(kwargs)
        check_cache(cache)
        attention_mask = kwargs.get("attention_mask")
        if cache is not None and cache.get_seq_length() > 0:
            if not state.evicted or not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
                return None
            mask = physical_attention_mask(attention_mask, state.slot_valid(), state.prompt_length)
            if _has_sliding_layers(language_model):  # sliding layers read the logical mask: fixed per layer type
                state.physical_mask_2d = mask
                return None
            return args, {**kwargs, "attention_mask": mask}
        input_ids = kwargs.get("input_ids", args[0] if args else None)
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
        return None

    return hook


def _language_model_pre_hook(language_model: nn.Module, state: CSPState):
    """At decode: contiguous cache tensors with dynamic lengths and dynamic mask lengths, so
    decoding compiles once; with sliding-window layers beside evicted ones, the evicted layer
    type's mask is rebuilt over physical slots (the sliding layers' stays logical)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        cache = _cache_of(kwargs)
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
                torch._dynamo.maybe_mark_dynamic(layer.keys, 2)
                torch._dynamo.maybe_mark_dynamic(layer.values, 2)
        if isinstance(masks, dict) and state.physical_mask_2d is not None:
            masks = {**masks}
            for kind in _evicted_layer_types(language_model, state):
                if isinstance(masks.get(kind), torch.Tensor):
                    masks[kind] = physical_4d_mask(state.physical_mask_2d, masks[kind])
            kwargs = {**kwargs, "attention_mask": masks}
        for mask in masks.values() if isinstance(masks, dict) else [masks]:
            if isinstance(mask, torch.Tensor) and mask.dim() >= 2:
                torch._dynamo.maybe_mark_dynamic(mask, mask.dim() - 1)
        return args, kwargs

    return hook


def physical_4d_mask(mask_2d: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A decode step's (b, 1, q, P + t) mask over physical slots from the physical 2-D padding
    mask, in the dtype convention of ``like`` (bool = attend, or additive float); the q new
    tokens see the cache and each other causally."""
    batch, kv_length = mask_2d.shape
    queries = like.shape[-2]
    key = torch.arange(kv_length, device=mask_2d.device)
    query = torch.arange(kv_length - queries, kv_length, device=mask_2d.device)
    allowed = mask_2d.bool()[:, None, None, :] & (key[None, None, None, :] <= query[None, None, :, None])
    if like.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(~allowed, torch.finfo(like.dtype).min)


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
    return any("sliding" in str(kind) for kind in layer_types)

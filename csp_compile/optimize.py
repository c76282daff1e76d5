"""``optimize(model)``: give a Hugging Face VLM CSP eviction at prefill, no manual patching.

The language model (``model.get_decoder()``) is compiled with ``CSPBackend`` (``tracing``); the vision tower
is never compiled. Two forward pre-hooks carry what the compiled graph cannot see: the model's
hook computes each prompt's modality ids and padding mask at prefill and, at decode after an
eviction, maps the 2-D padding mask onto the cache's physical slots; the language model's hook
marks cache and mask lengths dynamic so decoding compiles once (and, for models that pass one
mask per layer type, rebuilds the evicted type's mask).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from csp_compile.backend import CSPBackend, CSPState
from csp_compile.config import CSPConfig, pooling_in_words
from csp_compile.internals import is_compiled
from csp_compile.hooks import (
    SUPPORTED_ATTENTION,
    chunked_prefill,
    language_model_pre_hook,
    model_post_hook,
    model_pre_hook,
)
from csp_compile.modality import check_modality_source, with_image_grid
from csp_compile.passes.evict_prefill import PrefillPlan
from csp_compile.templates.lowering import choose_scoring
from csp_compile.tracing import NoAttentionFoundError, capturing_data_dependent_ops, dry_trace, own_code_object

_ATTR = "_csp_compile"


@dataclass
class _Installed:
    state: CSPState
    language_model: nn.Module
    language_model_path: str
    handles: list = field(default_factory=list)
    dry_plan: PrefillPlan | None = None
    modality_source: str = ""


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
    modality_source = check_modality_source(model)
    config = with_image_grid(config, model)
    dry_plan = dry_trace(language_model)
    restore(model)
    state = CSPState(config=config, hooked=True)
    installed = _Installed(state, language_model, path, dry_plan=dry_plan, modality_source=modality_source)
    installed.handles = _install_hooks(model, language_model, state)
    forward = own_code_object(type(language_model).forward.__get__(language_model))
    compiled = capturing_data_dependent_ops(torch.compile(forward, backend=CSPBackend(state)))
    language_model.forward = chunked_prefill(language_model, compiled, state)
    model.__dict__[_ATTR] = installed
    model.__dict__["__deepcopy__"] = functools.partial(_deepcopy_optimized, model)
    model.__dict__["__getstate__"] = _refuse_pickling
    return model


def restore(model: nn.Module) -> nn.Module:
    """Undo ``optimize``: remove the hooks and the compiled forward; a no-op on other models."""
    installed: _Installed | None = model.__dict__.pop(_ATTR, None)
    if installed is not None:
        for handle in installed.handles:
            handle.remove()
        installed.language_model.__dict__.pop("forward", None)
        installed.state.release()
        for name in _COPY_GUARDS:
            model.__dict__.pop(name, None)
    return model


def is_optimized(model: nn.Module) -> bool:
    return _ATTR in model.__dict__


def kept_positions(model: nn.Module) -> list[torch.Tensor | None]:
    """Per language-model layer the logical positions its slots held after the last selection (a
    prefill, a chunk, an evicting new turn or a decode-time compression), (b, kv_heads, kept) with
    -1 at empty slots, or None for a layer not evicted (or before any prefill). Tokens appended
    since (decoded, or a turn with ``on_new_turn="append"``) follow these slots in the cache."""
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
        f"n={config.n} policy={config.policy} layer_budget={config.layer_budget} head_budget={config.head_budget}",
        f"pooling: {pooling_in_words(config)}",
        f"modality: {installed.modality_source}",
        f"rewritten ({len(plan.sites)}):",
    ]
    for site in plan.sites:
        m = site.match
        index = "?" if m.layer_index is None else m.layer_index
        lines.append(
            f"  layer {index:>3}  {m.module_path}  pattern={m.pattern}  heads={m.num_heads} "
            f"kv_heads={m.num_kv_heads} head_dim={m.head_dim}  mask={m.mask_kind}"
        )
        lines.append(f"{'':13}scoring={choose_scoring(config.policy)}")
    lines.append(f"left alone ({len(plan.left_alone)}):")
    lines += [f"  {skip.module_path or '?'}: {skip.reason}" for skip in plan.left_alone]
    return "\n".join(lines)


# --- internals ---------------------------------------------------------------------------------

_COPY_GUARDS = ("__deepcopy__", "__getstate__")


def _install_hooks(model: nn.Module, language_model: nn.Module, state: CSPState) -> list:
    return [
        model.register_forward_pre_hook(model_pre_hook(model, language_model, state), with_kwargs=True),
        model.register_forward_hook(model_post_hook(state), with_kwargs=True, always_call=True),
        language_model.register_forward_pre_hook(language_model_pre_hook(language_model, state), with_kwargs=True),
    ]


def _deepcopy_optimized(model: nn.Module, memo: dict) -> nn.Module:
    """``copy.deepcopy`` of an optimised model: the plain model is copied (without hooks, compiled
    forward or eviction state) and the copy is optimised afresh with the same config."""
    installed: _Installed = model.__dict__[_ATTR]
    saved = {name: model.__dict__.pop(name) for name in (_ATTR, *_COPY_GUARDS)}
    forward = installed.language_model.__dict__.pop("forward")
    for handle in installed.handles:
        handle.remove()
    try:
        clone = copy.deepcopy(model, memo)
    finally:
        installed.handles = _install_hooks(model, installed.language_model, installed.state)
        installed.language_model.__dict__["forward"] = forward
        model.__dict__.update(saved)
    return optimize(clone, installed.state.config)


def _refuse_pickling() -> None:
    raise TypeError("csp: an optimised model cannot be pickled (torch.save): save model.state_dict(), or call "
                    "csp_compile.restore(model) first")


def _refuse_compiled(model: nn.Module) -> None:
    """``optimize`` compiles the language model itself: a model already compiled is refused in one line."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):  # internals.is_compiled, for the message
        raise ValueError("csp: optimize got a torch.compile'd model: pass the uncompiled one (compiled._orig_mod); "
                         "optimize compiles the language model itself")
    compiled = [name or type(model).__name__ for name, module in model.named_modules()
                if is_compiled(module)]
    if compiled:
        raise ValueError(f"csp: {compiled[0]} was compiled with .compile(): optimize compiles the language model "
                         "itself; pass a model that was not compiled")

def _installed(model: nn.Module) -> _Installed:
    installed = model.__dict__.get(_ATTR)
    if installed is None:
        raise ValueError(f"{type(model).__name__} is not optimised: call csp_compile.optimize(model) first")
    return installed


def _language_model(model: nn.Module) -> tuple[nn.Module, str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    _refuse_compiled(model)
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is model or not hasattr(decoder, "config"):
        raise NoAttentionFoundError(
            f"{type(model).__name__} has no separate language model (model.get_decoder()): "
            "csp_compile optimises Hugging Face vision-language models (*ForConditionalGeneration) and causal LMs "
            "(*ForCausalLM)"
        )
    implementation = getattr(decoder.config, "_attn_implementation", None)
    if implementation not in SUPPORTED_ATTENTION:
        raise NoAttentionFoundError(
            f"language model attention implementation {implementation!r} is not supported: load the model with "
            f"attn_implementation in {list(SUPPORTED_ATTENTION)}"
        )
    path = next(name for name, module in model.named_modules() if module is decoder)
    return decoder, path

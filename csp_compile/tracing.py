"""How ``optimize`` hands the language model to Dynamo: a dry trace that plans the rewrite before
anything changes, the forward behind a code object of its own, and data-dependent shapes kept in
the graph."""

from __future__ import annotations

import functools
import itertools
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from csp_compile.internals import capture_data_dependent_shapes
from csp_compile.passes.evict_prefill import PrefillPlan, plan_prefill

__all__ = ["NoAttentionFoundError", "capturing_data_dependent_ops", "dry_trace", "own_code_object"]

_TRAMPOLINES = itertools.count()


class NoAttentionFoundError(ValueError):
    """The language model holds no attention the pass can rewrite."""


def dry_trace(language_model: nn.Module) -> PrefillPlan:
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
    traced = torch.compile(own_code_object(type(language_model).forward.__get__(language_model)), backend=record,
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


def own_code_object(function: Callable) -> Callable:
    """``function`` behind a trampoline with a code object of its own. Dynamo keeps compiled
    graphs per code object, with a recompile limit; transformers' forwards share their decorators'
    code objects across all models, so without this a few optimised models would exhaust it."""

    def trampoline(*args: Any, **kwargs: Any) -> Any:
        return function(*args, **kwargs)

    code = trampoline.__code__.replace(co_name=f"csp_forward_{next(_TRAMPOLINES)}")
    return types.FunctionType(code, trampoline.__globals__, code.co_name, None, trampoline.__closure__)


def capturing_data_dependent_ops(compiled: Callable) -> Callable:
    """Trace with data-dependent output shapes (e.g. Qwen3-VL's boolean-mask indexing) kept in
    the graph: a graph break there would split the prefill into per-layer graphs."""

    @functools.wraps(compiled)
    def forward(*args: Any, **kwargs: Any) -> Any:
        with capture_data_dependent_shapes():
            return compiled(*args, **kwargs)

    return forward

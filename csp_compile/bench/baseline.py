"""The plain baseline every bench figure compares CSP with: the language model compiled by Inductor,
each attention as the same ``csp::attention`` the CSP graph uses (with its causal-mask shortcut),
nothing evicted. So a prefill ratio measures the selection and the gathers alone, not the shortcut
(under ``torch.compile`` transformers always hands SDPA a bool mask, which the plain graph would
run as a masked flash attention while the rewritten one detects that it is causal)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch._inductor.compile_fx import compile_fx
from transformers import PreTrainedModel

from csp_compile.passes.evict_prefill import copy_dynamo_graph, plan_prefill, rewrite_attention_only

__all__ = ["compile_plain", "shortcut_backend"]


def shortcut_backend(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
    """Inductor, with every prefill attention site as ``csp::attention`` (``rewrite_attention_only``)."""
    if plan_prefill(gm).sites:
        gm = copy_dynamo_graph(gm)
        rewrite_attention_only(gm, plan_prefill(gm))
    return compile_fx(gm, list(example_inputs))


def compile_plain(model: PreTrainedModel) -> None:
    """Compile ``model``'s language model with ``shortcut_backend`` (as ``optimize`` compiles only it)."""
    language_model = model.get_decoder()
    language_model.forward = torch.compile(type(language_model).forward.__get__(language_model), backend=shortcut_backend)

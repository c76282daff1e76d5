"""Every private torch / transformers behaviour csp_compile relies on, in one place.

Each entry is a small function or constant with the release it was checked against (torch 2.13,
transformers 5.24); ``tests/test_internals.py`` pins each one so a release that changes it fails
there, loudly, instead of somewhere deep in a compiled graph.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.nn.attention import SDPBackend

__all__ = [
    "SDPA_FUNCTIONS",
    "capture_data_dependent_shapes",
    "copy_placeholder_sources",
    "dynamo_backend_registered",
    "fake_mode_of",
    "flash_attention_cpu_with_lse",
    "is_compiled",
    "is_sliding_layer_type",
    "mark_dynamic_length",
    "module_stack_entries",
    "new_placeholder_source",
    "realized_once",
    "sdpa_picks_flash",
]

# --- Dynamo / FX ----------------------------------------------------------------------------------

# What ``F.scaled_dot_product_attention`` is in a Dynamo graph (a C++ builtin, torch 2.13).
SDPA_FUNCTIONS = (torch._C._nn.scaled_dot_product_attention,)


# Dynamo's source names of module paths in ``nn_module_stack``: "L['self'].layers[0].self_attn" and the like
_DYNAMO_ROOT = re.compile(r"^L\['[^']*'\](\[\d+\])*\.?(__self__\.)?")


def module_stack_entries(node: fx.Node) -> list[tuple[str, Any]]:
    """(module path relative to the compiled module, class) per enclosing module of ``node``, outermost
    first, from Dynamo's ``node.meta["nn_module_stack"]`` with its ``L['self']``-style root stripped."""
    return [(_DYNAMO_ROOT.sub("", path), cls) for path, cls in node.meta.get("nn_module_stack", {}).values()]


def dynamo_backend_registered(name: str) -> bool:
    """Whether Dynamo's backend registry (``torch._dynamo.backends.registry._COMPILER_FNS``) holds ``name``."""
    from torch._dynamo.backends.registry import _COMPILER_FNS

    return name in _COMPILER_FNS


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is a ``torch.compile`` wrapper or was compiled in place with ``.compile()``
    (``OptimizedModule``; ``nn.Module._compiled_call_impl``)."""
    return isinstance(module, torch._dynamo.eval_frame.OptimizedModule) or \
        getattr(module, "_compiled_call_impl", None) is not None


def fake_mode_of(values: Sequence[Any]) -> Any:
    """The fake-tensor mode of the example inputs a backend receives (``torch._guards.detect_fake_mode``)."""
    return torch._guards.detect_fake_mode(list(values))


def new_placeholder_source(node: fx.Node) -> None:
    """Mark a placeholder the rewrite adds: AOTAutograd reads ``_dynamo_source`` off every placeholder."""
    node._dynamo_source = None


def copy_placeholder_sources(old: fx.GraphModule, new: fx.GraphModule, value_map: dict[fx.Node, fx.Node]) -> None:
    """Carry Dynamo's per-placeholder ``_dynamo_source`` and the module's ``_param_name_to_source`` from
    Dynamo's graph to a copy (Inductor's input handling reads both)."""
    for before, after in value_map.items():
        if before.op == "placeholder":
            after._dynamo_source = getattr(before, "_dynamo_source", None)
    if hasattr(old, "_param_name_to_source"):
        new._param_name_to_source = old._param_name_to_source


@contextlib.contextmanager
def capture_data_dependent_shapes() -> Iterator[None]:
    """Trace ops with data-dependent output shapes into the graph instead of breaking it there."""
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        yield


def mark_dynamic_length(tensor: torch.Tensor, dim: int) -> None:
    """Let Dynamo compile ``tensor``'s ``dim`` as dynamic on first sight (``maybe_mark_dynamic``)."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)


def realized_once(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, equal; in a graph Inductor compiles, written into one buffer that every user reads.
    Inductor otherwise recomputes an unrealized pointwise into a new buffer for each custom-op user
    (``prims.inductor_force_stride_order`` is lowered to one realized buffer of those strides)."""
    import torch._inductor.inductor_prims  # noqa: F401  (registers the prim)

    return torch.ops.prims.inductor_force_stride_order.default(tensor, tensor.stride())


# --- SDPA kernels -------------------------------------------------------------------------------------

def sdpa_picks_flash(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any) -> bool:
    """Whether SDPA would run its flash kernel for these arguments (``torch._fused_sdp_choice``)."""
    return torch._fused_sdp_choice(query, key, value, **kwargs) == int(SDPBackend.FLASH_ATTENTION)


def flash_attention_cpu_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                                 attn_mask: torch.Tensor | None, is_causal: bool,
                                 scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA's CPU flash kernel (``aten._scaled_dot_product_flash_attention_for_cpu``): (output, row
    log-sum-exp (b, h, L)). K/V with as many heads as Q; a mask additive, of the query's dtype; the kernel
    takes a mask and ``is_causal`` together (a (b, 1, 1, L) row of padding keys: ``csp::attention``)."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, 0.0, is_causal, attn_mask=attn_mask, scale=scale)


# --- transformers ---------------------------------------------------------------------------------------

def is_sliding_layer_type(kind: object) -> bool:
    """Whether a ``config.layer_types`` entry names a sliding-window layer ("sliding_attention" in 5.24)."""
    return "sliding" in str(kind)


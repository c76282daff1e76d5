"""Find the language model's self-attention computations in a Dynamo FX graph (analysis only).

Each attention computation has an *anchor* node (an SDPA call, or the softmax of an eager
chain). Registered matchers turn an anchor into an `AttentionMatch`; anchors that belong to a
vision tower, a projector or a cross-attention, or that no matcher accepts, are reported as
`SkippedAttention`. The module path and layer index come from `node.meta["nn_module_stack"]`;
head counts and head_dim from the nodes' fake-tensor metadata.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import fx

from csp_compile.internals import SDPA_FUNCTIONS, module_stack_entries

__all__ = ["AttentionMatch", "SkippedAttention", "attention_pattern", "find_attention"]

MaskKind = Literal["none", "causal_flag", "bool", "additive"]


@dataclass(frozen=True)
class AttentionMatch:
    """One language-model self-attention: softmax(scale * q k^T + mask) v over (b, heads, L, D) tensors.

    `key` / `value` are the per-KV-head tensors (before any repeat_kv); `nodes` (in graph order)
    is every node a rewrite may replace: only `output` is used outside them, and the mask and the
    q/k/v producers are not among them. `scale` is the scale actually applied: a float (SDPA's
    1/sqrt(head_dim) default filled in), or the graph value holding it (under `dynamic=True`
    Dynamo lifts float module attributes such as `self.scaling` to graph inputs), or None.
    """

    layer_index: int | None
    module_path: str
    pattern: str
    query: fx.Node
    key: fx.Node
    value: fx.Node
    mask: fx.Node | None
    mask_kind: MaskKind
    output: fx.Node
    nodes: tuple[fx.Node, ...]
    scale: float | fx.Node | None
    is_causal: bool
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None


@dataclass(frozen=True)
class SkippedAttention:
    """An attention-like node left alone, and why."""

    module_path: str
    reason: str


@dataclass(frozen=True)
class _Core:
    """What a pattern matcher extracts; `find_attention` adds module and shape information."""

    pattern: str
    query: fx.Node
    key: fx.Node
    value: fx.Node
    mask: fx.Node | None
    output: fx.Node
    nodes: tuple[fx.Node, ...]
    scale: float | fx.Node | None
    is_causal: bool


Matcher = Callable[[fx.Node], _Core | str]
_MATCHERS: list[tuple[Callable[[fx.Node], bool], Matcher]] = []


def attention_pattern(anchor: Callable[[fx.Node], bool]) -> Callable[[Matcher], Matcher]:
    """Register a matcher for anchors satisfying `anchor`; it returns a `_Core` or why it does not match."""

    def register(fn: Matcher) -> Matcher:
        _MATCHERS.append((anchor, fn))
        return fn

    return register


# --------------------------------------------------------------------------------------------
# Node helpers
# --------------------------------------------------------------------------------------------

_CASTS = ("to", "type_as", "float", "half", "bfloat16", "type")


def _is_call(node: object, functions: tuple = (), methods: tuple = ()) -> bool:
    if not isinstance(node, fx.Node):
        return False
    return (node.op == "call_function" and node.target in functions) or (
        node.op == "call_method" and node.target in methods
    )


def _is_sdpa(node: fx.Node) -> bool:
    return _is_call(node, SDPA_FUNCTIONS)


def _is_softmax(node: fx.Node) -> bool:
    return _is_call(node, (torch.nn.functional.softmax, torch.softmax), ("softmax",))


def _is_matmul(node: object) -> bool:
    return _is_call(node, (torch.matmul, operator.matmul), ("matmul",))


def _arg(node: fx.Node, index: int, name: str, default: object = None) -> object:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _fake(node: object) -> torch.Tensor | None:
    value = node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _static(size: object) -> int | None:
    return size if isinstance(size, int) else None


def _only_user_is(node: fx.Node, user: fx.Node) -> bool:
    return list(node.users) == [user]


def _unrepeat_kv(node: fx.Node, consumer: fx.Node) -> tuple[fx.Node, tuple[fx.Node, ...]]:
    """(x, repeat nodes) if `node` is repeat_kv(x) over dim 1 feeding only `consumer`, else (node, ()).

    Recognises `x[:, :, None].expand(...).reshape(...)` (HF's repeat_kv, also via unsqueeze(2)/view)
    and `x.repeat_interleave(n, dim=1)`; every intermediate node must feed only the next one.
    """
    if not _only_user_is(node, consumer):
        return node, ()
    if _is_call(node, (torch.repeat_interleave,), ("repeat_interleave",)) and _arg(node, 2, "dim") == 1:
        return node.args[0], (node,)
    if not _is_call(node, (torch.reshape,), ("reshape", "view")):
        return node, ()
    expand = node.args[0]
    if not (_is_call(expand, (), ("expand",)) and _only_user_is(expand, node)):
        return node, ()
    insert = expand.args[0]
    if not (isinstance(insert, fx.Node) and _only_user_is(insert, expand)):
        return node, ()
    index = insert.args[1] if len(insert.args) > 1 else None
    inserts_dim2 = (
        _is_call(insert, (operator.getitem,))
        and isinstance(index, tuple)
        and len(index) >= 3
        and index[2] is None
        and all(i == slice(None) for i in index[:2] + index[3:])
    ) or (_is_call(insert, (torch.unsqueeze,), ("unsqueeze",)) and index == 2)
    if not inserts_dim2:
        return node, ()
    return insert.args[0], (insert, expand, node)


# --------------------------------------------------------------------------------------------
# Patterns
# --------------------------------------------------------------------------------------------


@attention_pattern(_is_sdpa)
def _match_sdpa(node: fx.Node) -> _Core | str:
    """scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=, enable_gqa=)."""
    query, key, value = (_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    mask = _arg(node, 3, "attn_mask")
    dropout_p = _arg(node, 4, "dropout_p", 0.0)
    is_causal = _arg(node, 5, "is_causal", False)
    scale = node.kwargs.get("scale")
    if not isinstance(is_causal, bool):
        return "is_causal is not a constant"
    if dropout_p != 0.0:
        return f"dropout_p={dropout_p} is not 0"
    if scale is None:
        fake_query = _fake(query)
        head_dim = _static(fake_query.shape[-1]) if fake_query is not None else None
        scale = 1.0 / math.sqrt(head_dim) if head_dim is not None else None
    elif not isinstance(scale, fx.Node):
        scale = float(scale)
    if node.kwargs.get("enable_gqa", False):
        return _Core("sdpa_gqa", query, key, value, mask, node, (node,), scale, is_causal)
    base_key, key_repeat = _unrepeat_kv(key, node)
    base_value, value_repeat = _unrepeat_kv(value, node)
    if bool(key_repeat) != bool(value_repeat):
        return "only one of key / value goes through repeat_kv"
    pattern = "sdpa_repeat_kv" if key_repeat else "sdpa"
    nodes = (*key_repeat, *value_repeat, node)
    return _Core(pattern, query, base_key, base_value, mask, node, nodes, scale, is_causal)


def _times(scale: float | fx.Node | None, factor: object) -> float | fx.Node | None:
    """scale * factor as one float or one graph value; None when it is neither."""
    if isinstance(scale, float) and isinstance(factor, float | int):
        return scale * factor
    if scale == 1.0 and isinstance(factor, fx.Node):
        return factor
    return None


def _scores_chain(start: fx.Node) -> tuple[fx.Node, float | fx.Node | None, fx.Node | None, list[fx.Node]] | str:
    """Walk back from the softmax input to matmul(q, k^T): (matmul, scale, mask, nodes on the way)."""
    node, scale, mask, nodes = start, 1.0, None, []
    while not _is_matmul(node):
        if not isinstance(node, fx.Node) or len(node.users) != 1:
            return "softmax input is not a chain from matmul(q, k^T)"
        nodes.append(node)
        if _is_call(node, (operator.add, torch.add), ("add",)) and mask is None:
            left, right = node.args[:2]
            node, mask = (right, left) if _leads_to_matmul(right) else (left, right)
        elif _is_call(node, (operator.mul, torch.mul), ("mul",)):
            left, right = node.args[:2]
            node, factor = (right, left) if _leads_to_matmul(right) else (left, right)
            scale = _times(scale, factor)
        elif _is_call(node, (operator.truediv, torch.div), ("div",)) and isinstance(node.args[1], float | int):
            node, scale = node.args[0], _times(scale, 1.0 / node.args[1])
        elif _is_call(node, (), _CASTS):
            node = node.args[0]
        else:
            return f"unexpected {node.target} between matmul(q, k^T) and softmax"
    if len(node.users) != 1:
        return "the q k^T scores are used outside the attention"
    return node, scale, mask, [node, *nodes]


def _leads_to_matmul(node: object) -> bool:
    """Whether `node` is the scores side of `scores + mask` (a matmul, possibly scaled / cast)."""
    while isinstance(node, fx.Node) and not _is_matmul(node):
        if not _is_call(node, (operator.mul, operator.truediv, torch.mul, torch.div), ("mul", "div", *_CASTS)):
            return False
        node = node.args[0] if isinstance(node.args[0], fx.Node) else node.args[1]
    return _is_matmul(node)


def _transposed_key(node: object) -> fx.Node | None:
    """k if `node` is k.transpose(-2, -1) of a 4-D k (any spelling of the last two dims), else None."""
    if not _is_call(node, (torch.transpose,), ("transpose",)):
        return None
    dims = {d % 4 for d in node.args[1:3] if isinstance(d, int)}
    return node.args[0] if dims == {2, 3} else None


@attention_pattern(_is_softmax)
def _match_eager(softmax: fx.Node) -> _Core | str:
    """matmul(q, k^T) -> [* scale | / d] -> [+ mask] -> softmax(-1) -> [cast] -> [dropout] -> matmul(., v)."""
    if _arg(softmax, 1, "dim") not in (-1, 3):
        return "softmax is not over the last dim"
    chain = _scores_chain(softmax.args[0])
    if isinstance(chain, str):
        return chain
    scores, scale, mask, nodes = chain
    query, key_t = scores.args[:2]
    key_transposed = _transposed_key(key_t)
    if key_transposed is None or not _only_user_is(key_t, scores):
        return "the scores matmul is not q @ k.transpose(-2, -1)"
    nodes = [key_t, *nodes, softmax]
    node = softmax
    while True:
        if len(node.users) != 1:
            return "the attention probabilities are used outside the attention"
        (user,) = node.users
        if _is_matmul(user) and user.args[0] is node:
            break
        is_dropout = _is_call(user, (torch.nn.functional.dropout,))
        if is_dropout and _arg(user, 1, "p", 0.5) != 0.0 and _arg(user, 2, "training", True):
            return "dropout is active"
        if not (is_dropout or _is_call(user, (), _CASTS)):
            return f"unexpected {user.target} between softmax and matmul(., v)"
        nodes.append(user)
        node = user
    output = user
    key, key_repeat = _unrepeat_kv(key_transposed, key_t)
    value, value_repeat = _unrepeat_kv(output.args[1], output)
    if bool(key_repeat) != bool(value_repeat):
        return "only one of key / value goes through repeat_kv"
    pattern = "eager_repeat_kv" if key_repeat else "eager"
    nodes = (*key_repeat, *value_repeat, *nodes, output)
    return _Core(pattern, query, key, value, mask, output, nodes, scale, False)


# --------------------------------------------------------------------------------------------
# Module stack: which module an anchor belongs to, and whether it is language-model self-attention
# --------------------------------------------------------------------------------------------

_ATTENTION_NAMES = frozenset({"self_attn", "attn", "attention", "self_attention"})
# Words of module attribute names (snake_case) and class names (CamelCase, so "Onevision" is not
# "Vision") that mark an attention as not the language model's self-attention.
_NOT_LM_WORDS = frozenset({"vision", "visual", "projector", "connector", "audio", "speech"})
_NOT_LM_CLASS = re.compile(r"Vision|Visual|Projector|Connector|Audio|Speech")
_CROSS_CLASS = re.compile(r"Cross")


def _module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(qualified path, class name) of the modules enclosing `node`, outermost first."""
    stack = []
    for path, cls in module_stack_entries(node):
        name = cls.__name__ if isinstance(cls, type) else str(cls).rsplit(".", 1)[-1]
        stack.append((path, name))
    return stack


def _attention_module(stack: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The innermost attention module of the stack (by attribute name or class name)."""
    for path, name in reversed(stack):
        if path.rsplit(".", 1)[-1] in _ATTENTION_NAMES or name.lower().endswith("attention"):
            return path, name
    return None


def _exclusion(stack: list[tuple[str, str]]) -> str | None:
    """Why an attention under this module stack is not language-model self-attention, or None."""
    for path, name in stack:
        for part in path.split("."):
            words = set(part.lower().split("_"))
            if words & _NOT_LM_WORDS:
                return f"not in the language model ({part})"
            if "cross" in words or part == "encoder_attn":
                return f"cross-attention ({part})"
        if _NOT_LM_CLASS.search(name):
            return f"not in the language model ({name})"
        if _CROSS_CLASS.search(name):
            return f"cross-attention ({name})"
    return None


def _layer_index(path: str) -> int | None:
    """The last integer component of the module path ("...layers.3.self_attn" -> 3)."""
    numbers = [int(part) for part in path.split(".") if part.isdigit()]
    return numbers[-1] if numbers else None


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _mask_kind(core: _Core) -> MaskKind:
    if core.mask is None:
        return "causal_flag" if core.is_causal else "none"
    fake = _fake(core.mask)
    return "bool" if fake is not None and fake.dtype == torch.bool else "additive"


def _build(core: _Core, path: str, order: dict[fx.Node, int]) -> AttentionMatch | str:
    """The match with shapes filled in from fake-tensor metadata, or why its shapes do not fit."""
    q, k, v = (_fake(n) for n in (core.query, core.key, core.value))
    if any(t is not None and t.dim() != 4 for t in (q, k, v)):
        return "query / key / value are not 4-D (batch, heads, seq, head_dim)"
    num_heads = _static(q.shape[1]) if q is not None else None
    head_dim = _static(q.shape[3]) if q is not None else None
    num_kv_heads = _static(k.shape[1]) if k is not None else None
    return AttentionMatch(
        layer_index=_layer_index(path),
        module_path=path,
        pattern=core.pattern,
        query=core.query,
        key=core.key,
        value=core.value,
        mask=core.mask,
        mask_kind=_mask_kind(core),
        output=core.output,
        nodes=tuple(sorted(core.nodes, key=order.__getitem__)),
        scale=core.scale,
        is_causal=core.is_causal,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
    )


def find_attention(gm: fx.GraphModule) -> tuple[list[AttentionMatch], list[SkippedAttention]]:
    """Language-model self-attention computations of `gm` in graph order, and the attention-like nodes skipped.

    A softmax counts as attention-like only inside an attention module. An SDPA call always does,
    but one without an enclosing attention module in `nn_module_stack` (e.g. in a frame resumed
    after a graph break inside a vision tower) is skipped: nothing says whose attention it is.
    """
    matches: list[AttentionMatch] = []
    skipped: list[SkippedAttention] = []
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:
        matchers = [fn for anchor, fn in _MATCHERS if anchor(node)]
        if not matchers:
            continue
        stack = _module_stack(node)
        module = _attention_module(stack)
        if module is None and not _is_sdpa(node):
            continue
        path = module[0] if module is not None else ""
        reason = "no attention module in nn_module_stack" if module is None else _exclusion(stack)
        if reason is None:
            results = [fn(node) for fn in matchers]
            core = next((r for r in results if isinstance(r, _Core)), None)
            built = _build(core, path, order) if core is not None else "; ".join(results)
            if isinstance(built, AttentionMatch):
                matches.append(built)
                continue
            reason = built
        skipped.append(SkippedAttention(path, f"{node.name}: {reason}"))
    return matches, skipped

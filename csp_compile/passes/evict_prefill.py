"""Rewrite a prefill graph: each language-model attention becomes ``csp::prefill_attention``.

A *site* is an attention match (``find_attention``) whose K/V are a cache update ``torch.cat``
of an empty cache with this step's K/V, and whose cat outputs Dynamo writes back into the cache
layer (graph outputs). The rewrite feeds the op the cat outputs, makes the op's pruned K/V the
graph outputs in their place (so Dynamo stores them in ``layer.keys``/``layer.values``), appends
each site's kept indices and slot validity as extra outputs, and adds two inputs: the modality
ids and the 2-D padding mask of the prompt. A bool attention mask shared by the sites is checked once
per forward (``mask_is_causal_graph``, before its first site): when it is exactly causal the op runs
SDPA with ``is_causal=True`` (bit-identical, and it skips the blocks above the diagonal) instead of
SDPA converting the bool mask to a float one in every layer; and the sites share one materialised
copy of the mask (``shared_mask_graph``) instead of Inductor writing it once per site (CPU; see
``csp::prefill_attention``). Decode graphs (the cache already held tokens) and layers whose cache is
not a plain full-attention cat (sliding windows) are left alone.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from csp_compile.config import CSPConfig
from csp_compile.ops import config_op_args, mask_is_causal_graph, shared_mask_graph
from csp_compile.passes.find_attention import AttentionMatch, SkippedAttention, find_attention

PREFILL_OP = torch.ops.csp.prefill_attention.default
_PASS_THROUGH = ("contiguous", "clone")


@dataclass(frozen=True)
class Site:
    """A language-model attention to rewrite, with the cache updates of its key and value."""

    match: AttentionMatch
    key_cat: fx.Node
    value_cat: fx.Node


@dataclass(frozen=True)
class PrefillPlan:
    """What a graph holds: the sites to rewrite and what was left alone (module path, reason)."""

    sites: tuple[Site, ...]
    left_alone: tuple[SkippedAttention, ...]
    matches: tuple[AttentionMatch, ...]
    continued: tuple[Site, ...] = ()  # full-attention layers attending over a non-empty cache (decode, new turn)


@dataclass(frozen=True)
class PrefillRewrite:
    """A rewritten graph's calling convention: ``num_outputs`` original outputs come first, then per
    site in ``layer_indices`` order (kept_indices, slot_valid, last ``window`` query rows) for a
    prefill, (last ``window`` query rows) for a graph over a non-empty cache."""

    num_outputs: int
    layer_indices: tuple[int | None, ...]


def _cache_cat(node: object) -> fx.Node | None:
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.target is torch.cat:
            return node
        if node.op == "call_method" and node.target in _PASS_THROUGH:
            node = node.args[0]
        else:
            return None
    return None


def _fake(node: object) -> torch.Tensor | None:
    value = node.meta.get("example_value") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _is_empty_cache(node: object) -> bool:
    fake = _fake(node)
    return fake is not None and isinstance(fake.numel(), int) and fake.numel() == 0


def plan_prefill(gm: fx.GraphModule) -> PrefillPlan:
    """Find the attentions of ``gm`` and decide which are prefill sites (pure analysis)."""
    matches, skipped = find_attention(gm)
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = {a for a in output_node.args[0] if isinstance(a, fx.Node)}  # Dynamo returns a tuple
    sites, continued, left_alone = [], [], list(skipped)
    for match in matches:
        key_cat, value_cat = _cache_cat(match.key), _cache_cat(match.value)
        reason = None
        if key_cat is None or value_cat is None:
            reason = "no KV-cache update feeds this attention (use_cache=False?)"
        elif key_cat not in outputs or value_cat not in outputs:
            reason = "the cache layer does not store the whole update (sliding-window layer): kept whole"
        elif not isinstance(match.scale, float):
            reason = "attention scale is not a constant (dynamic=True?)"
        elif not (_is_empty_cache(key_cat.args[0][0]) and _is_empty_cache(value_cat.args[0][0])):
            continued.append(Site(match, key_cat, value_cat))
            reason = "decode or continued prefill: the cache already held tokens (window queries exposed)"
        if reason is None:
            sites.append(Site(match, key_cat, value_cat))
        else:
            left_alone.append(SkippedAttention(match.module_path, reason))
    return PrefillPlan(tuple(sites), tuple(left_alone), tuple(matches), tuple(continued))


def _placeholder_after(graph: fx.Graph, anchor: fx.Node, name: str, example: torch.Tensor) -> fx.Node:
    with graph.inserting_after(anchor):
        node = graph.placeholder(name)
    node.meta["example_value"] = example
    node._dynamo_source = None  # AOTAutograd checks every placeholder has the attribute
    return node


def _full_bool_mask(match: AttentionMatch) -> bool:
    """Whether the site's mask is a bool (..., Lq, Lkv) tensor of the attention's full query and key
    lengths (not broadcast along them): the shape SDPA's ``is_causal`` mask has."""
    mask, query, key = _fake(match.mask), _fake(match.query), _fake(match.key)
    if mask is None or query is None or key is None or mask.dtype != torch.bool or mask.dim() < 2:
        return False
    return _same_size(mask.shape[-2], query.shape[-2]) and _same_size(mask.shape[-1], key.shape[-2])


def _same_size(a: int | torch.SymInt, b: int | torch.SymInt) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return statically_known_true(a == b)


def rewrite_prefill(gm: fx.GraphModule, plan: PrefillPlan, config: CSPConfig, *, prompt_inputs: bool) -> PrefillRewrite:
    """Apply ``plan`` to ``gm`` in place (``gm`` must be a copy of Dynamo's graph). With
    ``prompt_inputs`` the graph gains two trailing inputs, the (b, L) modality ids and padding
    mask; without, every token counts as text and none as padding."""
    graph = gm.graph
    first_query = _fake(plan.sites[0].match.query)
    modality = padding = None
    if prompt_inputs:
        batch, _, length, _ = first_query.shape
        with first_query.fake_mode:
            modality_example = torch.empty(batch, length, dtype=torch.int64)
            padding_example = torch.empty(batch, length, dtype=torch.int64)
        last = [n for n in graph.nodes if n.op == "placeholder"][-1]
        modality = _placeholder_after(graph, last, "csp_modality", modality_example)
        padding = _placeholder_after(graph, modality, "csp_attention_mask_2d", padding_example)

    base_kwargs = config_op_args(config)
    replaced: dict[fx.Node, fx.Node] = {}
    extra_outputs: list[fx.Node] = []
    bool_masks: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}  # model mask -> (shared mask, causal flag)
    for site in plan.sites:
        m = site.match
        enable_gqa = m.pattern == "sdpa_gqa"
        mask = m.mask
        op_kwargs = dict(base_kwargs)
        if _full_bool_mask(m):
            if m.mask not in bool_masks:
                with graph.inserting_before(m.output):
                    shared = graph.call_function(shared_mask_graph, (m.mask,))
                    flag = graph.call_function(mask_is_causal_graph, (shared,))
                with first_query.fake_mode:
                    shared.meta["example_value"] = shared_mask_graph(_fake(m.mask))
                    flag.meta["example_value"] = mask_is_causal_graph(shared.meta["example_value"])
                bool_masks[m.mask] = shared, flag
            mask, op_kwargs["mask_is_causal"] = bool_masks[m.mask]
        args = (m.query, site.key_cat, site.value_cat, mask, modality, padding, m.scale, m.is_causal, enable_gqa)
        with graph.inserting_before(m.output):
            op = graph.call_function(PREFILL_OP, args, op_kwargs)
            items = [graph.call_function(operator.getitem, (op, i)) for i in range(5)]
        with first_query.fake_mode:
            examples = PREFILL_OP(*fx.node.map_arg(args, _fake), **fx.node.map_arg(op_kwargs, _fake))
        op.meta["example_value"] = examples
        for item, example in zip(items, examples):
            item.meta["example_value"] = example
        m.output.replace_all_uses_with(items[0])
        replaced[site.key_cat], replaced[site.value_cat] = items[2], items[3]
        extra_outputs += [items[1], items[4], _window_rows(graph, m.query, config.window, op)]

    output_node = next(n for n in graph.nodes if n.op == "output")
    outputs = list(output_node.args[0])
    output_node.args = (tuple(replaced.get(o, o) for o in outputs) + tuple(extra_outputs),)
    # Erase only the replaced attention nodes: a whole-graph dead-code pass would also drop
    # in-place updates whose results go unused (e.g. Llama4's MoE ``out.add_(...)``).
    for site in plan.sites:
        for node in reversed(site.match.nodes):
            if not node.users:
                graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return PrefillRewrite(len(outputs), tuple(s.match.layer_index for s in plan.sites))


def expose_window_queries(gm: fx.GraphModule, sites: tuple[Site, ...], window: int) -> PrefillRewrite:
    """Append each continued site's last ``window`` post-RoPE query rows (b, hq, <= window, D) to the
    outputs of ``gm`` (a copy of Dynamo's graph), for re-selection after the forward."""
    graph = gm.graph
    output_node = next(n for n in graph.nodes if n.op == "output")
    outputs = tuple(output_node.args[0])
    extra = [_window_rows(graph, site.match.query, window, output_node) for site in sites]
    output_node.args = (outputs + tuple(extra),)
    graph.lint()
    gm.recompile()
    return PrefillRewrite(len(outputs), tuple(s.match.layer_index for s in sites))


def _window_rows(graph: fx.Graph, query: fx.Node, window: int, before: fx.Node) -> fx.Node:
    """A node of ``query[:, :, -window:]`` (the last ``window`` post-RoPE query rows), before ``before``."""
    with graph.inserting_before(before):
        rows = graph.call_function(operator.getitem, (query, (slice(None), slice(None), slice(-window, None))))
    fake = _fake(query)
    if fake is not None:
        with fake.fake_mode:
            rows.meta["example_value"] = fake[:, :, -window:]
    return rows


def copy_dynamo_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A rewritable copy of Dynamo's graph: Dynamo reads its own graph (placeholders' metadata,
    the output node) after the backend returns, so that one must stay untouched."""
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, value_map))
    for old, new in value_map.items():
        if old.op == "placeholder":
            new._dynamo_source = getattr(old, "_dynamo_source", None)
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    if hasattr(gm, "_param_name_to_source"):
        copy._param_name_to_source = gm._param_name_to_source
    return copy

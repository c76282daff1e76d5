"""Rewrite a prefill graph: each language-model attention also selects the tokens its cache keeps.

A *site* is an attention match (``find_attention``) whose K/V are a cache update ``torch.cat``
of an empty cache with this step's K/V, and whose cat outputs Dynamo writes back into the cache
layer (graph outputs). Per site the rewrite emits, in place of the model's SDPA call:

1. ``csp::attention``: the same attention output, plus the row log-sum-exp of the window rows;
2. the selection, ``prefill_selection`` (``templates``): a plain function node that AOTAutograd traces
   into aten ops for Inductor to fuse, or the eager ``csp::select_reference`` op for a policy that
   cannot be traced (``choose_scoring``);
3. ``gather_kept`` of the key and value: the pruned K/V become the graph outputs in place of the cat
   outputs (so Dynamo stores them in ``layer.keys`` / ``layer.values``).

Each site's kept indices, slot validity and last ``window`` query rows are appended as extra outputs,
and the graph gains two inputs: the prompt's modality ids and 2-D padding mask. A bool attention mask
shared by the sites is checked once per forward (``mask_is_causal_graph``, before its first site): when
it is causal apart from padding keys the attention runs with ``is_causal=True`` and a (b, 1, 1, L) mask
of the padding keys (bit-identical, and it skips the blocks above the diagonal); and the sites share one
materialised uint8 copy of the mask (``shared_mask_graph``) instead of Inductor writing it once per site. Decode graphs (the cache already held tokens) and
layers whose cache is not a plain full-attention cat (sliding windows) are left alone.
"""

from __future__ import annotations

import contextlib
import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from csp_compile.config import CSPConfig
from csp_compile.internals import copy_placeholder_sources, new_placeholder_source
from csp_compile.ops import config_to_op_arg, mask_is_causal_graph, shared_mask_graph
from csp_compile.passes.find_attention import AttentionMatch, SkippedAttention, find_attention
from csp_compile.selection import gather_kept
from csp_compile.templates.lowering import choose_scoring
from csp_compile.templates.prefill_selection import selection_node_target

ATTENTION_OP = torch.ops.csp.attention.default
SELECT_REFERENCE_OP = torch.ops.csp.select_reference.default
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
    new_placeholder_source(node)
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

    traced = choose_scoring(config.policy).traced
    replaced: dict[fx.Node, fx.Node] = {}
    extra_outputs: list[fx.Node] = []
    bool_masks: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    previous: list[fx.Node] = []
    for rank, site in enumerate(plan.sites):
        m = site.match
        attention, output, window_lse, mask = _emit_attention(graph, m, site.key_cat, site.value_cat, config.window,
                                                              bool_masks, after=previous)
        with graph.inserting_before(m.output):
            if traced:
                target = selection_node_target(config, m.scale, m.is_causal, (rank, len(plan.sites)))
                selection = call_node(graph, target, (m.query, site.key_cat, window_lse, mask, modality, padding))
            else:
                selection = call_node(graph, SELECT_REFERENCE_OP, (m.query, site.key_cat, mask, modality, padding, m.scale,
                                                               m.is_causal, config_to_op_arg(config), rank,
                                                               len(plan.sites)))
            kept, slot_valid = (call_node(graph, operator.getitem, (selection, i)) for i in range(2))
            replaced[site.key_cat] = call_node(graph, gather_kept, (site.key_cat, kept, slot_valid))
            replaced[site.value_cat] = call_node(graph, gather_kept, (site.value_cat, kept, slot_valid))
        previous = [replaced[site.key_cat], replaced[site.value_cat]]
        m.output.replace_all_uses_with(output)
        extra_outputs += [kept, slot_valid, _window_rows(graph, m.query, config.window, attention)]

    output_node = next(n for n in graph.nodes if n.op == "output")
    outputs = list(output_node.args[0])
    output_node.args = (tuple(replaced.get(o, o) for o in outputs) + tuple(extra_outputs),)
    _erase_replaced(gm, plan.sites)
    return PrefillRewrite(len(outputs), tuple(s.match.layer_index for s in plan.sites))


def rewrite_attention_only(gm: fx.GraphModule, plan: PrefillPlan) -> None:
    """The baseline ``csp-compile bench`` measures CSP against: each site's attention becomes the same
    ``csp::attention`` (with the shared mask and its causal shortcut) and nothing else changes, so the
    difference to ``rewrite_prefill`` is the selection and the gathers alone."""
    bool_masks: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    for site in plan.sites:
        m = site.match
        _, output, _, _ = _emit_attention(gm.graph, m, site.key_cat, site.value_cat, 1, bool_masks)
        m.output.replace_all_uses_with(output)
    _erase_replaced(gm, plan.sites)


def _emit_attention(graph: fx.Graph, m: AttentionMatch, key: fx.Node, value: fx.Node, lse_rows: int,
                    bool_masks: dict[fx.Node, tuple[fx.Node, fx.Node]], after: list[fx.Node] = ()
                    ) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node]:
    """``csp::attention`` in place of ``m``'s SDPA call, before ``m.output``: (op node, output, window
    lse, the mask it was given), ordered after the nodes ``after`` (the previous site's gathered K/V:
    Inductor would otherwise run a layer's selection and gathers after the next layer's attention, with
    two layers' whole K/V alive at the peak). A full bool mask is shared by the sites through ``bool_masks`` (model
    mask -> (shared copy, causal flag)), created before its first site."""
    mask, mask_is_causal = m.mask, None
    if _full_bool_mask(m):
        if m.mask not in bool_masks:
            with graph.inserting_before(m.output):
                shared = call_node(graph, shared_mask_graph, (m.mask,))
                bool_masks[m.mask] = shared, call_node(graph, mask_is_causal_graph, (m.mask,))
        mask, mask_is_causal = bool_masks[m.mask]
    with graph.inserting_before(m.output):
        attention = call_node(graph, ATTENTION_OP, (m.query, key, value, mask, m.scale, m.is_causal,
                                                m.pattern == "sdpa_gqa", mask_is_causal, lse_rows, list(after)))
        output, window_lse = (call_node(graph, operator.getitem, (attention, i)) for i in range(2))
    return attention, output, window_lse, mask


def _erase_replaced(gm: fx.GraphModule, sites: tuple[Site, ...]) -> None:
    # Erase only the replaced attention nodes: a whole-graph dead-code pass would also drop
    # in-place updates whose results go unused (e.g. Llama4's MoE ``out.add_(...)``).
    for site in sites:
        for node in reversed(site.match.nodes):
            if not node.users:
                gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()


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


def call_node(graph: fx.Graph, target: object, args: tuple) -> fx.Node:
    """A ``call_function`` node with its example value (what Dynamo's graph carries and later passes read)."""
    node = graph.call_function(target, args)
    fakes = fx.node.map_arg(args, lambda arg: arg.meta.get("example_value"))
    mode = next((a.fake_mode for a in fakes if isinstance(a, torch.Tensor) and hasattr(a, "fake_mode")), None)
    with mode or contextlib.nullcontext():
        node.meta["example_value"] = target(*fakes)
    return node


def _window_rows(graph: fx.Graph, query: fx.Node, window: int, before: fx.Node) -> fx.Node:
    """A node of a copy of ``query[:, :, -window:]`` (the last ``window`` post-RoPE query rows), before
    ``before``: a copy, so the graph's output does not keep the prompt's whole Q alive (a view would,
    one (b, hq, L, D) tensor per layer until the forward returns)."""
    with graph.inserting_before(before):
        rows = call_node(graph, operator.getitem, (query, (slice(None), slice(None), slice(-window, None))))
        return call_node(graph, torch.clone, (rows,))


def copy_dynamo_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A rewritable copy of Dynamo's graph: Dynamo reads its own graph (placeholders' metadata,
    the output node) after the backend returns, so that one must stay untouched."""
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, value_map))
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    copy_placeholder_sources(gm, copy, value_map)
    return copy

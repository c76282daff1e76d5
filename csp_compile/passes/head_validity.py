"""Decode graphs under adaptive budgets: each evicted layer's mask learns which of its slots each head holds.

With ``layer_budget`` / ``head_budget`` adaptive a layer's KV heads keep different counts in one
rectangular cache (``adaptive``), so an empty slot differs per layer and per head, which the model's
own mask (one per call, per batch row) cannot say. For every attention over a non-empty cache (a
``continued`` site) the graph gains one input, the layer's per-head validity of its cached slots
(b, hkv, cached), and the site's mask becomes the model's mask AND that validity (the new tokens are
always valid), repeated over each KV head's query heads. The hooks fill the model's mask slot columns
with True for such a cache, so the per-head validity alone decides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx

from csp_compile.internals import new_placeholder_source
from csp_compile.passes.evict_prefill import Site, call_node

__all__ = ["mask_by_head_validity", "with_head_validity"]


def with_head_validity(mask: torch.Tensor | None, cached_valid: torch.Tensor, new_keys: torch.Tensor,
                       query_heads: int) -> torch.Tensor:
    """The attention mask (b, hq, q | 1, cached + new) of ``mask`` (bool or additive, broadcastable, or
    None) with the cached slots of each head where ``cached_valid`` (b, hkv, cached) is False hidden;
    ``new_keys`` (b, hkv, new, D) are this call's keys (always valid)."""
    valid = torch.cat([cached_valid, torch.ones_like(new_keys[..., 0], dtype=torch.bool)], dim=-1)
    valid = valid.repeat_interleave(query_heads // valid.shape[1], dim=1)[:, :, None, :]
    if mask is None:
        return valid
    if mask.dtype == torch.bool:
        return mask & valid
    return mask.masked_fill(~valid, torch.finfo(mask.dtype).min)


def mask_by_head_validity(gm: fx.GraphModule, sites: tuple[Site, ...]) -> list[fx.Node]:
    """Rewrite each site's mask of ``gm`` (a copy of Dynamo's graph) in place; returns the new trailing
    placeholders, one per site in ``sites`` order (their ``example_value`` is the fake input)."""
    graph = gm.graph
    placeholders: list[fx.Node] = []
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for i, site in enumerate(sites):
        m = site.match
        cached, new = site.key_cat.args[0]
        fake = cached.meta["example_value"]
        with graph.inserting_after(last):
            last = graph.placeholder(f"csp_head_valid_{i}")
        with fake.fake_mode:
            last.meta["example_value"] = torch.empty(fake.shape[:3], dtype=torch.bool)
        new_placeholder_source(last)
        placeholders.append(last)
        consumer = _mask_consumer(m)
        query_heads = m.query.meta["example_value"].shape[1]
        with graph.inserting_before(consumer):
            masked = call_node(graph, with_head_validity, (m.mask, last, new, query_heads))
        if m.mask is not None:
            consumer.replace_input_with(m.mask, masked)
        elif len(consumer.args) > 3:
            consumer.args = (*consumer.args[:3], masked, *consumer.args[4:])
        else:
            consumer.kwargs = {**consumer.kwargs, "attn_mask": masked}
    graph.lint()
    gm.recompile()
    return placeholders


def _mask_consumer(m) -> fx.Node:
    """The node of the match that reads its mask: the SDPA call, or the eager chain's ``scores + mask``."""
    for node in m.nodes:
        if node.op == "call_function" and node.target is F.scaled_dot_product_attention:
            if m.mask is None and m.is_causal:
                raise NotImplementedError(f"csp: {m.module_path} attends causally without a mask over a non-empty cache: "
                                          "adaptive budgets cannot mask its heads' empty slots")
            return node
        if m.mask is not None and m.mask in node.all_input_nodes:
            return node
    raise NotImplementedError(f"csp: {m.module_path} ({m.pattern}) has no mask to add the heads' empty slots to: "
                              "use layer_budget='uniform' and head_budget='uniform'")

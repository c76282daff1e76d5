"""The ``csp`` torch.compile backend: rewrite prefill attention to evicting ops, then Inductor.

``CSPBackend(state)`` is what ``optimize`` installs: the model's pre-hook puts each prompt's
modality ids and padding mask in the state, and the rewritten prefill graph takes them as two
extra inputs. The string ``backend="csp"`` (``options=`` holds CSPConfig fields) builds a
backend without hooks: every token counts as text and none as padding. Every graph goes to
Inductor; the callable returned for a prefill graph strips the kept indices and slot validity
into the state.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch._dynamo import register_backend
from torch._inductor.compile_fx import compile_fx

import csp_compile.ops  # noqa: F401  (registers torch.ops.csp)
from csp_compile.adaptive import is_adaptive
from csp_compile.cache import EvictionState, LayerEviction
from csp_compile.config import CSPConfig
from csp_compile.internals import dynamo_backend_registered, fake_mode_of
from csp_compile.passes.head_validity import mask_by_head_validity
from csp_compile.passes.evict_prefill import (
    PrefillPlan,
    copy_dynamo_graph,
    expose_window_queries,
    plan_prefill,
    rewrite_prefill,
)


@dataclass
class CSPState(EvictionState):
    """What an optimised model carries between calls: its config, the current prompt's modality
    ids and padding mask (``None`` when no pre-hook provides them), and what was compiled."""

    config: CSPConfig = field(default_factory=CSPConfig)
    hooked: bool = False  # a pre-hook sets modality / attention_mask_2d before each prefill
    modality: torch.Tensor | None = None  # (b, L)
    attention_mask_2d: torch.Tensor | None = None  # (b, L) int64, 1 = real token
    slot_valid_for_masks: torch.Tensor | None = None  # (b, P) for the language model pre-hook to put in the masks
    head_valid_for_call: dict[int, torch.Tensor] = field(default_factory=dict)  # adaptive: per layer (b, hkv, cached)
    plans: list[PrefillPlan] = field(default_factory=list)  # one per compiled prefill graph
    compiled_graphs: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "continued": 0, "other": 0})
    window_queries: dict[int, torch.Tensor] = field(default_factory=dict)  # last forward's, per continued layer
    scales: dict[int, float] = field(default_factory=dict)  # attention scale per language-model layer
    pending: Any = None  # the model call between its pre- and post-hook (csp_compile.hooks)

    def reset(self) -> None:
        super().reset()
        self.slot_valid_for_masks = None
        self.window_queries.clear()
        self.head_valid_for_call.clear()

    def release(self) -> None:
        """Drop every tensor and graph plan (``restore``): compiled graphs may outlive the model."""
        self.reset()
        self.pending = None
        self.modality = self.attention_mask_2d = None
        self.plans.clear()
        self.scales.clear()


class CSPBackend:
    """A torch.compile backend evicting the KV cache at prefill per ``state.config``."""

    def __init__(self, state: CSPState) -> None:
        self.state = state

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        plan = plan_prefill(gm)
        if not plan.sites:
            if plan.continued and self.state.hooked:
                return self._continued(gm, example_inputs)
            self.state.compiled_graphs["other"] += 1
            return compile_fx(gm, list(example_inputs))
        rewritten = copy_dynamo_graph(gm)
        plan = plan_prefill(rewritten)
        layout = rewrite_prefill(rewritten, plan, self.state.config, prompt_inputs=self.state.hooked)
        if not self.state.hooked:
            warnings.warn(
                "csp backend: no modality ids for this prefill graph (compiled without csp_compile.optimize): "
                "every token counts as text and none as padding",
                stacklevel=2,
            )
        self.state.plans.append(plan)
        self.state.compiled_graphs["prefill"] += 1
        self._record_scales(plan.sites)
        example_inputs = list(example_inputs)
        if self.state.hooked:
            batch, length = _prompt_shape(plan)
            with fake_mode_of(example_inputs):
                example_inputs += [torch.empty(batch, length, dtype=torch.int64) for _ in range(2)]
        compiled = compile_fx(rewritten, example_inputs)
        state = self.state

        def run(*args: Any) -> Any:
            if state.hooked:
                if state.modality is None:
                    raise RuntimeError(
                        "csp: a prefill of the optimised language model ran without modality ids: call the "
                        "whole model (model(...) / model.generate(...)), not its language model alone"
                    )
                args = (*args, state.modality, state.attention_mask_2d)
            outputs = compiled(*args)
            extras = outputs[layout.num_outputs:]
            for i, layer_index in enumerate(layout.layer_indices):
                key = layer_index if layer_index is not None else i
                state.layers[key] = LayerEviction(kept=extras[3 * i], slot_valid=extras[3 * i + 1])
                state.window_queries[key] = extras[3 * i + 2]  # the graph's own copy (not a view of the whole Q)
            state.physical_length = int(extras[0].shape[-1])
            return outputs[: layout.num_outputs]

        return run


    def _record_scales(self, sites: Sequence[Any]) -> None:
        for site in sites:
            if site.match.layer_index is not None:
                self.state.scales[site.match.layer_index] = site.match.scale

    def _continued(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        """A graph over a non-empty cache (decode, a new turn): compiled as is, plus each full-attention
        layer's last ``window`` query rows as extra outputs, which ``run`` moves into the state."""
        rewritten = copy_dynamo_graph(gm)
        plan = plan_prefill(rewritten)
        example_inputs = list(example_inputs)
        validity_layers: list[int] = []
        if is_adaptive(self.state.config):  # per-head empty slots: the masks read them from extra inputs
            placeholders = mask_by_head_validity(rewritten, plan.continued)
            example_inputs += [node.meta["example_value"] for node in placeholders]
            validity_layers = [site.match.layer_index if site.match.layer_index is not None else i
                               for i, site in enumerate(plan.continued)]
        layout = expose_window_queries(rewritten, plan.continued, self.state.config.window)
        self._record_scales(plan.continued)
        self.state.compiled_graphs["continued"] += 1
        compiled = compile_fx(rewritten, example_inputs)
        state = self.state

        def run(*args: Any) -> Any:
            if validity_layers:
                args = (*args, *(state.head_valid_for_call[index] for index in validity_layers))
            outputs = compiled(*args)
            for layer_index, rows in zip(layout.layer_indices, outputs[layout.num_outputs:]):
                if layer_index is not None:
                    state.window_queries[layer_index] = rows
            return outputs[: layout.num_outputs]

        return run


def _prompt_shape(plan: PrefillPlan) -> tuple[Any, Any]:
    fake = plan.sites[0].match.query.meta["example_value"]
    return fake.shape[0], fake.shape[2]


def csp_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: dict | None = None, mode: str | None = None) -> Callable:
    """``torch.compile(language_model, backend="csp", options={"budget": 0.2, ...})``.

    Without ``csp_compile.optimize`` there is no pre-hook: modality ids are unknown (all text,
    so CSP ranks by its self score alone) and padding is assumed absent.
    """
    if mode is not None:
        raise ValueError(f"backend 'csp' takes no mode (got {mode!r}): pass CSPConfig fields in options=")
    state = CSPState(config=CSPConfig().replace(**(options or {})))
    return CSPBackend(state)(gm, example_inputs)


def register_csp_backend() -> None:
    """Make ``backend="csp"`` a string. An installed package registers it through its
    ``torch_dynamo_backends`` entry point, which torch loads on first use (registering here too
    would make torch's load fail as a duplicate); a bare source checkout registers it here."""
    from importlib.metadata import entry_points

    if any(ep.name == "csp" for ep in entry_points(group="torch_dynamo_backends")) or dynamo_backend_registered("csp"):
        return
    register_backend(csp_backend, name="csp")

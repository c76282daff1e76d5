"""Which share of a compiled prefill's time is CSP's own work (window ``Q K^T``, scoring, top-k, gathers).

Method (origins, not names): while the bench compiles, ``track()`` makes Inductor

1. run a pre-grad pass that lists the CSP nodes of each graph it receives (the ``csp_prefill_selection``
   / ``csp::select_reference`` selection nodes, the ``gather_kept`` K/V gathers, the window-row copies
   the rewrite appends as extra outputs): the names every later node traces back to through
   ``node.meta["from_node"]``;
2. record, as it generates code, every kernel with the post-grad nodes it computes (Inductor's own
   provenance hook, ``set_kernel_post_grad_provenance_tracing``): a fused C++ kernel is "csp" when all
   its nodes come from CSP nodes, "model" when none does, "mixed" otherwise; an extern call (a
   matmul, ``aten::topk``, ``csp::attention``) by the node it computes;
3. wrap each C++ kernel in a profiler record of its name (``cpp.enable_kernel_profile``).

A prefill profiled by ``torch.profiler`` then has, under each compiled graph's call, one event per
kernel (found by name) and per extern call (the k-th ``aten::bmm`` event is the graph's k-th bmm
call: the wrapper runs its calls in the order they were generated). Ops outside the graphs are CSP's
when the Python stack that issued them passes through ``csp_compile`` (the forward hooks), the
model's otherwise. The share is CSP's time over the whole prefill's (the top-level events' total CPU
time); "mixed" kernels are counted in ``csp_share_upper`` only. FX graph caching is off meanwhile
(a cached graph would skip code generation, so nothing would be recorded).
"""

from __future__ import annotations

import contextlib
import operator
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import fx
from torch.profiler import ProfilerActivity, profile
from transformers import PreTrainedModel

from csp_compile.bench.prefill import cache_bytes, prefill
from csp_compile.selection import gather_kept

__all__ = ["Ledger", "PrefillShares", "csp_node_names", "profile_prefill", "track"]

_GRAPH_CALL = "## Call CompiledFxGraph"
_KERNEL = re.compile(r"^graph_(\d+)_")
_CSP_FRAME = re.compile(r"csp_compile[/\\](?!bench[/\\])")


def _is_csp_target(target: Any) -> bool:
    name = getattr(target, "__name__", "")
    return (target is gather_kept or name == "csp_prefill_selection"
            or str(target).startswith("csp.select_reference"))


def _is_window_rows(node: fx.Node) -> bool:
    """``torch.clone`` of ``query[..., -window:, :]``, the rewrite's per-site extra output."""
    if node.target is not torch.clone or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    source = node.args[0]
    if source.target is not operator.getitem or not isinstance(source.args[1], tuple) or not source.args[1]:
        return False
    last = source.args[1][-1]
    return isinstance(last, slice) and isinstance(last.start, int) and last.start < 0 and last.stop is None


def csp_node_names(graph: fx.Graph) -> set[str]:
    """Names of the CSP nodes of a (rewritten) Dynamo graph, with the getitems of the selection's outputs."""
    names = {n.name for n in graph.nodes if n.op == "call_function" and (_is_csp_target(n.target) or _is_window_rows(n))}
    names |= {n.name for n in graph.nodes if n.target is operator.getitem and n.args and isinstance(n.args[0], fx.Node)
              and n.args[0].name in names}
    return names


def _event_name(kernel_name: str) -> str:
    """The profiler event of an extern call: ``extern_kernels.bmm`` -> ``aten::bmm``,
    ``torch.ops.csp.attention.default`` -> ``csp::attention``."""
    if kernel_name.startswith("extern_kernels."):
        return "aten::" + kernel_name.removeprefix("extern_kernels.")
    parts = kernel_name.removeprefix("torch.ops.").split(".")
    return f"{parts[0]}::{parts[1]}" if len(parts) >= 2 else kernel_name


@dataclass(frozen=True)
class Kernel:
    """A kernel or extern call: "csp", "model" or "mixed", and the Dynamo-level model nodes it computes."""

    kind: str
    model_roots: frozenset[str]


@dataclass
class GraphRecord:
    """One compiled graph: its C++ kernels (profiler name -> Kernel) and its extern calls in order."""

    kernels: dict[str, Kernel] = field(default_factory=dict)
    externs: list[tuple[str, Kernel]] = field(default_factory=list)  # (event name, Kernel)


@dataclass
class Ledger:
    """What ``track`` recorded: graph id -> ``GraphRecord``."""

    graphs: dict[int, GraphRecord] = field(default_factory=dict)
    csp_names: set[str] = field(default_factory=set)  # of the graph being compiled

    def classify(self, origins: Any) -> Kernel:
        csp = False
        model: set[str] = set()
        for origin in origins:
            if getattr(origin, "op", None) != "call_function":
                continue
            sources = origin.meta.get("from_node") or []
            root = sources[0].name if sources else origin.name
            if root in self.csp_names:
                csp = True
            else:
                model.add(root)
        kind = ("mixed" if model else "csp") if csp else "model"
        return Kernel(kind, frozenset(model))


@contextlib.contextmanager
def track() -> Iterator[Ledger]:
    """Record the kernels of every graph Inductor compiles meanwhile (see the module docstring)."""
    import torch._inductor.codegen.cpp as cpp_codegen
    import torch._inductor.debug as inductor_debug
    from torch._inductor import config as inductor_config
    from torch._inductor.virtualized import V

    ledger = Ledger()
    original = inductor_debug.set_kernel_post_grad_provenance_tracing

    def record(node_schedule: Any, kernel_name: str, is_extern: bool = False) -> int | None:
        graph_id = V.graph.graph_id
        entry = ledger.graphs.setdefault(-1 if graph_id is None else graph_id, GraphRecord())
        if is_extern:
            origin = getattr(node_schedule, "origin_node", None)
            entry.externs.append((_event_name(kernel_name),
                                  ledger.classify([origin] if origin is not None else node_schedule.origins)))
        else:
            origins = [o for s in node_schedule if getattr(s, "node", None) is not None for o in s.node.origins]
            prefix = "" if graph_id is None else f"graph_{graph_id}_"
            entry.kernels[prefix + kernel_name] = ledger.classify(origins)
        return original(node_schedule, kernel_name, is_extern)

    def list_csp_nodes(graph: fx.Graph) -> None:
        ledger.csp_names = csp_node_names(graph)

    patches = {"cpp.enable_kernel_profile": True, "fx_graph_cache": False, "pre_grad_custom_pass": list_csp_nodes,
               "pre_grad_pass_timing": "early"}
    with inductor_config.patch(patches), torch._functorch.config.patch(enable_autograd_cache=False):
        inductor_debug.set_kernel_post_grad_provenance_tracing = record
        cpp_codegen.set_kernel_post_grad_provenance_tracing = record
        try:
            yield ledger
        finally:
            inductor_debug.set_kernel_post_grad_provenance_tracing = original
            cpp_codegen.set_kernel_post_grad_provenance_tracing = original


@dataclass(frozen=True)
class Profiled:
    """One profiled prefill: self CPU microseconds per kind ("csp", "mixed", "model", "hook"), and per
    kernel / extern call (with its ``Kernel``) for splitting the mixed ones."""

    by_kind: dict[str, float]
    by_kernel: list[tuple[str, Kernel, float]]
    unmatched_externs: int
    seconds: float  # wall time of the prefill (under the profiler)
    kv_bytes: int  # K/V bytes the prefill left in the cache
    peak_bytes: int | None  # with ``memory``: peak live tensor bytes (``memory.peak_of``)

    @property
    def total_us(self) -> float:
        return sum(self.by_kind.values())


_MODEL = Kernel("model", frozenset())


def profile_prefill(model: PreTrainedModel, inputs: dict[str, torch.Tensor], ledger: Ledger,
                    memory: bool = False) -> Profiled:
    """Profile one (already compiled) prefill of ``model``; every op's and kernel's self CPU time goes to
    the kernel it runs in (inside a compiled graph) or to CSP's hooks / the model (outside)."""
    from csp_compile.bench.memory import peak_of

    with profile(activities=[ProfilerActivity.CPU], with_stack=True, profile_memory=memory) as prof:
        start = time.perf_counter()
        output = prefill(model, inputs)
        seconds = time.perf_counter() - start
    by_kind = {"csp": 0.0, "mixed": 0.0, "model": 0.0, "hook": 0.0}
    by_kernel: list[tuple[str, Kernel, float]] = []
    unmatched = 0

    def attribute(event: Any, owner: Kernel | None, hook: bool | None, pending: dict[str, list[Kernel]] | None,
                  graph: GraphRecord | None) -> None:
        nonlocal unmatched
        if event.name.startswith(_GRAPH_CALL):
            graph = _graph_of(event, ledger)
            pending = {}
            for name, kernel in (graph.externs if graph else []):
                pending.setdefault(name, []).append(kernel)
        elif not event.is_python_function and owner is None:
            if graph is not None and event.name in graph.kernels:
                owner = graph.kernels[event.name]
            elif pending is not None and pending.get(event.name):
                owner = pending[event.name].pop(0)
            if owner is not None:
                by_kernel.append((_KERNEL.sub("", event.name), owner, event.cpu_time_total))
            elif pending is None and hook is None:  # the outermost op outside the graphs: whose code issued it
                hook = _issued_by_csp(event)
        if not event.is_python_function:
            kind = owner.kind if owner is not None else "hook" if hook else "model"
            by_kind[kind] += event.self_cpu_time_total
        for child in sorted(event.cpu_children, key=lambda e: e.time_range.start):
            attribute(child, owner, hook, pending, graph)
        if event.name.startswith(_GRAPH_CALL) and pending:
            unmatched += sum(len(kernels) for kernels in pending.values())

    for event in sorted((e for e in prof.events() if e.cpu_parent is None), key=lambda e: e.time_range.start):
        attribute(event, None, None, None, None)
    return Profiled(by_kind, by_kernel, unmatched, seconds, cache_bytes(output.past_key_values),
                    peak_of(prof) if memory else None)


def _issued_by_csp(event: Any) -> bool:
    """Whether a Python frame of ``csp_compile`` (not the bench) is among the event's ancestors."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.is_python_function and _CSP_FRAME.search(parent.name):
            return True
        parent = parent.cpu_parent
    return False


def _graph_of(event: Any, ledger: Ledger) -> GraphRecord | None:
    for child in _descendants(event):
        if match := _KERNEL.match(child.name):
            return ledger.graphs.get(int(match.group(1)))
    return None


def _descendants(event: Any) -> Iterator[Any]:
    for child in event.cpu_children:
        yield child
        yield from _descendants(child)


@dataclass(frozen=True)
class PrefillShares:
    """CSP's share of one prefill's self CPU time: ``lower`` counts the kernels computing CSP nodes only,
    ``upper`` adds every kernel fusing CSP and model nodes, ``share`` adds of those only what exceeds
    the time the plain graph spends on the same model nodes (each plain kernel's time spread evenly
    over the model nodes it computes)."""

    share: float
    lower: float
    upper: float
    hook: float  # of which CSP's forward hooks (outside the graphs)
    total_us: float
    unmatched_externs: int
    top: dict[str, float]  # the costliest CSP (and mixed-excess) kernels, microseconds


def split(csp: Profiled, plain: Profiled) -> PrefillShares:
    """CSP's share of ``csp``'s time, the mixed kernels' model part estimated from ``plain`` (same prompt)."""
    per_root: dict[str, float] = {}
    for _, kernel, us in plain.by_kernel:
        for root in kernel.model_roots:
            per_root[root] = per_root.get(root, 0.0) + us / len(kernel.model_roots)
    top: dict[str, float] = {}
    excess = 0.0
    for name, kernel, us in csp.by_kernel:
        if kernel.kind == "mixed":
            us = max(0.0, us - sum(per_root.get(root, 0.0) for root in kernel.model_roots))
            excess += us
        if kernel.kind != "model":
            top[name] = top.get(name, 0.0) + us
    total = csp.total_us
    k = csp.by_kind
    return PrefillShares(
        share=(k["csp"] + k["hook"] + excess) / total, lower=(k["csp"] + k["hook"]) / total,
        upper=(k["csp"] + k["mixed"] + k["hook"]) / total, hook=k["hook"] / total, total_us=total,
        unmatched_externs=csp.unmatched_externs + plain.unmatched_externs,
        top={key: round(us, 1) for key, us in sorted(top.items(), key=lambda kv: -kv[1])[:6]})

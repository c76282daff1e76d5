"""vLLM's CPU attention backend with CSP: score at the prompt's prefill step, compact, shift tables.

At a step that prefills a whole request from scratch (query length == sequence length), each
decoder attention layer first runs vLLM's own attention (the prompt attends to all of itself),
then scores the request's window with ``select.kept_indices`` (``select_kept``'s positions, compiled
once, on the step's post-RoPE Q/K) at the budget ``layout.plan_eviction`` rounds to whole blocks, and writes the
kept K/V of every KV head, in ascending original position, into the slots of the prompt's last
``kept`` logical positions with vLLM's ``cpu_attn_reshape_and_cache``. The first
``freed_blocks`` blocks then hold nothing anyone reads; ``scheduler_hook`` frees them and, at every
later step, the metadata builder drops them from the row's block table and ``seq_lens``.
Positions stay logical: vLLM derives them from ``num_computed_tokens``.
Sliding-window layers are left alone (impl and builder); they need KV cache groups of their own
(vLLM's hybrid KV cache manager, on by default on CPU): ``settings.check_engine`` refuses the manager
off for a model with both kinds, and the builder refuses any group that still mixes them
(``check_group_windows``).
Which rows are such prefills, their plans, selection configs and modality ids are worked out
once per step by the metadata builder (``Compaction``); every layer reuses them, so a layer's
extra work is ``kept_indices``, two gathers and the cache write.

A GPU backend is wrapped the same way: the kept K/V go through that backend's own cache-write op
(``reshape_and_cache_flash`` for FlashAttention) and the builder shifts its block table and
``seq_lens`` before the backend builds its metadata (CUDA-graph buffers are copied into, not replaced).
"""

from __future__ import annotations

import dataclasses

import torch

from vllm import _custom_ops as ops
from vllm.config import VllmConfig, get_current_vllm_config, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)

from csp_compile.config import CSPConfig
from csp_compile.vllm.batch import RECORDER, BatchView, view_for
from csp_compile.vllm.layout import EvictionPlan, plan_eviction
from csp_compile.vllm.modality import modality_ids
from csp_compile.vllm.select import kept_indices
from csp_compile.vllm.settings import check_engine

__all__ = ["CSPCPUAttentionBackend", "CSPCPUAttentionImpl", "CSPCPUAttentionMetadata", "CSPCPUMetadataBuilder",
           "Compaction", "check_group_windows", "shift_rows"]


@dataclasses.dataclass(frozen=True)
class Compaction:
    """One request that this step prefills whole and compacts, worked out once per step by the
    metadata builder (every layer of the step reuses it): its tokens are rows ``start ..
    start + plan.length - 1`` of the step, ``modality`` (L,) its modality ids."""

    req_id: str
    start: int
    plan: EvictionPlan
    modality: torch.Tensor


@dataclasses.dataclass
class CSPCPUAttentionMetadata(CPUAttentionMetadata):
    """vLLM's CPU metadata plus what the impl needs to compact: the engine's batch view (None when
    CSP is off) and the requests this step compacts."""

    csp_batch: BatchView | None = None
    csp_compactions: tuple[Compaction, ...] = ()


def shift_rows(common: CommonAttentionMetadata, offsets: torch.Tensor, block_size: int) -> CommonAttentionMetadata:
    """``common`` with each row's first ``offsets[row] / block_size`` blocks dropped from its block
    table and ``offsets[row]`` tokens from its ``seq_lens`` (new tensors; vLLM's are not modified)."""
    if bool((offsets % block_size).any()):
        raise AssertionError(f"evicted token counts {offsets.tolist()} are not whole blocks of {block_size}")
    rows = offsets.shape[0]
    table = common.block_table_tensor
    columns = torch.arange(table.shape[1], device=table.device)
    source = (columns[None, :] + (offsets // block_size).to(table.device)[:, None]).clamp(max=table.shape[1] - 1)
    shifted = torch.cat([table[:rows].gather(1, source.long()), table[rows:]])
    seq_lens = common.seq_lens.clone()
    seq_lens[:rows] -= offsets.to(seq_lens.device, seq_lens.dtype)
    return dataclasses.replace(common, block_table_tensor=shifted, seq_lens=seq_lens)


def check_group_windows(vllm_config: VllmConfig, layer_names: list[str]) -> None:
    """ValueError (one line) unless the attention layers of one KV cache group (``layer_names``) share
    one sliding window (-1: none). A group has one block table per request: freeing its leading blocks
    for the full-attention layers (which the impl compacts) would also take the uncompacted tokens of
    its sliding-window layers, and shift their table. vLLM keeps the two kinds in separate groups
    (``SlidingWindowManager``, ``FullAttentionManager``) unless its hybrid KV cache manager is off."""
    layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
    windows = sorted({layer.impl.sliding_window for layer in layers.values()})
    if len(windows) > 1:
        raise ValueError(f"csp_compile.vllm: a KV cache group mixes sliding windows {windows} (-1: full attention), "
                         "which CSP cannot compact; keep vLLM's hybrid KV cache manager on "
                         "(disable_hybrid_kv_cache_manager=False)")


class CSPCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    """CPU metadata builder that hides each request's freed leading blocks (CSP on), else vLLM's."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:  # noqa: ANN001 (vLLM's signature)
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.csp = check_engine(vllm_config)
        if self.csp is not None:
            check_group_windows(vllm_config, layer_names)
        if self.window_size != -1:
            self.csp = None  # sliding-window layers are not compacted (the impl leaves them alone too)
        self.batch = view_for(vllm_config)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> CPUAttentionMetadata:
        if self.csp is None or self.is_encoder_only_attention or self.is_cross_attention:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        common = common_attn_metadata
        rows = common.num_reqs
        starts = common.query_start_loc_cpu[: rows + 1].tolist()
        lengths = common.seq_lens[:rows].cpu().tolist()  # on the CPU backend already: no copy
        fresh = [starts[row + 1] - starts[row] == length for row, length in enumerate(lengths)]
        req_ids = self.batch.req_ids(rows)
        compactions = tuple(self._compaction(req_id, starts[row], lengths[row])
                            for row, req_id in enumerate(req_ids) if fresh[row] and lengths[row] >= 2)
        offsets = self.batch.offsets(req_ids, fresh)
        if offsets is not None:
            common = shift_rows(common, offsets, self.block_size)
        built = super().build(common_prefix_len, common, fast_build)
        fields = {f.name: getattr(built, f.name) for f in dataclasses.fields(CPUAttentionMetadata)}
        return CSPCPUAttentionMetadata(**fields, csp_batch=self.batch,
                                       csp_compactions=tuple(c for c in compactions if c is not None))

    def _compaction(self, req_id: str, start: int, length: int) -> Compaction | None:
        """What the layers do with a request prefilled whole in this step (None: nothing to free)."""
        plan = plan_eviction(length, self.csp, self.block_size)
        if plan.freed_blocks == 0:
            return None
        return Compaction(req_id=req_id, start=start, plan=plan,
                          modality=modality_ids(self.batch.request(req_id).mm_features, length))


class CSPCPUAttentionImpl(CPUAttentionBackendImpl):
    """CPU attention that, with CSP on, compacts each fully prefilled request's K/V after attending."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 (vLLM's signature)
        super().__init__(*args, **kwargs)
        vllm_config = get_current_vllm_config()
        self.csp: CSPConfig | None = check_engine(vllm_config)
        if self.attn_type != AttentionType.DECODER or self.kv_sharing_target_layer_name is not None or \
                self.sliding_window != -1:
            self.csp = None  # only full-attention decoder layers that own their cache are pruned

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output,  # noqa: ANN001
                output_scale=None, output_block_scale=None) -> torch.Tensor:  # noqa: ANN001
        output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output,
                                 output_scale, output_block_scale)
        if self.csp is None or not isinstance(attn_metadata, CSPCPUAttentionMetadata):
            return output
        for compaction in attn_metadata.csp_compactions:  # empty at decode-only steps
            self._compact(layer, attn_metadata.csp_batch, compaction, query, key, value, kv_cache,
                          attn_metadata.slot_mapping)
        return output

    def _compact(self, layer, batch: BatchView, compaction: Compaction, query: torch.Tensor,  # noqa: ANN001
                 key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Select ``plan.kept`` tokens per KV head of one request (rows of the step's ``query``,
        ``key``, ``value``) and write them into the slots of its last ``kept`` positions."""
        plan, start = compaction.plan, compaction.start
        rows, stop = slice(start, start + plan.length), start + plan.length
        query, key, value = query[rows], key[rows], value[rows]
        slots = slot_mapping[stop - plan.kept:stop]
        indices = kept_indices(query.permute(1, 0, 2), key.permute(1, 0, 2), compaction.modality, plan.kept,
                               config=self.csp, scale=self.scale)
        index = indices.t()  # (kept, hkv): each KV head's kept positions, ascending
        heads = torch.arange(index.shape[1], device=index.device)
        kept_key = key[index, heads].contiguous()  # (kept, hkv, D): the layout of the op's input
        kept_value = value[index, heads].contiguous()
        num_blocks, num_kv_heads, block_size, _ = kv_cache.size()
        key_cache, value_cache = kv_cache.view((num_blocks, num_kv_heads, block_size * 2, -1)).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(kept_key, kept_value, key_cache, value_cache, slots,
                                       layer.isa, k_scale=layer._k_scale_float, v_scale=layer._v_scale_float,
                                       kv_cache_dtype=self.kv_cache_dtype)
        batch.evicted_tokens[compaction.req_id] = plan.evicted_tokens
        for record in RECORDER:
            record(layer.layer_name, compaction.req_id, query, key, value, compaction.modality, plan, indices, slots)


class CSPCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with CSP (registered over vLLM's by ``csp_compile.vllm.plugin``)."""

    @staticmethod
    def get_impl_cls() -> type[CSPCPUAttentionImpl]:
        return CSPCPUAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[CSPCPUMetadataBuilder]:
        return CSPCPUMetadataBuilder

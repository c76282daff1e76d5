"""How many tokens a prompt keeps in vLLM's paged cache, and how many whole blocks that frees.

The contract's budget ``B`` (``resolve_budget``) is rounded **up** to ``kept``, the smallest count
``>= B`` with ``kept = L (mod block_size)``: the kept tokens then fill the request's last
``ceil(kept / block_size)`` blocks from their first slot, exactly as the prompt's last ``kept``
tokens did, so the first ``(L - kept) / block_size`` blocks are whole and free, and decoding writes
its next token where it would have anyway (logical position ``L``, offset ``L % block_size`` of
the last block). The selection is ``select_kept`` with ``budget=kept`` (tokens): at most
``block_size - 1`` tokens more than ``B``, chosen by the policy's own ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

from csp_compile.config import CSPConfig
from csp_compile.scoring import resolve_budget

__all__ = ["EvictionPlan", "plan_eviction"]


@dataclass(frozen=True)
class EvictionPlan:
    """``kept`` tokens stay (logical positions ``L - kept .. L - 1`` hold them, per KV head in
    ascending order of their original positions); ``freed_blocks`` leading blocks are released."""

    length: int
    kept: int
    freed_blocks: int
    block_size: int

    @property
    def evicted_tokens(self) -> int:
        return self.freed_blocks * self.block_size


def plan_eviction(length: int, config: CSPConfig, block_size: int) -> EvictionPlan:
    """The plan for a prompt of ``length`` tokens (docs/design.md §2's B, rounded up to the block congruence)."""
    if length < 1 or block_size < 1:
        raise ValueError(f"length and block_size must be >= 1: got {length}, {block_size}")
    budget, _ = resolve_budget(length, config)
    freed = (length - budget) // block_size if config.policy != "full" else 0
    return EvictionPlan(length=length, kept=length - freed * block_size, freed_blocks=freed, block_size=block_size)

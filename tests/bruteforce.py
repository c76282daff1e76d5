"""The selection contract (docs/design.md §2) written out again with Python loops in float64.

Deliberately shares no code with csp_compile: it is the independent check on the reference.
"""

from __future__ import annotations

import math

import torch


def contract_budget(length: int, budget: float | int, window: int) -> tuple[int, int]:
    if isinstance(budget, float):
        kept = min(length, max(window, round(budget * length)))
    else:
        kept = min(length, budget)
    return kept, min(window, kept)


def brute_force_csp(q, k, modality, valid, mask, *, budget, window, cross_ratio, n, scale):
    """Kept positions per KV head of ONE sequence; q (hq, L, D), k (hkv, L, D), modality (L,),
    valid (L,) bools, mask(qpos, kpos) -> additive float (0 or -inf or anything). Returns
    (kept lists per kv head, K_cross per kv head)."""
    hq, length, _ = q.shape
    hkv = k.shape[0]
    group = hq // hkv
    real = [i for i in range(length) if valid[i]]
    kept_count, w = contract_budget(len(real), budget, window)
    window_pos = real[len(real) - w:]
    candidates = real[: len(real) - w]
    k_total = kept_count - w
    self_s = [[0.0] * length for _ in range(hkv)]
    cross_s = [[0.0] * length for _ in range(hkv)]
    for h in range(hq):
        for qp in window_pos:
            logits = {}
            for kp in real:
                extra = mask(qp, kp)
                if extra == -math.inf:
                    continue
                dot = math.fsum(float(q[h, qp, d]) * float(k[h // group, kp, d]) for d in range(q.shape[2]))
                logits[kp] = scale * dot + extra
            denom = n + math.fsum(math.exp(v) for v in logits.values())
            for kp, v in logits.items():
                p = math.exp(v) / denom / group
                if modality[qp] == modality[kp]:
                    self_s[h // group][kp] += p
                else:
                    cross_s[h // group][kp] += p
    pairs = [(qp, kp) for qp in window_pos for kp in candidates]
    differ = sum(modality[qp] != modality[kp] for qp, kp in pairs)
    population = differ / len(pairs) if pairs else 0.0
    kept, k_cross_all = [], []
    for g in range(hkv):
        cs = math.fsum(cross_s[g][j] for j in candidates)
        ss = math.fsum(self_s[g][j] for j in candidates)
        mass = cs / (cs + ss) if cs + ss > 0 else 0.0
        ratio = {"population": population, "mass": mass, "auto": (population + mass) / 2}.get(cross_ratio, cross_ratio)
        k_cross = round(k_total * ratio) if differ else 0
        by_self = sorted(candidates, key=lambda j: (-self_s[g][j], j))[: k_total - k_cross]
        rest = [j for j in candidates if j not in by_self]
        by_cross = sorted(rest, key=lambda j: (-cross_s[g][j], j))[:k_cross]
        kept.append(sorted(by_self + by_cross) + window_pos)
        k_cross_all.append(k_cross)
    return kept, k_cross_all


def causal(qp: int, kp: int) -> float:
    return 0.0 if kp <= qp else -math.inf


def from_tensor_mask(mask: torch.Tensor, batch_index: int):
    """Adapter: a (b|1, 1, L, L) bool/additive mask tensor -> mask(qpos, kpos) for one sequence."""
    rows = mask[min(batch_index, mask.shape[0] - 1), 0]
    if rows.dtype == torch.bool:
        return lambda qp, kp: 0.0 if bool(rows[qp, kp]) else -math.inf
    return lambda qp, kp: float(rows[qp, kp])

"""csp_compile: Cross-Self Pruning of vision-language models' KV caches as a compiler pass."""

from csp_compile.backend import register_csp_backend
from csp_compile.cache import UnsupportedCacheError
from csp_compile.config import CROSS_RATIO_RULES, CSPConfig
from csp_compile.nsoftmax import n_softmax
from csp_compile.optimize import NoAttentionFoundError, explain, is_optimized, kept_positions, optimize, restore
from csp_compile.policies import Policy, PolicyScores, available_policies, get_policy, register_policy
from csp_compile.scoring import resolve_budget
from csp_compile.selection import Selection, select_kept

__all__ = [
    "CROSS_RATIO_RULES",
    "CSPConfig",
    "NoAttentionFoundError",
    "Policy",
    "PolicyScores",
    "Selection",
    "UnsupportedCacheError",
    "available_policies",
    "explain",
    "get_policy",
    "is_optimized",
    "kept_positions",
    "n_softmax",
    "optimize",
    "register_policy",
    "resolve_budget",
    "restore",
    "select_kept",
]
__version__ = "0.1.0"

register_csp_backend()

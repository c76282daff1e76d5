"""csp_compile: Cross-Self Pruning of vision-language models' KV caches as a compiler pass."""

from csp_compile.config import CROSS_RATIO_RULES, CSPConfig
from csp_compile.nsoftmax import n_softmax
from csp_compile.policies import Policy, PolicyScores, available_policies, get_policy, register_policy
from csp_compile.scoring import resolve_budget
from csp_compile.selection import Selection, select_kept

__all__ = [
    "CROSS_RATIO_RULES",
    "CSPConfig",
    "Policy",
    "PolicyScores",
    "Selection",
    "available_policies",
    "get_policy",
    "n_softmax",
    "register_policy",
    "resolve_budget",
    "select_kept",
]
__version__ = "0.1.0"

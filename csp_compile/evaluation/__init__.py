"""Quality evaluation of eviction policies on a VLM through the compiled pass (``csp-compile eval``)."""

from csp_compile.evaluation.eval_set import EvalSet, eval_set_for, is_task_model, task_eval_set
from csp_compile.evaluation.policy_spec import (
    PolicySpec,
    chunk_label,
    parse_budgets,
    parse_policies,
    parse_policy,
    parse_prefill_chunks,
)
from csp_compile.evaluation.runner import Outcome, evaluate, run_config, run_full, score

__all__ = [
    "EvalSet",
    "Outcome",
    "PolicySpec",
    "chunk_label",
    "eval_set_for",
    "evaluate",
    "is_task_model",
    "parse_budgets",
    "parse_policies",
    "parse_policy",
    "parse_prefill_chunks",
    "run_config",
    "run_full",
    "score",
    "task_eval_set",
]

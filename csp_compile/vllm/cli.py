"""The ``--engine vllm`` branches of ``csp-compile eval`` and ``csp-compile bench`` (vLLM environment)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from csp_compile.config import CSPConfig
from csp_compile.evaluation.policy_spec import PolicySpec

__all__ = ["format_bench", "run_bench", "run_eval"]


def _model_dir(model: Path | None) -> tuple[Path, str]:
    from csp_compile.vllm.engine import prepared_model_dir

    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ValueError("--engine vllm needs vLLM: run this in the environment of scripts/install_vllm.sh "
                         "(.venv-vllm/bin/csp-compile ...)") from None
    source = "the shipped tiny VLM" if model is None else str(model)
    return prepared_model_dir(model), f"{source} (through vLLM)"


def run_eval(model: Path | None, n: int, seed: int, specs: list[PolicySpec], budgets: list[float], base: CSPConfig,
             runs: int) -> tuple[str, str, list[dict[str, Any]]]:
    """(model description, data description, records) of ``evaluate_vllm`` with a progress bar."""
    from csp_compile.cli.common import progress_bar
    from csp_compile.vllm.evaluate import evaluate_vllm

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model_dir, source = _model_dir(model)
    print(f"model: {source}")
    with progress_bar(runs, "eval (vllm)") as bar:
        records, description = evaluate_vllm(model_dir, n, seed, specs, budgets, base,
                                             progress=lambda label: (bar.set_postfix_str(label), bar.update()))
    print(f"data: {description}")
    return source, description, records


def run_bench(model: Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """``run_vllm_bench`` with ``VLLMBenchSettings(**overrides)`` (None values dropped)."""
    from csp_compile.cli.common import progress_bar
    from csp_compile.vllm.bench import VLLMBenchSettings, run_vllm_bench

    settings = VLLMBenchSettings(**{k: v for k, v in overrides.items() if v is not None})
    model_dir, _ = _model_dir(model)
    with progress_bar(6, "bench (vllm)") as bar:
        return run_vllm_bench(settings, model_dir, progress=lambda label: (bar.set_postfix_str(label), bar.update()))


def format_bench(result: dict[str, Any]) -> str:
    """One ``name  value`` line per figure, ratios first."""
    width = max(len(k) for k in result)
    ordered = sorted(result, key=lambda k: ("ratio" not in k and "overhead" not in k, k))
    return "\n".join(f"{k:<{width}}  {result[k]:.3f}" if isinstance(result[k], float) else f"{k:<{width}}  {result[k]}"
                     for k in ordered)

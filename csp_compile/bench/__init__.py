"""``csp-compile bench``: the cost and the gain of CSP, measured as ratios within one run.

One file per job: ``model`` (the bench Llava and its prompts), ``scoring`` (naive / reference /
fused scoring of one layer), ``prefill`` (compiled prefill timing, KV bytes), ``overhead`` (the
prefill-overhead cases, timed in fresh processes), ``decode`` (per-token decode time, recompiles),
``memory`` (peak prefill memory), ``report`` (targets, table), and ``runner`` (the order of the
measurements); ``real`` benches a real pretrained causal LM (``--model smollm2``) and ``attribution``
splits its profiled prefill time between CSP's kernels and the model's.
"""

from csp_compile.bench.model import BENCH_SHAPE, QUICK_SHAPE, ModelShape
from csp_compile.bench.report import FIGURES, TARGETS, format_table
from csp_compile.bench.runner import BenchSettings, run_bench

__all__ = ["BENCH_SHAPE", "FIGURES", "QUICK_SHAPE", "TARGETS", "BenchSettings", "ModelShape", "format_table", "run_bench"]

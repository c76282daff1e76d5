"""The prefill-overhead cases of ``csp-compile bench``, timed in several fresh processes.

In one process a compiled graph's speed depends on where its buffers land (the same matmuls run
up to ~2% apart from graph to graph, and which graph is unlucky changes from process to process),
so a ratio measured in one process carries an error of that size even for two identical graphs.
As pyperf does for the same reason, the rounds are spread over ``overhead_processes`` new
interpreters: each builds the four variants (plain, CSP, SnapKV, and a second plain model as the
A/A control, all on one copy of the weights), compiles them and times ``prefill_repeats`` rounds
of every case. A case's ratio is the median over all rounds of all processes of the ratio within a
round; the per-process ratios are kept beside it.

    python -m csp_compile.bench.overhead SETTINGS_JSON OUT_JSON   (one process; what the bench runs)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from csp_compile.bench.runner import BenchSettings

__all__ = ["CASES", "VARIANTS", "overhead_figures", "time_in_fresh_process", "time_rounds"]

# text only (causal mask), image_share image tokens, a left-padded batch of 2 (causal apart from padding keys)
CASES = ("text", "image", "padded")
VARIANTS = ("plain", "csp", "snapkv", "plain_copy")  # plain_copy: the A/A control
_SETTINGS_FIELDS = ("prompt", "long_prompt", "image_share", "budget", "window", "prefill_repeats", "device",
                    "threads")

Rounds = dict[str, list[float]]  # "variant/case/length" -> seconds, one per round


def _inputs(model: Any, case: str, length: int, image_share: float, device: str) -> dict[str, torch.Tensor]:
    from csp_compile.bench import model as bench_model

    if case == "padded":
        return bench_model.padded_pair(model, length, image_share=image_share, device=device)
    share = 0.0 if case == "text" else image_share
    return bench_model.bench_inputs(model, length, image_share=share, device=device)


def time_rounds(settings: BenchSettings) -> Rounds:
    """Build, compile and time the variants in this process: ``settings.prefill_repeats`` rounds per
    case after two warm-up prefills (the first compiles), each variant taking each place in the
    round order in turn (so drifting machine speed hits all alike). Every case runs a dynamic-shape
    graph (a first prefill at half the prompt length comes before them)."""
    import csp_compile
    from csp_compile.bench import baseline, model as bench_model, prefill
    from csp_compile.config import CSPConfig

    s = settings
    config = CSPConfig(budget=s.budget, window=s.window)
    first = bench_model.build_bench_model(s.shape, device=s.device, dtype=s.dtype)
    models = {"plain": first}
    for name in VARIANTS[1:]:  # one copy of the weights: timings cannot differ by weight placement
        models[name] = bench_model.share_weights(
            bench_model.build_bench_model(s.shape, device=s.device, dtype=s.dtype), first)
    baseline.compile_plain(models["plain"])
    baseline.compile_plain(models["plain_copy"])
    csp_compile.optimize(models["csp"], config)
    csp_compile.optimize(models["snapkv"], config.replace(policy="snapkv"))

    rounds: Rounds = {}
    # A first prefill at another length: every case then runs the dynamic-shape graph Dynamo compiles
    # on the second length it sees (what generate runs once prompts differ), not the first case a
    # static graph of its own and the rest a dynamic one.
    other = _inputs(first, "text", max(s.prompt // 2, 4 * s.window), s.image_share, s.device)
    for name in VARIANTS:
        prefill.prefill(models[name], other)
    for length in (s.prompt, s.long_prompt):
        for case in CASES:
            inputs = _inputs(first, case, length, s.image_share, s.device)
            times = prefill.alternating_times(models, inputs, s.prefill_repeats)
            for name, values in times.items():
                rounds[f"{name}/{case}/{length}"] = values
    return rounds


def _settings_json(settings: BenchSettings) -> str:
    fields = {name: getattr(settings, name) for name in _SETTINGS_FIELDS}
    return json.dumps(dict(fields, shape=asdict(settings.shape), dtype=str(settings.dtype).removeprefix("torch.")))


def _settings_from_json(text: str) -> BenchSettings:
    from csp_compile.bench.model import ModelShape
    from csp_compile.bench.runner import BenchSettings

    fields = json.loads(text)
    return BenchSettings(shape=ModelShape(**fields.pop("shape")), dtype=getattr(torch, fields.pop("dtype")), **fields)


def time_in_fresh_process(settings: BenchSettings) -> Rounds:
    """``time_rounds`` in a new interpreter (its own memory layout). RuntimeError with the end of
    the child's stderr if it fails."""
    with tempfile.TemporaryDirectory(prefix="csp-bench-") as folder:
        out = Path(folder) / "rounds.json"
        proc = subprocess.run([sys.executable, "-m", "csp_compile.bench.overhead", _settings_json(settings), str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the prefill-overhead process failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def _round_ratios(rounds: Rounds, key: str) -> list[float]:
    plain = rounds["plain/" + key.split("/", 1)[1]]
    return [mine / base for mine, base in zip(rounds[key], plain)]


def overhead_figures(per_process: list[Rounds]) -> dict[str, Any]:
    """The bench's prefill-overhead entries from the rounds of every process: per case the median
    over all rounds of the ratio within a round (CSP and SnapKV against plain, and the A/A control)."""
    keys = list(per_process[0])
    pooled = {key: statistics.median(r for rounds in per_process for r in _round_ratios(rounds, key)) for key in keys}
    by_process = {key: [statistics.median(_round_ratios(rounds, key)) for rounds in per_process] for key in keys}
    ratios = {key: pooled[key] for key in keys if key.split("/", 1)[0] in ("csp", "snapkv")}
    noise = {key.split("/", 1)[1]: pooled[key] for key in keys if key.startswith("plain_copy/")}
    worst = max(ratios, key=ratios.get)
    return dict(
        prefill_overhead_ratio=ratios[worst], prefill_overhead_worst_case=worst, prefill_overhead_cases=ratios,
        prefill_overhead_by_process={key: by_process[key] for key in ratios},
        prefill_noise_cases=noise, prefill_noise_worst=max(abs(x - 1) for x in noise.values()),
        prefill_noise_by_process={key.split("/", 1)[1]: by_process[key] for key in keys if key.startswith("plain_copy/")},
        prefill_ms={key: statistics.median(t for rounds in per_process for t in rounds[key]) * 1e3 for key in keys},
    )


def main(argv: list[str]) -> None:
    settings = _settings_from_json(argv[0])
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    Path(argv[1]).write_text(json.dumps(time_rounds(settings)))


if __name__ == "__main__":
    main(sys.argv[1:])

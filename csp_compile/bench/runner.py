"""``run_bench``: every measurement of ``csp-compile bench``, as one flat dict.

The prefill overhead first, in fresh processes of its own (``overhead``). Then copies of the
bench Llava with identical random weights: one with its language model compiled as the plain
baseline (``baseline``: Inductor, the same attention op and causal shortcut, nothing evicted), one
under ``csp_compile.optimize`` with CSP and, for decode speed, one with CSP on adaptive budgets
(PyramidKV layers, AdaKV heads); CSP's prefill is also timed against the eager (uncompiled)
model. Timings take turns between the variants, so load from other jobs
on a shared machine hits them alike; every figure is a ratio of two measurements made in one run.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

import csp_compile
from csp_compile.bench import baseline, decode, memory, model as bench_model, overhead, prefill, report, scoring
from csp_compile.config import CSPConfig

__all__ = ["BenchSettings", "run_bench"]

ADAPTIVE = {"layer_budget": "pyramid", "head_budget": "adaptive"}  # the decode-speed check of adaptive budgets
EAGER_ROUNDS = 3  # rounds of (eager, CSP) prefills per case in the comparison with the eager model


@dataclass(frozen=True)
class BenchSettings:
    shape: bench_model.ModelShape = bench_model.BENCH_SHAPE
    prompt: int = 4096  # prefill overhead and scoring
    long_prompt: int = 8192  # decode, memory, KV bytes
    chunk_prompt: int = 32768  # chunked prefill memory
    prefill_chunk: int = 2048
    image_share: float = 0.3
    budget: float = 0.2
    window: int = 32
    prefill_repeats: int = 2  # rounds of the 4 variants (rotating order) in each overhead process
    overhead_processes: int = 3  # fresh processes the prefill-overhead rounds are spread over
    scoring_repeats: int = 9
    new_tokens: int = 16
    decode_rounds: int = 2
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    threads: int | None = None
    quick: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 < self.budget < 1.0:
            raise ValueError(f"budget={self.budget!r}: allowed a fraction in (0, 1)")
        if self.window < 1:
            raise ValueError(f"window={self.window!r}: allowed an int >= 1")
        if not 0.0 < self.image_share < 1.0:
            raise ValueError(f"image share={self.image_share!r}: allowed a fraction in (0, 1)")
        if not 1 <= self.prefill_chunk < self.chunk_prompt:
            raise ValueError(f"prefill-chunk={self.prefill_chunk}: allowed 1 .. chunk-prompt - 1 = {self.chunk_prompt - 1}")
        for name in ("prompt", "long_prompt", "chunk_prompt"):
            if getattr(self, name) < 4 * self.window:
                raise ValueError(f"{name.replace('_', '-')}={getattr(self, name)}: allowed >= {4 * self.window} "
                                 f"tokens (4 x window)")
        for name in ("prefill_repeats", "overhead_processes", "scoring_repeats", "decode_rounds"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')}={getattr(self, name)}: allowed >= 1")
        if self.new_tokens < decode.SKIPPED_STEPS + 2:
            raise ValueError(f"new-tokens={self.new_tokens}: allowed >= {decode.SKIPPED_STEPS + 2}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads}: allowed >= 1")


Step = tuple[str, Callable[[], None]]


def _steps(s: BenchSettings, r: dict[str, Any], state: dict[str, Any]) -> Iterator[Step]:
    """The measurements in order; each fills ``r`` (the result) and ``state`` (objects between steps)."""
    config = CSPConfig(budget=s.budget, window=s.window)

    def sharing(source: Any) -> Any:
        """Another bench model with ``source``'s weight tensors (timings cannot differ by weight placement)."""
        return bench_model.share_weights(bench_model.build_bench_model(s.shape, device=s.device, dtype=s.dtype), source)

    per_process: list[overhead.Rounds] = state.setdefault("overhead_rounds", [])
    for index in range(s.overhead_processes):
        def time_overhead() -> None:
            per_process.append(overhead.time_in_fresh_process(s))
        yield (f"prefill overhead, process {index + 1}/{s.overhead_processes}: {len(overhead.CASES)} cases x 2 lengths "
               f"x {s.prefill_repeats} rounds of {len(overhead.VARIANTS)} prefills"), time_overhead

    def build() -> None:
        first = bench_model.build_bench_model(s.shape, device=s.device, dtype=s.dtype)
        models = [first] + [sharing(first) for _ in range(2)]
        state["plain"], state["csp"], state["adaptive"] = models
        baseline.compile_plain(models[0])
        csp_compile.optimize(models[1], config)
        csp_compile.optimize(models[2], config.replace(**ADAPTIVE))
        state["short"] = bench_model.bench_inputs(models[0], s.prompt, image_share=s.image_share, device=s.device)
        state["long"] = bench_model.bench_inputs(models[0], s.long_prompt, image_share=s.image_share, device=s.device)
    yield "build the bench models (plain, CSP, CSP with adaptive budgets)", build

    def against_eager() -> None:
        eager = sharing(state["plain"])  # transformers' own SDPA attention, not compiled
        cases = {"image": state["short"],
                 "padded": bench_model.padded_pair(eager, s.prompt, image_share=s.image_share, device=s.device)}
        for case, inputs in cases.items():
            times = prefill.alternating_times({"eager": eager, "csp": state["csp"]}, inputs, EAGER_ROUNDS)
            key = f"{case}/{s.prompt}"
            r.setdefault("prefill_speedup_vs_eager", {})[key] = statistics.median(
                e / c for e, c in zip(times["eager"], times["csp"]))
            r.setdefault("prefill_ms_eager", {})[key] = statistics.median(times["eager"]) * 1e3
            r.setdefault("prefill_ms_csp", {})[key] = statistics.median(times["csp"]) * 1e3
    yield f"prefill against the eager model: image and padded cases, {s.prompt} tokens", against_eager

    def score() -> None:
        m = state["plain"]
        text = m.config.get_text_config()
        modality = (state["short"]["input_ids"] == m.config.image_token_id).long()
        case = scoring.make_case(modality, heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
                                 head_dim=text.head_dim, config=config, dtype=s.dtype, device=s.device)
        res = scoring.time_scoring(case, s.scoring_repeats)
        r.update(
            naive_scoring_speedup=res.naive_speedup, reference_scoring_speedup=res.reference_speedup,
            scoring_ms_naive=res.naive_s * 1e3, scoring_ms_reference=res.reference_s * 1e3,
            scoring_ms_fused=res.fused_s * 1e3, naive_scoring_impl=res.naive_impl, fused_scoring_impl=res.fused_impl,
            naive_scoring_max_abs_diff=res.naive_max_abs_diff, fused_scoring_max_abs_diff=res.fused_max_abs_diff,
        )
    yield f"scoring: naive / reference / fused, {s.prompt} tokens", score

    decodes: dict[str, list[decode.DecodeResult]] = {"plain": [], "csp": [], "adaptive": []}
    for round_ in range(s.decode_rounds):
        for name in decodes:
            def run_decode(name: str = name) -> None:
                decodes[name].append(decode.timed_decode(state[name], state["long"], s.new_tokens))
            yield f"decode {name}, {s.long_prompt}-token prompt (round {round_ + 1}/{s.decode_rounds})", run_decode

    def decode_figures() -> None:
        step = {name: statistics.median([x.step_s for x in results]) for name, results in decodes.items()}
        r.update(
            decode_speedup_b20=step["plain"] / step["csp"], decode_step_ms_plain=step["plain"] * 1e3,
            decode_step_ms_csp=step["csp"] * 1e3,
            decode_recompiles=sum(x.recompiles for x in decodes["csp"]),
            decode_recompiles_plain=sum(x.recompiles for x in decodes["plain"]),
            decode_steps_timed=decodes["csp"][0].steps_timed,
            adaptive_decode_ratio=step["adaptive"] / step["csp"], decode_step_ms_adaptive=step["adaptive"] * 1e3,
        )
        state.pop("adaptive")

    peaks: dict[str, tuple[int, int]] = state.setdefault("peaks", {})  # name -> (peak bytes, KV bytes)
    for name in ("plain", "csp"):
        def measure(name: str = name) -> None:
            if name == "plain":
                decode_figures()
            prefill.prefill(state[name], state["long"])  # warm-up: this call signature may compile
            peak, output = memory.peak_prefill_bytes(state[name], state["long"])
            peaks[name] = (peak, prefill.cache_bytes(output.past_key_values))
        yield f"peak memory, {name} prefill of {s.long_prompt} tokens", measure

    def build_chunked() -> None:
        state.pop("plain", None)  # only the two CSP models are needed from here on
        state["chunked"] = sharing(state["csp"])
        csp_compile.optimize(state["chunked"], config.replace(prefill_chunk=s.prefill_chunk))
        state["longest"] = bench_model.bench_inputs(state["csp"], s.chunk_prompt, image_share=s.image_share,
                                                    device=s.device)
    yield f"build the chunked-prefill model (chunk {s.prefill_chunk}), {s.chunk_prompt}-token prompt", build_chunked

    chunked_peaks: dict[str, tuple[int, int, float]] = state.setdefault("chunked_peaks", {})
    for name in ("csp", "chunked"):
        def measure_chunked(name: str = name) -> None:
            prefill.prefill(state[name], state["longest"])  # compiles
            start = time.perf_counter()
            prefill.prefill(state[name], state["longest"])
            seconds = time.perf_counter() - start
            peak, output = memory.peak_prefill_bytes(state[name], state["longest"])
            chunked_peaks[name] = (peak, prefill.cache_bytes(output.past_key_values), seconds)
        label = "one-shot" if name == "csp" else f"chunk {s.prefill_chunk}"
        yield f"peak memory, CSP {label} prefill of {s.chunk_prompt} tokens", measure_chunked


def run_bench(settings: BenchSettings, progress: Callable[[str], Any] | None = None,
              steps_total: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Run every measurement; ``progress(description)`` is called before each step, ``steps_total(n)``
    once at the start. Returns the flat result (figures, setup, raw timings, targets, what)."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    s = settings
    r: dict[str, Any] = {}
    state: dict[str, Any] = {}
    steps = list(_steps(s, r, state))
    if steps_total is not None:
        steps_total(len(steps))
    for description, run in steps:
        if progress is not None:
            progress(description)
        run()

    plain_model, csp_model = state["chunked"], state["csp"]  # same shape and weights as the plain model
    peaks, chunked_peaks = state["peaks"], state["chunked_peaks"]
    r.update(overhead.overhead_figures(state["overhead_rounds"]))
    kv_full, kv_csp = peaks["plain"][1], peaks["csp"][1]
    weights = bench_model.decode_weight_bytes(plain_model)
    text = plain_model.config.get_text_config()
    image_share = bench_model.image_share_of(plain_model, state["long"])
    r.update(
        scoring_peak_mem_ratio=peaks["csp"][0] / peaks["plain"][0],
        peak_prefill_bytes_plain=peaks["plain"][0], peak_prefill_bytes_csp=peaks["csp"][0],
        memory_method=memory.METHOD[torch.device(s.device).type],
        kv_bytes_ratio_b20=kv_csp / kv_full, kv_bytes_full=kv_full, kv_bytes_csp=kv_csp,
        decode_weight_bytes=weights,
        decode_bound_b20=(weights + kv_full) / (weights + kv_csp),
        chunked_prefill_peak_mem_ratio=chunked_peaks["chunked"][0] / chunked_peaks["csp"][0],
        peak_prefill_bytes_oneshot_long=chunked_peaks["csp"][0], peak_prefill_bytes_chunked=chunked_peaks["chunked"][0],
        chunked_kv_bytes_ratio=chunked_peaks["chunked"][1] / chunked_peaks["csp"][1],
        prefill_s_oneshot_long=chunked_peaks["csp"][2], prefill_s_chunked=chunked_peaks["chunked"][2],
        chunk_prompt_tokens=int(state["longest"]["input_ids"].shape[1]), prefill_chunk=s.prefill_chunk,
    )
    device = torch.device(s.device)
    r.update(
        model=f"random-weight Llava (tiny CLIP tower, 16 tokens per image); language model: {s.shape.label}",
        family="llava", model_type=text.model_type,
        hidden_size=text.hidden_size, num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
        head_dim=text.head_dim, intermediate_size=text.intermediate_size, vocab_size=text.vocab_size,
        **bench_model.parameter_count(plain_model),
        prompt_tokens=int(state["short"]["input_ids"].shape[1]),
        long_prompt_tokens=int(state["long"]["input_ids"].shape[1]),
        image_token_share=image_share, budget=s.budget, window=s.window, cross_ratio=str(CSPConfig().cross_ratio),
        new_tokens=s.new_tokens, prefill_repeats=s.prefill_repeats, overhead_processes=s.overhead_processes,
        scoring_repeats=s.scoring_repeats,
        decode_rounds=s.decode_rounds, quick=s.quick,
        dtype=str(s.dtype).removeprefix("torch."), device=device.type,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor()
                                                                                         or platform.machine()),
        torch_version=torch.__version__, threads=torch.get_num_threads(),
        csp_rewritten_layers=csp_compile.explain(csp_model).count("pattern="),
        csp_op_scoring=scoring.op_scoring(),
        wall_s=time.perf_counter() - start,
        **s.extra,
    )
    context = dict(budget=s.budget, prompt=r["prompt_tokens"], long_prompt=r["long_prompt_tokens"],
                   cases=", ".join(overhead.CASES), worst=r["prefill_overhead_worst_case"],
                   repeats=s.prefill_repeats, processes=s.overhead_processes, fused_impl=r["fused_scoring_impl"],
                   memory_method=r["memory_method"],
                   decode_steps=r["decode_steps_timed"] * s.decode_rounds, skipped=decode.SKIPPED_STEPS,
                   chunk_prompt=r["chunk_prompt_tokens"], prefill_chunk=s.prefill_chunk)
    r["what"] = report.what(context)
    r["targets"] = report.check_targets(r)
    return r

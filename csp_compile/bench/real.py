"""``csp-compile bench --model smollm2``: CSP on a real pretrained causal LM, against the same model
compiled plainly (``baseline.compile_plain``: Inductor, the same attention op, nothing evicted).

Two copies share one set of weight tensors (``model.share_weights``). Both compile while
``attribution.track`` records their kernels, with dynamic shapes from the first call
(``assume_static_by_default=False``), so each variant compiles one prefill and one decode graph per
batch size rather than one per prompt length. Prompts are the tokenizer's ids of English filler text
(``FILLER`` repeated; each row of a batch starts at another offset), all text.

- prefill, per length: ``rounds`` alternating (plain, CSP) prefills (``prefill.alternating_times``,
  each prefill profiled): the wall ratio CSP / plain (median of the per-round ratios), and CSP's
  share of the CSP prefill's self CPU time (``attribution``); the last length also gives the peak
  prefill memory of both (``memory.peak_of``, from the same profiles) and the KV bytes left;
- decode, per (prompt length, batch): ``decode.timed_decode`` of both variants, their ms/token and
  ratio beside the bytes bound (weights + full KV) / (weights + kept KV) read per step, the kept KV
  from ``selection.kept_slots`` (checked against the measured cache bytes at the prefill lengths).
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from transformers import PreTrainedModel

import csp_compile
from csp_compile.bench import attribution, baseline, decode, memory, prefill
from csp_compile.bench import model as bench_model
from csp_compile.config import CSPConfig
from csp_compile.selection import kept_slots

__all__ = ["FILLER", "PRESETS", "RealSettings", "format_markdown", "load_real_model", "real_inputs", "run_real_bench"]

FILLER = (
    "The river town woke slowly. Fishermen pulled their boats onto the gravel while the baker opened his "
    "shutters and the smell of bread drifted over the square. Children ran to the old stone school, where "
    "the teacher wrote the day's lesson on the board: the history of the bridge, built two hundred years ago "
    "by merchants who wanted to carry wool to the market on the other side. In the afternoon the wind turned "
    "and clouds gathered over the hills, so the farmers hurried to bring in the hay before the rain. "
)

# preset -> settings (the figures' lengths); a full run on 2 shared cores, 1 thread: see docs/bench_smollm2.md
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(prefill_lengths=(2048, 4096, 8192), decode_lengths=(256, 2048, 8192), batches=(1, 8),
                 prefill_rounds=(2, 2, 1)),
    "quick": dict(prefill_lengths=(1024, 2048), decode_lengths=(1024, 2048), batches=(1,), prefill_rounds=(2, 2)),
    "long": dict(prefill_lengths=(4096, 8192), decode_lengths=(256, 8192), batches=(1,), prefill_rounds=(1, 1)),
}
SHARE_TARGET = 0.015  # CSP's own kernels <= 1.5% of prefill time
SHARE_JUDGED_FROM = 4096  # ... at 4k tokens and longer
BOUND_TARGET = 0.8  # decode speedup >= 0.8 x its bytes bound
BOUND_JUDGED_FROM = 2048


@dataclass(frozen=True)
class RealSettings:
    model: Path
    prefill_lengths: tuple[int, ...] = (2048, 4096, 8192)
    decode_lengths: tuple[int, ...] = (256, 2048, 8192)
    batches: tuple[int, ...] = (1, 8)
    prefill_rounds: tuple[int, ...] = (2, 2, 1)  # per prefill length
    max_batch_tokens: int = 16384  # decode cases of batch > 1 with batch x length above this are not run
    new_tokens: int = 8
    budget: float = 0.2
    window: int = 32
    threads: int | None = None
    preset: str = "full"
    model_name: str = ""
    build: Callable[[], PreTrainedModel] | None = None  # tests: a tiny model instead of loading ``model``
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.prefill_rounds) != len(self.prefill_lengths):
            raise ValueError(f"prefill rounds {self.prefill_rounds}: one per prefill length {self.prefill_lengths}")
        for length in self.prefill_lengths + self.decode_lengths:
            if length < 4 * self.window:
                raise ValueError(f"prompt length {length}: allowed >= {4 * self.window} tokens (4 x window)")
        if self.new_tokens < decode.SKIPPED_STEPS + 2:
            raise ValueError(f"new-tokens={self.new_tokens}: allowed >= {decode.SKIPPED_STEPS + 2}")


def load_real_model(path: Path) -> PreTrainedModel:
    """A causal LM from a local directory, float32, SDPA attention, eval mode."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="sdpa").eval()


def real_inputs(model: PreTrainedModel, length: int, batch: int = 1, tokenizer: Any = None) -> dict[str, torch.Tensor]:
    """``batch`` prompts of ``length`` tokens: the tokenizer's ids of ``FILLER`` repeated (without a
    tokenizer, ids drawn from the vocabulary with a fixed seed); row ``i`` starts ``37 i`` tokens in."""
    if tokenizer is not None:
        base = tokenizer(FILLER, add_special_tokens=False)["input_ids"]
        ids = torch.tensor(base * ((length + 37 * batch) // len(base) + 1))
    else:
        vocab = model.config.get_text_config().vocab_size
        ids = torch.randint(0, vocab, (length + 37 * batch,), generator=torch.Generator().manual_seed(0))
    rows = torch.stack([ids[37 * i: 37 * i + length] for i in range(batch)])
    return {"input_ids": rows, "attention_mask": torch.ones_like(rows)}


def _kv_bytes(model: PreTrainedModel, slots: int, batch: int) -> int:
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * slots * batch * model.dtype.itemsize


def _steps(s: RealSettings, r: dict[str, Any], state: dict[str, Any]) -> Iterator[tuple[str, Callable[[], None]]]:
    config = CSPConfig(budget=s.budget, window=s.window)

    def build() -> None:
        plain = s.build() if s.build else load_real_model(s.model)
        csp = bench_model.share_weights(s.build() if s.build else load_real_model(s.model), plain)
        baseline.compile_plain(plain)
        csp_compile.optimize(csp, config)
        state.update(plain=plain, csp=csp, tokenizer=None)
        if s.build is None:
            import transformers

            state["tokenizer"] = transformers.AutoTokenizer.from_pretrained(s.model)
    yield "load the model twice (shared weights): plain compiled, CSP", build

    def inputs(length: int, batch: int = 1) -> dict[str, torch.Tensor]:
        return real_inputs(state["plain"], length, batch, state["tokenizer"])

    def compile_prefill() -> None:
        for name in ("plain", "csp"):
            prefill.prefill(state[name], inputs(s.prefill_lengths[0]))
    yield f"compile both prefills ({s.prefill_lengths[0]} tokens)", compile_prefill

    for length, rounds in zip(s.prefill_lengths, s.prefill_rounds):
        def measure_prefill(length: int = length, rounds: int = rounds) -> None:
            last = length == s.prefill_lengths[-1]
            runs: dict[str, list[attribution.Profiled]] = {"plain": [], "csp": []}

            def profiled(name: str) -> Callable[[PreTrainedModel, dict], float]:
                def run(model: PreTrainedModel, batch: dict) -> float:
                    runs[name].append(attribution.profile_prefill(model, batch, state["ledger"], memory=last))
                    return runs[name][-1].seconds
                return run
            times = prefill.alternating_times({"plain": state["plain"], "csp": state["csp"]}, inputs(length), rounds,
                                              warmup=0, run={"plain": profiled("plain"), "csp": profiled("csp")})
            shares = [attribution.split(c, p) for c, p in zip(runs["csp"], runs["plain"])]
            key = str(length)
            r["prefill_ratio"][key] = statistics.median(c / p for c, p in zip(times["csp"], times["plain"]))
            r["prefill_ms_plain"][key] = statistics.median(times["plain"]) * 1e3
            r["prefill_ms_csp"][key] = statistics.median(times["csp"]) * 1e3
            r["csp_share"][key] = statistics.median(x.share for x in shares)
            r["csp_share_lower"][key] = statistics.median(x.lower for x in shares)
            r["csp_share_upper"][key] = statistics.median(x.upper for x in shares)
            r["csp_share_hooks"][key] = statistics.median(x.hook for x in shares)
            r["csp_top_kernels_us"][key] = shares[-1].top
            r["unmatched_extern_calls"] += sum(x.unmatched_externs for x in shares)
            r["kv_bytes_measured"][key] = {name: runs[name][-1].kv_bytes for name in runs}
            if last:
                r.update(memory_prompt_tokens=length, peak_prefill_bytes_plain=runs["plain"][-1].peak_bytes,
                         peak_prefill_bytes_csp=runs["csp"][-1].peak_bytes)
        yield f"prefill {length} tokens: {rounds} profiled round(s) of (plain, CSP)", measure_prefill

    for batch in s.batches:
        for length in s.decode_lengths:
            key = f"{length}x{batch}"
            if batch > 1 and batch * length > s.max_batch_tokens:
                r["decode_not_run"][key] = (f"batch {batch} x {length} tokens > {s.max_batch_tokens}: its prefill "
                                            "alone takes too long on these cores (see docs/bench_smollm2.md)")
                continue

            def measure_decode(length: int = length, batch: int = batch, key: str = key) -> None:
                batch_inputs = inputs(length, batch)
                steps = {name: decode.timed_decode(state[name], batch_inputs, s.new_tokens) for name in ("plain", "csp")}
                plain_ms, csp_ms = (steps[n].step_s * 1e3 for n in ("plain", "csp"))
                full = _kv_bytes(state["plain"], length, batch)
                kept = _kv_bytes(state["plain"], int(kept_slots(length, config)), batch)
                bound = (r["decode_weight_bytes"] + full) / (r["decode_weight_bytes"] + kept)
                r["decode_ms_plain"][key], r["decode_ms_csp"][key] = plain_ms, csp_ms
                r["decode_speedup"][key] = plain_ms / csp_ms
                r["decode_bound"][key] = bound
                r["decode_of_bound"][key] = plain_ms / csp_ms / bound
                r["kv_bytes_full"][key], r["kv_bytes_kept"][key] = full, kept
                r["decode_recompiles"] += steps["csp"].recompiles
            yield f"decode {s.new_tokens} tokens, prompt {length} x batch {batch}: plain then CSP", measure_decode


def run_real_bench(settings: RealSettings, progress: Callable[[str], Any] | None = None,
                   steps_total: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """Every measurement of the real-model bench, as one flat dict (figures, verdicts, setup)."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    start = time.perf_counter()
    r: dict[str, Any] = {key: {} for key in (
        "prefill_ratio", "prefill_ms_plain", "prefill_ms_csp", "csp_share", "csp_share_lower", "csp_share_upper",
        "csp_share_hooks", "csp_top_kernels_us", "kv_bytes_measured", "decode_ms_plain", "decode_ms_csp",
        "decode_speedup", "decode_bound", "decode_of_bound", "kv_bytes_full", "kv_bytes_kept", "decode_not_run")}
    r.update(unmatched_extern_calls=0, decode_recompiles=0)
    state: dict[str, Any] = {}
    with attribution.track() as ledger, torch._dynamo.config.patch(assume_static_by_default=False):
        state["ledger"] = ledger
        steps = list(_steps(settings, r, state))
        if steps_total is not None:
            steps_total(len(steps))
        for index, (description, run) in enumerate(steps):
            if progress is not None:
                progress(description)
            run()
            if index == 0:
                r["decode_weight_bytes"] = bench_model.decode_weight_bytes(state["plain"])
    plain: PreTrainedModel = state["plain"]
    text = plain.config.get_text_config()
    r.update(
        model=settings.model_name or str(settings.model), model_type=text.model_type, preset=settings.preset,
        num_hidden_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
        num_attention_heads=text.num_attention_heads, num_key_value_heads=text.num_key_value_heads,
        vocab_size=text.vocab_size, parameters=sum(p.numel() for p in plain.parameters()),
        prompts="tokenizer ids of English filler text (FILLER repeated)" if state["tokenizer"] is not None
        else "random vocabulary ids (seed 0)",
        budget=settings.budget, window=settings.window, new_tokens=settings.new_tokens,
        decode_steps_timed=settings.new_tokens - decode.SKIPPED_STEPS - 1,
        prefill_lengths=list(settings.prefill_lengths), prefill_rounds=list(settings.prefill_rounds),
        decode_lengths=list(settings.decode_lengths), batches=list(settings.batches),
        dtype="float32", device="cpu", device_name=platform.processor() or platform.machine(),
        torch_version=torch.__version__, threads=torch.get_num_threads(),
        memory_method=memory.METHOD["cpu"], share_method=attribution.__doc__.split("\n\n")[0].replace("\n", " "),
        csp_rewritten_layers=csp_compile.explain(state["csp"]).count("pattern="),
        wall_s=time.perf_counter() - start, **settings.extra,
    )
    if "peak_prefill_bytes_plain" in r:
        r["peak_mem_ratio"] = r["peak_prefill_bytes_csp"] / r["peak_prefill_bytes_plain"]
    r["targets"] = check_real_targets(r)
    return r


def check_real_targets(r: dict[str, Any]) -> dict[str, str]:
    """Verdicts: CSP's share <= 1.5% at >= 4k tokens; decode >= 0.8 x bound at >= 2k tokens; decode at
    budget 0.2 never slower than the full cache; lengths not run are "not run", shorter ones "not judged"."""
    verdicts: dict[str, str] = {}
    for key, share in r["csp_share"].items():
        verdicts[f"csp_share/{key}"] = ("not judged" if int(key) < SHARE_JUDGED_FROM
                                        else "pass" if share <= SHARE_TARGET else "fail")
    for key, of_bound in r["decode_of_bound"].items():
        length = int(key.split("x")[0])
        verdicts[f"decode_of_bound/{key}"] = ("not judged" if length < BOUND_JUDGED_FROM
                                              else "pass" if of_bound >= BOUND_TARGET else "fail")
        verdicts[f"decode_not_slower/{key}"] = "pass" if r["decode_speedup"][key] >= 1.0 else "fail"
    for key in r["decode_not_run"]:
        verdicts[f"decode_of_bound/{key}"] = verdicts[f"decode_not_slower/{key}"] = "not run"
    return verdicts


def format_markdown(r: dict[str, Any]) -> str:
    """The figures as markdown tables (prefill, decode), then the verdicts."""
    lines = ["| prompt | prefill plain ms | prefill CSP ms | CSP / plain | CSP share (lower-upper) | verdict |",
             "|---:|---:|---:|---:|---:|---|"]
    for key in r["prefill_ratio"]:
        lines.append(f"| {key} | {r['prefill_ms_plain'][key]:.0f} | {r['prefill_ms_csp'][key]:.0f} | "
                     f"{r['prefill_ratio'][key]:.3f} | {r['csp_share'][key]:.2%} ({r['csp_share_lower'][key]:.2%}-"
                     f"{r['csp_share_upper'][key]:.2%}) | {r['targets'][f'csp_share/{key}']} |")
    lines += ["", "| prompt x batch | full ms/token | CSP ms/token | speedup | bytes bound | of bound | verdicts |",
              "|---:|---:|---:|---:|---:|---:|---|"]
    for key in r["decode_speedup"]:
        lines.append(f"| {key} | {r['decode_ms_plain'][key]:.1f} | {r['decode_ms_csp'][key]:.1f} | "
                     f"{r['decode_speedup'][key]:.2f}x | {r['decode_bound'][key]:.2f}x | {r['decode_of_bound'][key]:.2f} | "
                     f"{r['targets'][f'decode_of_bound/{key}']} / not slower: "
                     f"{r['targets'][f'decode_not_slower/{key}']} |")
    for key, why in r["decode_not_run"].items():
        lines.append(f"| {key} | - | - | - | - | - | not run: {why} |")
    if "peak_mem_ratio" in r:
        lines += ["", f"Peak prefill memory at {r['memory_prompt_tokens']} tokens: "
                      f"{r['peak_prefill_bytes_plain'] / 2**20:.0f} MiB plain, "
                      f"{r['peak_prefill_bytes_csp'] / 2**20:.0f} MiB CSP ({r['peak_mem_ratio']:.3f}x)."]
    return "\n".join(lines)

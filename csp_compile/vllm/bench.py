"""``csp-compile bench --engine vllm``: what CSP buys inside vLLM's paged cache, as ratios.

Two engines on the tiny VLM (or a text-only causal LM's directory), one without and one with CSP,
each with the same fixed ``kv_cache_memory_bytes`` (room for ``full_capacity`` full-cache requests),
fed the same long prompts (an image and ``prompt`` tokens in all; for a text model ``prompt`` random
ids of its vocabulary, ``text_prompt``). Figures (``bNN`` = budget in percent):

- ``vllm_blocks_per_request_ratio_bNN``: KV blocks one request holds right after its prefill step.
- ``vllm_max_concurrent_ratio_bNN``: most requests the scheduler runs at once on ``requests``
  requests of ``new_tokens`` output tokens each.
- ``vllm_throughput_ratio_bNN``: output tokens per second on that workload.
- ``vllm_prefill_overhead_bNN``: wall time of one request's prefill step (median of ``repeats``,
  the two engines interleaved).
- ``vllm_throughput_ratio_ample_memory``: the most KV memory can buy: plain vLLM with room for all
  ``requests`` at once, against plain vLLM in the fixed memory (same workload); and
  ``vllm_throughput_ratio_bNN_vs_ample_memory``: CSP in the fixed memory against that engine.

Each as CSP / off, with the raw values beside them. The engine core runs in this process (the
scheduler is read between steps).

``python -m csp_compile.vllm.bench [--repeats N] [--prompt T]`` measures the prefill overhead alone
(``run_prefill_profile``: the same interleaved prefill steps, more of them) and where the CSP
engine's extra time goes: milliseconds per prefill step in ``kept_indices`` (the selection) and in the rest of the
plugin's compaction (gathers, cache write), medians over the timed steps.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from csp_compile.config import CSPConfig
from csp_compile.data.lookup import IMAGE_TOKENS, NUM_FILLERS, VOCAB, render_glyph
from csp_compile.vllm.engine import BLOCK_SIZE, held_blocks, is_text_model_dir, make_llm, scheduler_of

__all__ = ["VLLMBenchSettings", "long_prompt", "run_prefill_profile", "run_vllm_bench", "text_prompt"]


@dataclass(frozen=True)
class VLLMBenchSettings:
    """prompt: tokens per prompt (image included); budget / window: CSP's; requests and new_tokens:
    the concurrency workload; full_capacity: full-cache requests the KV memory holds; repeats: timed prefills."""

    prompt: int = 2048
    budget: float = 0.2
    window: int = 8
    requests: int = 40
    new_tokens: int = 256
    full_capacity: int = 8
    repeats: int = 3

    def __post_init__(self) -> None:
        for name in ("prompt", "window", "requests", "new_tokens", "full_capacity", "repeats"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"VLLMBenchSettings.{name}={getattr(self, name)!r}: allowed an int >= 1")
        if self.prompt < IMAGE_TOKENS + 3:
            raise ValueError(f"VLLMBenchSettings.prompt={self.prompt}: allowed >= {IMAGE_TOKENS + 3} (an image is "
                             f"{IMAGE_TOKENS} tokens)")
        if not 0.0 < self.budget < 1.0:
            raise ValueError(f"VLLMBenchSettings.budget={self.budget}: allowed a fraction in (0, 1)")

    @property
    def tag(self) -> str:
        return f"b{round(self.budget * 100):02d}"


def long_prompt(length: int, seed: int) -> dict[str, Any]:
    """A vLLM prompt of ``length`` tokens once its image placeholder is expanded: ``<bos> <image>
    body ?`` with a random body of the task's filler and record tokens, and a rendered glyph."""
    rng = random.Random(seed)
    body = [rng.choice([VOCAB.filler(rng.randrange(NUM_FILLERS)), VOCAB.a_record(rng.randrange(32), rng.randrange(16))])
            for _ in range(length - IMAGE_TOKENS - 2)]
    image = render_glyph(rng.randrange(32), rng).permute(1, 2, 0).contiguous().numpy()
    return {"prompt_token_ids": [VOCAB.bos, VOCAB.image, *body, VOCAB.query], "multi_modal_data": {"image": image}}


Prompt = Callable[[int, int], dict[str, Any]]  # (length, seed) -> a vLLM prompt


def text_prompt(length: int, seed: int, model_dir: Path) -> dict[str, Any]:
    """A vLLM prompt of ``length`` random token ids of a text-only model's vocabulary (its config's
    ``vocab_size``), none of them one of its tokenizer.json's added (special) tokens."""
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    added = {t["id"] for t in json.loads((model_dir / "tokenizer.json").read_text()).get("added_tokens", ())}
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < length:
        token = rng.randrange(vocab)
        if token not in added:
            ids.append(token)
    return {"prompt_token_ids": ids}


def _prompt_of(model_dir: Path) -> Prompt:
    """``prompt(length, seed)`` for the bench: ``text_prompt`` for a text-only causal LM's directory,
    else the tiny VLM's ``long_prompt``."""
    if is_text_model_dir(model_dir):
        return lambda length, seed: text_prompt(length, seed, model_dir)
    return long_prompt


def _block_bytes(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    text = config.get("text_config", config)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    return 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim * BLOCK_SIZE * 4  # K and V, fp32


def _prefill_step(llm: Any, settings: VLLMBenchSettings, name: str, seed: int,
                  prompt: Prompt = long_prompt) -> tuple[int, float]:
    """(blocks one request holds after its prefill step, seconds of that step); runs it to the end."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    engine.add_request(name, prompt(settings.prompt, seed), SamplingParams(max_tokens=2, temperature=0.0,
                                                                            ignore_eos=True))
    start = time.perf_counter()
    engine.step()
    seconds = time.perf_counter() - start
    (blocks,) = held_blocks(llm).values()
    while engine.has_unfinished_requests():
        engine.step()
    return blocks, seconds


def _prefill(engines: dict[str, Any], settings: VLLMBenchSettings,
             prompt: Prompt = long_prompt) -> dict[str, tuple[int, float]]:
    """Per engine: (blocks after prefill, median prefill-step seconds), the engines interleaved
    (same prompt in turn, two untimed warm-ups each) so drifting load on shared cores hits both alike."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    blocks: dict[str, int] = {}
    for repeat in range(settings.repeats + 2):
        for name, llm in engines.items():
            blocks[name], seconds = _prefill_step(llm, settings, f"prefill-{repeat}", 1000 + repeat, prompt)
            if repeat >= 2:
                times[name].append(seconds)
    return {name: (blocks[name], statistics.median(times[name])) for name in engines}


def _workload(llm: Any, settings: VLLMBenchSettings, prompt: Prompt = long_prompt) -> tuple[int, float]:
    """(most requests running at once, output tokens per second) on the concurrency workload."""
    from vllm import SamplingParams

    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    params = SamplingParams(max_tokens=settings.new_tokens, temperature=0.0, ignore_eos=True)
    for i in range(settings.requests):
        engine.add_request(f"load-{i}", prompt(settings.prompt, i), params)
    most, produced, start = 0, 0, time.perf_counter()
    while engine.has_unfinished_requests():
        for output in engine.step():
            produced += len(output.outputs[0].token_ids) if output.finished else 0
        most = max(most, len(scheduler.running))
    return most, produced / (time.perf_counter() - start)


def _memory_for(requests: int, settings: VLLMBenchSettings, model_dir: Path) -> int:
    """KV cache bytes that hold ``requests`` full-cache requests (+1 block: vLLM's null block)."""
    full_blocks = math.ceil((settings.prompt + settings.new_tokens) / BLOCK_SIZE)
    return (requests * full_blocks + 1) * _block_bytes(model_dir)


def _engine(model_dir: Path, config: CSPConfig | None, settings: VLLMBenchSettings, memory: int) -> Any:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    max_len = settings.prompt + settings.new_tokens
    if max_len > 1024:
        os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # the tiny VLM was trained to 1024 positions
    return make_llm(model_dir, config, max_model_len=max_len, kv_cache_memory_bytes=memory, max_num_seqs=256)


def _engines(settings: VLLMBenchSettings, model_dir: Path,
             progress: Callable[[str], None] | None = None) -> tuple[dict[str, Any], int]:
    """({"off": engine, "csp": engine}, their KV memory in bytes), both with room for ``full_capacity``
    full-cache requests."""
    memory = _memory_for(settings.full_capacity, settings, model_dir)
    config = CSPConfig(budget=settings.budget, window=settings.window)
    engines = {}
    for name, csp in (("off", None), ("csp", config)):
        if progress:
            progress(f"engine {name}")
        engines[name] = _engine(model_dir, csp, settings, memory)
    return engines, memory


@contextlib.contextmanager
def _timed_compaction() -> Iterator[dict[str, dict[str, float]]]:
    """{req_id: {"kept_indices": s, "compact": s}} summed over the layers, while the context is open
    (wraps the CSP backend's ``kept_indices`` and ``_compact``; restored after)."""
    from csp_compile.vllm import cpu_backend

    seconds: dict[str, dict[str, float]] = {}
    impl, select, compact = cpu_backend.CSPCPUAttentionImpl, cpu_backend.kept_indices, cpu_backend.CSPCPUAttentionImpl._compact
    current: list[str] = []

    def add(name: str, start: float) -> None:
        entry = seconds.setdefault(current[-1], {"kept_indices": 0.0, "compact": 0.0})
        entry[name] += time.perf_counter() - start

    def timed_select(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return select(*args, **kwargs)
        finally:
            add("kept_indices", start)

    def timed_compact(self: Any, layer: Any, batch: Any, compaction: Any, *args: Any) -> None:
        current.append(compaction.req_id)
        start = time.perf_counter()
        try:
            compact(self, layer, batch, compaction, *args)
        finally:
            add("compact", start)
            current.pop()

    cpu_backend.kept_indices, impl._compact = timed_select, timed_compact
    try:
        yield seconds
    finally:
        cpu_backend.kept_indices, impl._compact = select, compact


def run_prefill_profile(settings: VLLMBenchSettings, model_dir: Path) -> dict[str, Any]:
    """``vllm_prefill_overhead_bNN`` alone (``settings.repeats`` interleaved steps, as the bench) and,
    in ms per CSP prefill step (medians over the timed steps), the time in ``kept_indices`` and in the
    plugin's whole compaction (``kept_indices`` included), next to the two engines' step times."""
    engines, _ = _engines(settings, model_dir)
    try:
        with _timed_compaction() as seconds:
            prefill = _prefill(engines, settings, _prompt_of(model_dir))
    finally:
        engines.clear()
        gc.collect()
    timed = list(seconds.values())[2:]  # the two warm-up requests are not timed
    tag = settings.tag
    return {f"vllm_prefill_overhead_{tag}": prefill["csp"][1] / prefill["off"][1],
            "vllm_prefill_ms_off": 1e3 * prefill["off"][1], "vllm_prefill_ms_csp": 1e3 * prefill["csp"][1],
            "vllm_kept_indices_ms_per_step": 1e3 * statistics.median(t["kept_indices"] for t in timed),
            "vllm_compaction_ms_per_step": 1e3 * statistics.median(t["compact"] for t in timed),
            "vllm_prompt_tokens": settings.prompt, "vllm_repeats": settings.repeats}


def run_vllm_bench(settings: VLLMBenchSettings, model_dir: Path,
                   progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The flat result (see the module docstring)."""
    engines, memory = _engines(settings, model_dir, progress)
    try:
        prompt = _prompt_of(model_dir)
        prefill = _prefill(engines, settings, prompt)
        raw: dict[str, dict[str, float]] = {}
        for name, llm in engines.items():
            if progress:
                progress(f"workload {name}")
            concurrent, tokens_per_s = _workload(llm, settings, prompt)
            raw[name] = {"blocks_per_request": prefill[name][0], "prefill_s": prefill[name][1],
                         "max_concurrent": concurrent, "tokens_per_s": tokens_per_s}
    finally:
        engines.clear()
        gc.collect()
    if progress:
        progress("engine off, memory for every request")
    ample = _engine(model_dir, None, settings, _memory_for(settings.requests, settings, model_dir))
    try:
        _prefill_step(ample, settings, "warm-up", 999, prompt)
        if progress:
            progress("workload off, memory for every request")
        concurrent, tokens_per_s = _workload(ample, settings, prompt)
        raw["off_ample_memory"] = {"max_concurrent": concurrent, "tokens_per_s": tokens_per_s}
    finally:
        del ample
        gc.collect()
    tag, off, csp_, ample_off = settings.tag, raw["off"], raw["csp"], raw["off_ample_memory"]
    result: dict[str, Any] = {
        f"vllm_blocks_per_request_ratio_{tag}": csp_["blocks_per_request"] / off["blocks_per_request"],
        f"vllm_max_concurrent_ratio_{tag}": csp_["max_concurrent"] / off["max_concurrent"],
        f"vllm_throughput_ratio_{tag}": csp_["tokens_per_s"] / off["tokens_per_s"],
        f"vllm_prefill_overhead_{tag}": csp_["prefill_s"] / off["prefill_s"],
        "vllm_throughput_ratio_ample_memory": ample_off["tokens_per_s"] / off["tokens_per_s"],
        f"vllm_throughput_ratio_{tag}_vs_ample_memory": csp_["tokens_per_s"] / ample_off["tokens_per_s"],
    }
    for name, values in raw.items():
        result.update({f"vllm_{key}_{name}": value for key, value in values.items()})
    result.update({"vllm_prompt_tokens": settings.prompt, "vllm_new_tokens": settings.new_tokens,
                   "vllm_requests": settings.requests, "vllm_kv_cache_memory_bytes": memory,
                   "vllm_block_size": BLOCK_SIZE, "vllm_budget": settings.budget, "vllm_window": settings.window})
    return result


if __name__ == "__main__":
    from csp_compile.vllm.engine import prepared_model_dir

    parser = argparse.ArgumentParser(prog="python -m csp_compile.vllm.bench",
                                     description="vLLM prefill overhead of CSP and where it goes (see the module docstring)")
    parser.add_argument("--repeats", type=int, default=12, help="timed prefill steps per engine (default 12)")
    parser.add_argument("--prompt", type=int, default=VLLMBenchSettings.prompt, help="prompt tokens (default 2048)")
    parser.add_argument("--budget", type=float, default=VLLMBenchSettings.budget, help="CSP budget (default 0.2)")
    args = parser.parse_args()
    profile = run_prefill_profile(VLLMBenchSettings(prompt=args.prompt, budget=args.budget, repeats=args.repeats),
                                  prepared_model_dir())
    print(json.dumps(profile, indent=1))

"""``csp-compile bench``: a --quick run at tiny size writes every figure, and bad arguments are
one-line errors with exit code 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from csp_compile import cli
from csp_compile.bench import FIGURES, TARGETS

pytestmark = pytest.mark.slow  # compiles whole models: `pytest -m "not slow"` skips this module

SETUP_KEYS = (
    "model", "family", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "vocab_size", "parameters_total", "parameters_language_model", "prompt_tokens", "long_prompt_tokens",
    "image_token_share", "dtype", "device", "torch_version", "threads", "budget", "memory_method",
    "fused_scoring_impl", "naive_scoring_impl", "what", "targets",
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    # A separate process: the bench sets torch's thread count and compiles two models.
    proc = subprocess.run(
        [sys.executable, "-m", "csp_compile", "bench", "--quick", "--threads", "1", "--device", "cpu", "--layers", "1",
         "--prompt", "192", "--long-prompt", "256", "--chunk-prompt", "512", "--prefill-chunk", "64", "--repeats", "2",
         "--overhead-processes", "2", "--new-tokens", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


def test_quick_bench_writes_every_figure(quick_run):
    _, result = quick_run
    for key in FIGURES:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]), key
        assert result[key] >= 0, key
    for key in SETUP_KEYS:
        assert key in result, key
    assert set(result["what"]) == set(FIGURES) and all(result["what"].values())
    assert set(result["targets"]) == set(TARGETS)
    judged = {key for key, verdict in result["targets"].items() if verdict != "not judged"}
    assert judged == {"kv_bytes_ratio_b20", "decode_recompiles", "chunked_kv_bytes_ratio"}, result["targets"]
    assert {result["targets"][key] for key in judged} <= {"pass", "fail"}
    assert set(result["prefill_overhead_cases"]) == {f"{policy}/{case}/{length}" for policy in ("csp", "snapkv")
                                                     for case in ("text", "image", "padded") for length in (192, 256)}
    assert result["prefill_overhead_ratio"] == max(result["prefill_overhead_cases"].values())
    assert set(result["prefill_noise_cases"]) == {f"{case}/{length}" for case in ("text", "image", "padded")
                                                  for length in (192, 256)}
    assert result["prefill_noise_worst"] == max(abs(x - 1) for x in result["prefill_noise_cases"].values())
    # the rounds ran in two processes: a ratio per process and case, the figure pooled over both
    assert set(result["prefill_overhead_by_process"]) == set(result["prefill_overhead_cases"])
    assert all(len(v) == 2 for v in result["prefill_overhead_by_process"].values())
    assert all(len(v) == 2 for v in result["prefill_noise_by_process"].values())
    assert result["overhead_processes"] == 2 and result["prefill_repeats"] == 2
    assert result["prompt_tokens"] == 192 and result["long_prompt_tokens"] == 256
    assert result["num_hidden_layers"] == 1 and result["threads"] == 1 and result["device"] == "cpu"
    assert 0.2 <= result["image_token_share"] <= 0.35
    assert set(result["prefill_speedup_vs_eager"]) == {"image/192", "padded/192"}
    for case, speedup in result["prefill_speedup_vs_eager"].items():
        assert speedup > 0 and math.isclose(speedup, result["prefill_ms_eager"][case] / result["prefill_ms_csp"][case],
                                            rel_tol=0.5)


def test_quick_bench_measures_the_eviction(quick_run):
    _, result = quick_run
    assert abs(result["kv_bytes_ratio_b20"] - result["budget"]) <= 0.01
    assert result["targets"]["kv_bytes_ratio_b20"] == "pass"
    assert result["decode_recompiles"] == 0
    assert result["decode_bound_b20"] > 1.0
    # chunked prefill keeps the same cache and peaks lower than one-shot
    assert result["chunk_prompt_tokens"] == 512 and result["prefill_chunk"] == 64
    assert abs(result["chunked_kv_bytes_ratio"] - 1) <= 0.01
    assert result["chunked_prefill_peak_mem_ratio"] < 1
    # every scorer computed the same scores as the reference
    assert result["naive_scoring_max_abs_diff"] < 1e-4 and result["fused_scoring_max_abs_diff"] < 1e-4


def test_quick_bench_prints_the_table(quick_run):
    proc, result = quick_run
    for key in FIGURES:
        assert key in proc.stdout
    assert "target" in proc.stdout and "wall time" in proc.stdout and "vs eager" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, words", [
    (["--budget", "1.5"], "--budget"),
    (["--budget", "0"], "--budget"),
    (["--device", "tpu"], "--device"),
    (["--threads", "0"], "--threads"),
    (["--overhead-processes", "0"], "--overhead-processes"),
    (["--prompt", "16"], "prompt"),
    (["--dtype", "float8"], "--dtype"),
    (["--prefill-chunk", "0"], "--prefill-chunk"),
    (["--chunk-prompt", "4096", "--prefill-chunk", "4096"], "prefill-chunk"),
])
def test_bad_arguments_are_one_line_errors(argv, words, capsys):
    code = cli.main(["bench", "--quick", "--device", "cpu", *argv] if "--device" not in argv else ["bench", *argv])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("csp-compile bench: error:") and words in lines[0], captured.err
    assert captured.out == ""


def test_share_weights_makes_every_parameter_the_same_tensor_and_keeps_outputs():
    from csp_compile.bench import model as bench_model

    source = bench_model.build_bench_model(bench_model.QUICK_SHAPE, seed=0)
    other = bench_model.build_bench_model(bench_model.QUICK_SHAPE, seed=1)
    inputs = bench_model.bench_inputs(source, 64, tail_text=8)
    with torch.no_grad():
        expected = source(**inputs).logits
        assert not torch.equal(other(**inputs).logits, expected)
        bench_model.share_weights(other, source)
        assert torch.equal(other(**inputs).logits, expected)
    pointers = {name: p.data_ptr() for name, p in source.named_parameters()}
    assert all(p.data_ptr() == pointers[name] for name, p in other.named_parameters())

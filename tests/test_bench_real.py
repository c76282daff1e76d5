"""``csp-compile bench --model``: argument errors are one line naming the argument; the real-model bench
runs end to end on a tiny random-weight Llama, its figures finite and consistent; the kernel
attribution tells CSP's nodes from the model's."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import fx
from transformers import LlamaConfig, LlamaForCausalLM

from csp_compile import cli


def _tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    return model


@pytest.mark.parametrize("argv, words", [
    (["--model", "smollm2", "--prompt", "512"], "--prompt"),
    (["--model", "smollm2", "--budget", "2"], "--budget"),
    (["--model", "smollm2", "--max-batch-tokens", "0"], "--max-batch-tokens"),
    (["--requests", "3"], "--requests"),
    (["--long"], "--long"),
    (["--model", "smollm2", "--quick", "--long"], "pick one"),
    (["--model", "smollm2", "--window", "16"], "only with --engine vllm"),
    (["--model", "smollm2", "--dtype", "bfloat16"], "--dtype"),
    (["--markdown", "x.md", "--quick"], "--markdown"),
])
def test_bad_real_arguments_are_one_line_errors(argv, words, capsys):
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("csp-compile bench: error:") and words in err[0], err


def test_unprepared_model_says_how_to_prepare_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CSP_COMPILE_HOME", str(tmp_path))
    assert cli.main(["bench", "--model", "smollm2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model" in err[0] and "csp-compile prepare smollm2" in err[0], err


def test_a_directory_without_config_is_refused(tmp_path, capsys):
    assert cli.main(["bench", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model" in err[0] and "config.json" in err[0], err


def test_csp_node_names_finds_the_selection_gathers_and_window_rows():
    from csp_compile.bench.attribution import csp_node_names
    from csp_compile.selection import gather_kept

    def csp_prefill_selection(q, k):
        return q, k

    graph = fx.Graph()
    q, k = graph.placeholder("q"), graph.placeholder("k")
    sel = graph.call_function(csp_prefill_selection, (q, k))
    kept = graph.call_function(__import__("operator").getitem, (sel, 0))
    gathered = graph.call_function(gather_kept, (k, kept, kept))
    rows = graph.call_function(__import__("operator").getitem, (q, (slice(None), slice(None), slice(-32, None))))
    window = graph.call_function(torch.clone, (rows,))
    model_op = graph.call_function(torch.relu, (q,))
    graph.output((gathered, window, model_op))
    names = csp_node_names(graph)
    assert {sel.name, kept.name, gathered.name, window.name} <= names
    assert model_op.name not in names and rows.name not in names


@pytest.mark.slow  # compiles a tiny model twice, for 1-2 batch sizes (about a minute on 2 cores)
def test_real_bench_smoke_on_a_tiny_llama():
    from csp_compile.bench import model as bench_model
    from csp_compile.bench.real import RealSettings, check_real_targets, format_markdown, run_real_bench

    settings = RealSettings(model=Path("tiny"), prefill_lengths=(256, 384), prefill_rounds=(1, 1),
                            decode_lengths=(160, 256), batches=(1, 2), max_batch_tokens=400, new_tokens=5,
                            threads=1, build=_tiny_llama)
    r = run_real_bench(settings)
    assert set(r["prefill_ratio"]) == {"256", "384"}
    for key in r["prefill_ratio"]:
        assert 0 <= r["csp_share_lower"][key] <= r["csp_share"][key] <= r["csp_share_upper"][key] <= 1
        assert 0 <= r["csp_share_hooks"][key] <= r["csp_share_lower"][key]
        assert r["csp_share_lower"][key] > 0  # the selection's kernels were found
        assert math.isclose(r["prefill_ratio"][key], r["prefill_ms_csp"][key] / r["prefill_ms_plain"][key], rel_tol=1e-9)
        measured = r["kv_bytes_measured"][key]
        assert 0.19 <= measured["csp"] / measured["plain"] <= 0.21
    assert r["unmatched_extern_calls"] == 0 and r["decode_recompiles"] == 0
    assert set(r["decode_speedup"]) == {"160x1", "256x1", "160x2"} and set(r["decode_not_run"]) == {"256x2"}
    weights = bench_model.decode_weight_bytes(_tiny_llama())
    assert r["decode_weight_bytes"] == weights
    for key in r["decode_speedup"]:
        for figure in ("decode_ms_plain", "decode_ms_csp", "decode_speedup", "decode_bound", "decode_of_bound"):
            assert math.isfinite(r[figure][key]) and r[figure][key] > 0, (figure, key)
        full, kept = r["kv_bytes_full"][key], r["kv_bytes_kept"][key]
        assert r["decode_bound"][key] == pytest.approx((weights + full) / (weights + kept))
        assert r["decode_of_bound"][key] == pytest.approx(r["decode_speedup"][key] / r["decode_bound"][key])
    # the formula's KV bytes match the cache a prefill left (256 is both a prefill and a decode length)
    assert r["kv_bytes_full"]["256x1"] == r["kv_bytes_measured"]["256"]["plain"]
    assert r["kv_bytes_kept"]["256x1"] == r["kv_bytes_measured"]["256"]["csp"]
    assert r["peak_prefill_bytes_plain"] > 0 and r["peak_mem_ratio"] == pytest.approx(
        r["peak_prefill_bytes_csp"] / r["peak_prefill_bytes_plain"])
    assert r["targets"] == check_real_targets(r)
    assert all(v == "not judged" for k, v in r["targets"].items()
               if k.startswith(("csp_share", "decode_of_bound/")) and k != "decode_of_bound/256x2")
    assert r["targets"]["decode_of_bound/256x2"] == "not run"
    assert "| 256 |" in format_markdown(r)

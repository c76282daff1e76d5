"""``csp-compile eval/bench --engine vllm``: the same records as the transformers path, the bench's figures."""

from __future__ import annotations

import json

from csp_compile.cli import main
from csp_compile.vllm.bench import VLLMBenchSettings, run_vllm_bench

RECORD_KEYS = {"policy", "budget", "prefill_chunk", "accuracy", "kl", "top1_agreement", "kept_fraction",
               "kv_bytes_ratio", "n"}


def test_eval_engine_vllm_writes_the_transformers_paths_records(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--engine", "vllm", "--policies", "csp", "--budgets", "0.2", "--n", "8", "--window", "8",
                 "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["engine"] == "vllm" and payload["window"] == 8
    full, csp = payload["records"]
    assert set(full) == set(csp) == RECORD_KEYS
    assert (full["policy"], csp["policy"], csp["budget"], csp["n"]) == ("full", "csp", 0.2, 8)
    assert full["kl"] == 0.0 and full["kv_bytes_ratio"] == 1.0
    assert 0.2 <= csp["kept_fraction"] < 0.35 and csp["kv_bytes_ratio"] < 0.4  # budget rounded up to whole blocks
    assert "csp" in capsys.readouterr().out


def test_eval_engine_vllm_refuses_chunked_prefill(capsys):
    assert main(["eval", "--engine", "vllm", "--prefill-chunk", "32", "--n", "2"]) == 2
    assert "--prefill-chunk is not supported with --engine vllm" in capsys.readouterr().err


def test_bench_figures_show_the_memory_gain(model_dir):
    settings = VLLMBenchSettings(prompt=512, requests=8, new_tokens=8, full_capacity=2, repeats=1)
    result = run_vllm_bench(settings, model_dir)
    for name in ("blocks_per_request_ratio", "max_concurrent_ratio", "throughput_ratio", "prefill_overhead"):
        assert result[f"vllm_{name}_b20"] > 0
    assert result["vllm_blocks_per_request_off"] == 16  # 512 tokens in blocks of 32
    assert result["vllm_blocks_per_request_ratio_b20"] <= 0.25
    assert result["vllm_max_concurrent_off"] == 2 < result["vllm_max_concurrent_csp"]
    assert result["vllm_max_concurrent_off_ample_memory"] == 8  # room for every request
    assert result["vllm_throughput_ratio_ample_memory"] > 0 and result["vllm_throughput_ratio_b20_vs_ample_memory"] > 0

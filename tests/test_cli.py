"""The csp-compile command line: eval / demo / show-kept on a (tiny, untrained) task model, and
bad input -> exit code 2 with one line naming what was wrong."""

import json
import subprocess
import sys

import pytest
import transformers
from hypothesis import given
from hypothesis import strategies as st

from csp_compile.cli import main
from csp_compile.data.model import build_model
from csp_compile.evaluation import parse_budgets, parse_policies
from csp_compile.policies import available_policies


@pytest.fixture(scope="module")
def task_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("task_model")
    build_model(seed=1).save_pretrained(path)
    return path


def test_eval_writes_records_json_and_plot(task_model_dir, tmp_path, capsys):
    out, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    code = main(["eval", "--model", str(task_model_dir), "--policies", "csp,random", "--budgets", "0.2",
                 "--n", "4", "--json", str(out), "--plot", str(plot), "--threads", "1"])
    assert code == 0
    payload = json.loads(out.read_text())
    records = payload["records"]
    assert [(r["policy"], r["budget"]) for r in records] == [("full", 1.0), ("csp", 0.2), ("random", 0.2)]
    for record in records:
        assert set(record) >= {"policy", "budget", "accuracy", "kl", "top1_agreement", "kept_fraction"}
        assert 0.0 <= record["accuracy"] <= 1.0 and record["kl"] >= 0.0 and record["n"] == 4
    full = records[0]
    assert full["kl"] == 0.0 and full["top1_agreement"] == 1.0 and full["kept_fraction"] == 1.0
    for record in records[1:]:
        assert abs(record["kept_fraction"] - 0.2) < 0.01 and abs(record["kv_bytes_ratio"] - 0.2) < 0.01
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "policy" in capsys.readouterr().out


def test_demo_and_show_kept_run(task_model_dir, tmp_path, capsys):
    assert main(["demo", "--model", str(task_model_dir), "--n", "2", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "full cache" in out and "KV cache after prefill" in out
    png = tmp_path / "kept.png"
    assert main(["show-kept", "--model", str(task_model_dir), "--out", str(png), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG" and out.count("layer ") >= 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "/nonexistent/model"], "does not exist"),
        (["eval", "--policies", "csp,snapkb"], "unknown policy 'snapkb'"),
        (["eval", "--policies", "snapkv:mass"], "only csp takes a cross-ratio rule"),
        (["eval", "--budgets", "0.2,1.5"], "budget 1.5 is out of range"),
        (["eval", "--n", "0"], "--n must be >= 1"),
        (["show-kept", "--budget", "0"], "budget"),
        (["show-kept", "--image", "/nonexistent.png", "--policy", "csp"], None),
        (["demo", "--n", "0"], "--n must be in 1 .. 64"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, task_model_dir):
    if "--model" not in argv:
        argv = argv + ["--model", str(task_model_dir)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"csp-compile {argv[0]}: error: ")
    assert "Traceback" not in err
    if message:
        assert message in err


def test_a_model_that_is_not_a_vlm_is_refused(tmp_path, capsys):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    assert main(["eval", "--model", str(tmp_path), "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert "not a vision-language model" in err and len(err.strip().splitlines()) == 1


@given(text=st.text(alphabet=st.sampled_from(list("cspnakvh2o:0.15,rum_fl ")), max_size=24))
def test_policy_parsing_accepts_known_names_or_says_what_is_allowed(text):
    try:
        specs = parse_policies(text)
    except ValueError as error:
        assert "allowed" in str(error) or "more than once" in str(error) or "outside [0, 1]" in str(error)
        return
    for spec in specs:
        assert spec.policy in available_policies()
        assert spec.cross_ratio is None or spec.policy == "csp"


@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=1, max_size=5))
def test_budget_parsing(values):
    text = ",".join(repr(v) for v in values)
    if all(0.0 < v <= 1.0 for v in values):
        assert parse_budgets(text) == values
    else:
        with pytest.raises(ValueError, match="out of range|not a number"):
            parse_budgets(text)


def test_console_entry_points():
    for argv in (["-m", "csp_compile", "--help"],):
        result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0
        for command in ("bench", "demo", "eval", "show-kept"):
            assert command in result.stdout


def test_missing_shipped_model_says_how_to_get_one(monkeypatch, tmp_path, capsys):
    import csp_compile.data.model as model_module

    monkeypatch.setattr(model_module, "SHIPPED_MODEL_DIR", tmp_path / "tiny_vlm")
    assert main(["demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train_tiny_vlm.py" in err and "--model" in err and len(err.splitlines()) == 1


def test_eval_on_another_family_measures_agreement_not_accuracy(tmp_path, capsys):
    from csp_compile.testing import build_tiny_vlm

    build_tiny_vlm("qwen2_vl").save_pretrained(tmp_path / "qwen2_vl")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "qwen2_vl"), "--policies", "csp", "--budgets", "0.2", "--n", "2",
                 "--json", str(out), "--threads", "1"]) == 0
    payload = json.loads(out.read_text())
    assert "accuracy is not measured" in payload["data"]
    full, csp = payload["records"]
    assert full["accuracy"] is None and csp["accuracy"] is None
    assert abs(csp["kept_fraction"] - 0.2) < 0.01 and 0.0 <= csp["top1_agreement"] <= 1.0

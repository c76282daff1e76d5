"""The csp-compile command line: eval / demo / show-kept on a (tiny, untrained) task model, and
bad input -> exit code 2 with one line naming what was wrong."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import transformers
from hypothesis import given
from hypothesis import strategies as st

from csp_compile import CSPConfig
from csp_compile.cli import main
from csp_compile.data.model import SHIPPED_MODEL_DIR
from csp_compile.evaluation import PolicySpec, parse_budgets, parse_policies, parse_policy
from csp_compile.policies import available_policies



@pytest.mark.slow
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
        assert 0.0 <= record["accuracy"] <= 1.0 and record["n"] == 4
    full = records[0]
    assert full["kl"] == 0.0 and full["top1_agreement"] == 1.0 and full["kept_fraction"] == 1.0
    assert records[2]["kl"] > 0.0  # random eviction of 80% of the prompt changes the answer distribution
    for record in records[1:]:
        assert abs(record["kept_fraction"] - 0.2) < 0.01 and abs(record["kv_bytes_ratio"] - 0.2) < 0.01
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "policy" in capsys.readouterr().out


@pytest.mark.slow
def test_show_kept_runs(task_model_dir, tmp_path, capsys):
    """(``demo`` runs in tests/test_shipped_model.py and tests/test_demo_conversation.py.)"""
    png = tmp_path / "kept.png"
    assert main(["show-kept", "--model", str(task_model_dir), "--out", str(png), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG" and out.count("layer ") >= 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["eval", "--model", "/nonexistent/model"], "does not exist"),
        (["eval", "--policies", "csp,snapkb"], "unknown policy 'snapkb'"),
        (["eval", "--policies", "snapkv:mass"], "snapkv takes ':k<odd kernel>'"),
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


def _broken_model_dir(tmp_path, case):
    """A copy of the shipped tiny VLM in tmp_path, broken as ``case`` says."""
    directory = tmp_path / "model"
    if case == "missing directory":
        return directory
    shutil.copytree(SHIPPED_MODEL_DIR, directory)
    config, weights = directory / "config.json", directory / "model.safetensors"
    if case == "no config.json":
        config.unlink()
    elif case == "config not JSON":
        config.write_text('{"model_type": "llava", ')
    elif case == "config a JSON list":
        config.write_text("[1, 2]")
    elif case == "config without model_type":
        config.write_text("{}")
    elif case == "config of an unknown model_type":
        config.write_text('{"model_type": "no_such_model"}')
    elif case == "config with a field of the wrong type":
        config.write_text('{"model_type": "llava", "text_config": 5}')
    elif case == "no weights":
        weights.unlink()
    elif case == "weights not safetensors":
        weights.write_bytes(b"not a safetensors file")
    elif case == "weights truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif case == "weights of another model":
        import torch
        from safetensors.torch import save_file

        save_file({"foo": torch.zeros(3)}, str(weights), metadata={"format": "pt"})
    else:
        raise AssertionError(case)
    return directory


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing directory", "does not exist"),
        ("no config.json", "has no config.json"),
        ("config not JSON", "is not valid JSON"),
        ("config a JSON list", "is not a transformers model config"),
        ("config without model_type", "is not a transformers model config"),
        ("config of an unknown model_type", "is not a config transformers can load"),
        ("config with a field of the wrong type", "is not a config transformers can load"),
        ("no weights", "has no readable weights"),
        ("weights not safetensors", "has corrupt weights"),
        ("weights truncated", "has corrupt weights"),
        ("weights of another model", "lack"),
    ],
)
@pytest.mark.parametrize("command", ["eval", "show-kept"])
def test_broken_model_dir_is_one_line_naming_model_and_exit_2(command, case, message, tmp_path, capsys):
    directory = _broken_model_dir(tmp_path, case)
    assert main([command, "--model", str(directory)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"csp-compile {command}: error: --model: "), err
    assert str(directory) in err and message in err and "save_pretrained directory" in err
    assert "Traceback" not in err and not captured.out


@pytest.mark.parametrize(
    "argv, value, message",
    [
        (["show-kept", "--policy", "csp,snapkv"], "csp,snapkv", "takes exactly one policy"),
        (["show-kept", "--policy", "csp, csp:mass"], "csp, csp:mass", "takes exactly one policy"),
        (["show-kept", "--policy", "snapkb"], "snapkb", "unknown policy"),
        (["show-kept", "--policy", "csp:bogus"], "csp:bogus", "unknown cross-ratio rule"),
        (["show-kept", "--policy", "csp:1.5"], "csp:1.5", "outside [0, 1]"),
        (["show-kept", "--policy", "csp:"], "csp:", "unknown cross-ratio rule"),
        (["show-kept", "--policy", "h2o:mass"], "h2o:mass", "only csp (cross-ratio rule) and snapkv"),
        (["show-kept", "--policy", ""], "", "is empty"),
        (["eval", "--policies", "csp,snapkb"], "snapkb", "unknown policy"),
        (["eval", "--policies", "csp:population,csp:bogus"], "csp:bogus", "unknown cross-ratio rule"),
        (["eval", "--policies", "csp,csp:-0.5"], "csp:-0.5", "outside [0, 1]"),
        (["eval", "--policies", " , "], "", "is empty"),
    ],
)
def test_bad_policy_is_one_line_naming_the_option_and_exit_2(argv, value, message, capsys):
    # the policy is checked before any model is loaded, so no --model is needed
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"csp-compile {argv[0]}: error: {argv[1]}"), err
    assert repr(value) in err or not value
    assert message in err and "allowed" in err and "csp:mass" in err


def test_parse_policy_takes_exactly_one():
    assert parse_policy("csp:mass") == PolicySpec("csp:mass", "csp", (("cross_ratio", "mass"),))
    assert parse_policy(" snapkv ") == PolicySpec("snapkv", "snapkv")
    assert parse_policy("csp:0.25") == PolicySpec("csp:0.25", "csp", (("cross_ratio", 0.25),))
    with pytest.raises(ValueError, match="--policy 'csp,snapkv' .* exactly one policy: allowed one of"):
        parse_policy("csp,snapkv")


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["eval", "--model", "{model}"], "--model: "),
        (["show-kept", "--policy", "csp,snapkv"], "--policy 'csp,snapkv'"),
    ],
)
def test_console_errors_exit_2_with_one_stderr_line(argv, needle, tmp_path):
    """Through a real process: no traceback and no stray log lines from transformers on stderr."""
    model = _broken_model_dir(tmp_path, "config not JSON")
    argv = [arg.format(model=model) for arg in argv]
    result = subprocess.run([sys.executable, "-m", "csp_compile", *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr


def test_a_model_that_is_neither_a_vlm_nor_a_causal_lm_is_refused(tmp_path, capsys):
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=8, patch_size=4)
    transformers.ViTModel(config).save_pretrained(tmp_path)
    capsys.readouterr()  # what saving printed (a progress bar, depending on the installed packages)
    assert main(["eval", "--model", str(tmp_path), "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert "ViTConfig, not a vision-language model or a text-only causal LM" in err
    assert len(err.strip().splitlines()) == 1


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
        spec.config(0.5, CSPConfig())  # every accepted spec is a valid config


@pytest.mark.parametrize("text, policy, fields", [
    ("adakv", "snapkv", {"head_budget": "adaptive"}),
    ("pyramidkv", "snapkv", {"layer_budget": "pyramid"}),
    ("snapkv:k1", "snapkv", {"pool_kernel": 1}),
    ("csp+pyramid+adaptive", "csp", {"layer_budget": "pyramid", "head_budget": "adaptive"}),
    ("csp:mass+adaptive", "csp", {"cross_ratio": "mass", "head_budget": "adaptive"}),
    ("random+pyramid", "random", {"layer_budget": "pyramid"}),
    ("csp+imgpool+k3", "csp", {"pool": "image", "pool_kernel": 3, "image_grid": "run"}),
    ("csp+imgpool2d", "csp", {"pool": "image", "image_grid": "auto"}),
    ("snapkv+nopool", "snapkv", {"pool": "none"}),
    ("csp:mass+pool1d", "csp", {"cross_ratio": "mass", "pool": "1d"}),
    ("adakv+imgpool", "snapkv", {"head_budget": "adaptive", "pool": "image"}),
])
def test_policy_specs_name_baselines_and_adaptive_budgets(text, policy, fields):
    spec = parse_policy(text)
    config = spec.config(0.1, CSPConfig())
    assert spec.label == text and config.policy == policy and config.budget == 0.1
    assert {name: getattr(config, name) for name in fields} == fields


@pytest.mark.parametrize("text, message", [
    ("snapkv:k4", "snapkv takes ':k<odd kernel>'"),
    ("h2o:mass", "only csp (cross-ratio rule) and snapkv (pooling kernel) take a variant"),
    ("csp+wide", "unknown modifier '+wide'"),
    ("random+adaptive", "head_budget='adaptive' is invalid"),
    ("h2o+imgpool", "pool='image' is invalid: allowed None or 'none' with policy 'h2o'"),
    ("csp+k4", "unknown modifier '+k4'"),
])
def test_bad_policy_specs_say_what_is_allowed(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_policy(text)


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
        for command in ("bench", "demo", "eval", "prepare", "show-kept"):
            assert command in result.stdout


def test_missing_shipped_model_says_how_to_get_one(monkeypatch, tmp_path, capsys):
    import csp_compile.data.model as model_module

    monkeypatch.setattr(model_module, "SHIPPED_MODEL_DIR", tmp_path / "tiny_vlm")
    assert main(["demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train_tiny_vlm.py" in err and "--model" in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_eval_on_another_family_measures_agreement_not_accuracy(tmp_path, capsys):
    from csp_compile.tiny_vlms import build_tiny_vlm

    build_tiny_vlm("qwen2_vl").save_pretrained(tmp_path / "qwen2_vl")
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "qwen2_vl"), "--policies", "csp", "--budgets", "0.2", "--n", "2",
                 "--json", str(out), "--threads", "1"]) == 0
    payload = json.loads(out.read_text())
    assert "accuracy is not measured" in payload["data"]
    full, csp = payload["records"]
    assert full["accuracy"] is None and csp["accuracy"] is None
    assert abs(csp["kept_fraction"] - 0.2) < 0.01 and 0.0 <= csp["top1_agreement"] <= 1.0

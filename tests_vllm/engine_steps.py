"""What the engine tests of the tiny VLM families share: one engine per CSP config, a batch's
prefill with the request behind every compaction, and what the model was fed at each step."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from csp_compile.config import CSPConfig
from csp_compile.vllm import batch
from csp_compile.vllm.engine import greedy, make_llm

__all__ = ["engine_per_config", "fed_to_model", "prefill_and_record"]


def engine_per_config(model_dir: Path, **engine_args: Any) -> Callable[[CSPConfig | None], Any]:
    """``get(config)``: the in-process engine of ``model_dir`` with that CSP config (None: plain
    vLLM), made on first use and kept."""
    made: dict[CSPConfig | None, Any] = {}

    def get(config: CSPConfig | None) -> Any:
        if config not in made:
            made[config] = make_llm(model_dir, config, **engine_args)
        return made[config]

    return get


def prefill_and_record(llm: Any, prompts: list[dict[str, Any]], records: list[tuple],
                       layers: int) -> dict[str, tuple[torch.Tensor, list[Any]]]:
    """Greedy one token of every prompt in one ``generate`` call (prefill only), checking that every
    prompt was compacted in each of ``layers`` layers; {req_id: (the prompt's token ids as vLLM
    expanded them, its multimodal features)} of every compacted request."""
    view = batch.view_for(llm.llm_engine.vllm_config)
    seen: dict[str, tuple[torch.Tensor, list[Any]]] = {}

    def remember(name, req_id, *rest):  # noqa: ANN001
        request = view.request(req_id)
        seen.setdefault(req_id, (torch.tensor(request.prompt_token_ids), list(request.mm_features)))

    batch.RECORDER.append(remember)
    greedy(llm, prompts, 1)
    assert len(seen) == len(prompts) and len(records) == len(prompts) * layers
    return seen


@contextlib.contextmanager
def fed_to_model(llm: Any, argument: str, token_dim: int) -> Iterator[dict[tuple[int, ...], list[tuple[int, torch.Tensor]]]]:
    """{prompt token ids: [(computed tokens before the step, the request's tokens of the model's
    ``argument`` at that step, cut along ``token_dim``)] per step}, while open (wraps the runner's
    ``_model_forward``): e.g. ``"positions"`` along 1 for M-RoPE's (3, n), ``"inputs_embeds"`` along 0."""
    runner = batch.view_for(llm.llm_engine.vllm_config).runner
    seen: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    original = runner._model_forward

    def recording(*args: Any, **kwargs: Any) -> Any:
        fed = kwargs[argument]
        rows = runner.input_batch.num_reqs
        starts = runner.query_start_loc.cpu[: rows + 1].tolist()
        for row, req_id in enumerate(runner.input_batch.req_ids[:rows]):
            steps = seen.setdefault(tuple(runner.requests[req_id].prompt_token_ids), [])
            steps.append((int(runner.input_batch.num_computed_tokens_cpu[row]),
                          fed.narrow(token_dim, starts[row], starts[row + 1] - starts[row]).clone()))
        return original(*args, **kwargs)

    runner._model_forward = recording
    try:
        yield seen
    finally:
        del runner._model_forward

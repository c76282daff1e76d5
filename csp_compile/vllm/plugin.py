"""The ``vllm.general_plugins`` entry point: CSP's attention backend and engine hooks.

``register()`` (vLLM calls it in every process it starts) does four things, each inert unless the
engine's ``additional_config`` has a ``"csp"`` entry:

1. registers ``CSPCPUAttentionBackend`` over ``AttentionBackendEnum.CPU_ATTN``;
2. wraps ``EngineArgs.create_engine_config`` so a bad ``"csp"`` entry or an engine setting CSP
   cannot run with is refused with one line in the caller's process, before the engine starts;
3. wraps ``GPUModelRunner.__init__`` (the CPU runner's base) to hand the runner to its engine's
   ``batch.view_for(vllm_config)``;
4. wraps ``Scheduler._update_after_schedule`` to free compacted blocks (``scheduler_hook``).

Wrapping is idempotent (vLLM may call ``register`` several times per process).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

__all__ = ["register"]

_BACKEND = "csp_compile.vllm.cpu_backend.CSPCPUAttentionBackend"


def _wrap(owner: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    original = getattr(owner, name)
    if getattr(original, "__csp_wrapped__", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper.__csp_wrapped__ = True
    setattr(owner, name, wrapper)


def _checked_engine_config(original: Callable[..., Any]) -> Callable[..., Any]:
    from csp_compile.vllm.settings import check_engine, resolve_image_grid

    def create_engine_config(self, *args: Any, **kwargs: Any) -> Any:
        config = original(self, *args, **kwargs)
        check_engine(config)
        resolve_image_grid(config)
        return config

    return create_engine_config


def _attaching_runner(original: Callable[..., Any]) -> Callable[..., Any]:
    from csp_compile.vllm.batch import view_for

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        view_for(self.vllm_config).attach_runner(self)

    return __init__


def _freeing_blocks(original: Callable[..., Any]) -> Callable[..., Any]:
    from csp_compile.vllm.scheduler_hook import free_compacted_blocks, fresh_prefills
    from csp_compile.vllm.settings import csp_config

    def _update_after_schedule(self, scheduler_output: Any) -> None:
        config = csp_config(self.vllm_config.additional_config)
        fresh = fresh_prefills(self, scheduler_output) if config is not None else []
        original(self, scheduler_output)
        if fresh:
            free_compacted_blocks(self, scheduler_output, fresh, config)

    return _update_after_schedule


def register() -> None:
    """Register the backend and install the hooks (see the module docstring)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    register_backend(AttentionBackendEnum.CPU_ATTN, _BACKEND)
    _wrap(EngineArgs, "create_engine_config", _checked_engine_config)
    _wrap(GPUModelRunner, "__init__", _attaching_runner)
    _wrap(Scheduler, "_update_after_schedule", _freeing_blocks)

"""What ``additional_config={"csp": {...}}`` means, and which engine settings CSP needs.

The ``"csp"`` mapping holds ``CSPConfig`` fields (validated by ``CSPConfig`` itself). Fields of the
transformers path that have no vLLM meaning yet are refused: ``prefill_chunk`` and
``decode_budget`` (chunked and decode-time re-selection), adaptive ``layer_budget`` / ``head_budget``
(vLLM's blocks hold one count per layer and head), ``on_new_turn`` other than the default (a vLLM
request is one turn). The model needs full-attention decoder layers (the ones CSP compacts), and a
model that also has sliding-window layers needs vLLM's hybrid KV cache manager (their own block table).
"""

from __future__ import annotations

from typing import Any, Mapping, NoReturn

from csp_compile.config import CSPConfig
from csp_compile.modality import with_image_grid

__all__ = ["CONFIG_KEY", "check_engine", "csp_config", "resolve_image_grid"]

CONFIG_KEY = "csp"
_FULL_ATTENTION = "full_attention"
_SLIDING_ATTENTION = "sliding_attention"
_UNSUPPORTED = {"prefill_chunk": None, "decode_budget": None, "layer_budget": "uniform", "head_budget": "uniform"}


def _fail(message: str) -> NoReturn:
    raise ValueError(f"csp_compile.vllm: {message}")


def csp_config(additional_config: Mapping[str, Any] | None) -> CSPConfig | None:
    """The CSPConfig of ``additional_config["csp"]``, or None when CSP is off (no such key).
    ValueError (one line) when the entry is not a mapping, names an unknown field or an
    invalid value, or sets a field the vLLM plugin does not support."""
    if not additional_config or CONFIG_KEY not in additional_config:
        return None
    raw = additional_config[CONFIG_KEY]
    if not isinstance(raw, Mapping):
        _fail(f'additional_config["{CONFIG_KEY}"] must be a mapping of CSPConfig fields: got {type(raw).__name__}')
    for name, off in _UNSUPPORTED.items():
        if raw.get(name, off) != off:
            _fail(f"CSPConfig.{name}={raw[name]!r} is not supported in vLLM yet: leave it unset")
    try:
        return CSPConfig().replace(**dict(raw))
    except ValueError as error:
        _fail(str(error))


def resolve_image_grid(vllm_config: Any) -> None:
    """Write the model family's grid into ``additional_config["csp"]`` where it says ``image_grid="auto"``,
    when the engine config is made: vLLM builds a VLM's language-model layers with the text config
    only, which cannot tell the family."""
    config = csp_config(getattr(vllm_config, "additional_config", None))
    if config is not None and config.image_grid == "auto":
        resolved = with_image_grid(config, vllm_config.model_config.hf_config).image_grid
        vllm_config.additional_config[CONFIG_KEY] = {**vllm_config.additional_config[CONFIG_KEY], "image_grid": resolved}


def attention_kinds(vllm_config: Any) -> set[str]:
    """The kinds of attention of the model's decoder layers: its text config's ``layer_types``
    (transformers' per-layer list, e.g. "full_attention", "sliding_attention"); for a config with
    none, {"sliding_attention"} when vLLM gives every layer the model's sliding window (its
    ``cache_config.sliding_window``, e.g. Mistral's 4096 when ``disable_sliding_window`` is off),
    else {"full_attention"}."""
    text = vllm_config.model_config.hf_text_config
    kinds = set(getattr(text, "layer_types", None) or ())
    if kinds:
        return kinds
    return {_SLIDING_ATTENTION} if vllm_config.cache_config.sliding_window is not None else {_FULL_ATTENTION}


def check_engine(vllm_config: Any) -> CSPConfig | None:
    """The engine's CSPConfig (None when CSP is off) after checking that the engine can run it:
    prefix caching off (compacted blocks must never be served as another request's prefix),
    chunked prefill off (a prompt is scored in the step that prefills all of it), no speculative
    decoding, one worker; a model with full-attention layers and, where it has other kinds too, vLLM's
    hybrid KV cache manager on. ValueError names the setting to change."""
    config = csp_config(getattr(vllm_config, "additional_config", None))
    if config is None:
        return None
    if vllm_config.cache_config.enable_prefix_caching:
        _fail("CSP needs enable_prefix_caching=False (compacted blocks must not be shared as a prefix)")
    if vllm_config.scheduler_config.enable_chunked_prefill:
        _fail("CSP needs enable_chunked_prefill=False (a prompt is scored in the step that prefills all of it; "
              "prompts longer than max_num_batched_tokens are then refused by vLLM)")
    if vllm_config.speculative_config is not None:
        _fail("CSP does not support speculative decoding yet")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size * parallel.pipeline_parallel_size * parallel.data_parallel_size != 1:
        _fail("CSP is tested with one worker only: set tensor/pipeline/data parallel sizes to 1")
    kinds = sorted(attention_kinds(vllm_config))
    if _FULL_ATTENTION not in kinds:
        window = vllm_config.cache_config.sliding_window
        hint = "" if window is None else (f": vLLM gives every layer the model's sliding window ({window}); "
                                          "disable_sliding_window=True makes them full attention (max_model_len "
                                          "then at most the window)")
        _fail(f"the model has no full-attention layer for CSP to compact (its layers: {kinds}){hint}")
    if len(kinds) > 1 and vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        _fail(f"the model's {kinds} layers would share one block table, which CSP cannot compact: keep vLLM's "
              "hybrid KV cache manager on (disable_hybrid_kv_cache_manager=False)")
    return config

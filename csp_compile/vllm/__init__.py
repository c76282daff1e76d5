"""CSP inside vLLM's paged KV cache: a ``vllm.general_plugins`` plugin (CPU attention backend).

Enabled per engine by ``LLM(..., additional_config={"csp": {"budget": 0.2, "window": 8}})`` (any
``CSPConfig`` field); without a ``"csp"`` entry every hook passes through. The modules import only
csp_compile's pure-torch parts (config, scoring, selection, policies) and vLLM, so the plugin runs
in a vLLM environment whose transformers is older than the main package's.

    plugin.py           the entry point: registers the backend and the engine hooks
    settings.py         ``additional_config["csp"]`` -> CSPConfig, and what the engine must be
    layout.py           how many tokens a prompt keeps and how many whole blocks it frees
    modality.py         per-token modality ids from a request's multimodal placeholder ranges
    batch.py            the worker's view of the running batch (request of each row, evictions)
    select.py           one request's kept positions per KV head (the project's selection, compiled once)
    cpu_backend.py      the CPU attention backend: scores, compacts, shifts block tables
    scheduler_hook.py   frees the same blocks in the scheduler's KV cache manager
    model_dir.py        a vLLM-ready copy of the shipped tiny VLM
    torchvision_hook.py lets the registry's (CUDA) torchvision wheel import on CPU torch (.pth hook)
"""

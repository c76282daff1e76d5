"""What the tiny vLLM model directories of the tests share: token names and the tokenizer files.

Prompts are token ids, so each directory's tokenizer is a WordLevel model over made-up names: ids
0-3 ``<pad> <s> </s> <unk>``, the family's special tokens at their config ids, ``w<id>`` elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

from csp_compile.vllm.model_dir import word_level_tokenizer

__all__ = ["token_names", "tokenizer_files", "write_files"]

_LOW = {0: "<pad>", 1: "<s>", 2: "</s>", 3: "<unk>"}


def token_names(vocab: int, special: dict[str, int | None]) -> dict[int, str]:
    """id -> token over ``vocab`` ids: ``w<id>``, ids 0-3 the pad / bos / eos / unk tokens, each
    ``special`` token at its id (None: the highest id left free, for tokens a processor looks up
    by text only)."""
    names = {i: f"w{i}" for i in range(vocab)}
    names.update(_LOW)
    taken = {i for i in special.values() if i is not None}
    free = (i for i in range(vocab - 1, len(_LOW) - 1, -1) if i not in taken)
    for name, i in special.items():
        names[i if i is not None else next(free)] = name
    return names


def tokenizer_files(names: dict[int, str], named: dict[str, str]) -> dict[str, dict]:
    """``tokenizer.json`` (names starting with "<" special added tokens, with a newline plain added
    ones), ``tokenizer_config.json`` with the ``named`` tokens (e.g. {"image_token": "<image>"}),
    ``special_tokens_map.json`` and ``generation_config.json``."""
    special = [i for i, name in names.items() if name.startswith("<")]
    added = [i for i, name in names.items() if name.startswith("\n")]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
        "unk_token": "<unk>", **named, "extra_special_tokens": named,
        "model_max_length": 1 << 20, "add_bos_token": False, "add_eos_token": False,
    }
    return {
        "tokenizer.json": word_level_tokenizer(names, special, unk="<unk>", added=added),
        "tokenizer_config.json": config,
        "special_tokens_map.json": {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    }


def write_files(target: Path, files: dict[str, dict]) -> None:
    """Each payload as indented JSON under ``target``."""
    for name, payload in files.items():
        (target / name).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")

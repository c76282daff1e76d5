"""A vLLM-ready copy of the shipped tiny VLM's directory (weights renamed, tokenizer and processor built).

vLLM 0.32's Llava loads the CLIP tower as ``vision_tower.vision_model.*``; checkpoints saved by
transformers >= 5.24 name it ``vision_tower.*``. The shipped model also has no tokenizer (the task
works on token ids): this writes a WordLevel tokenizer over the task vocabulary (``token_name``
of every id), a chat template for vLLM's chat API (``CHAT_TEMPLATE``) and a CLIP image processor
that passes the task's (3, 32, 32) float images through unchanged (no resize, crop, rescale or
normalisation; patch size 4, 64 image tokens).

Only ``tokenizers``, ``safetensors`` and the task data are imported: this runs under the vLLM
environment's transformers (< 5.20) as well as the main one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Mapping

from safetensors.torch import load_file, save_file

from csp_compile.data.lookup import IMAGE_SIZE, PATCH_SIZE, VOCAB, token_name

__all__ = ["CHAT_TEMPLATE", "IMAGE_TOKEN", "prepare_model_dir", "rename_vision_keys", "word_level_tokenizer"]

IMAGE_TOKEN = token_name(VOCAB.image)  # "<img>"
_VISION = "vision_tower."
# <bos>, then every message's parts in order: an image part as the image token (vLLM expands it to
# the image's 64 tokens), a text part as its text (task token names separated by spaces). No roles:
# the task has one turn.
CHAT_TEMPLATE = (
    "{{- bos_token -}}{%- for message in messages -%}{%- if message['content'] is string -%}"
    "{{- ' ' + message['content'] -}}{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- ' ' + part['text'] -}}{%- else -%}{{- ' " + IMAGE_TOKEN + "' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
)


def rename_vision_keys(names: list[str], tower: str = _VISION) -> dict[str, str]:
    """Old name -> vLLM name for every tensor name: ``<tower>X`` becomes ``<tower>vision_model.X``
    unless it already has that level; other names are unchanged."""
    renamed = {}
    for name in names:
        if name.startswith(tower) and not name.startswith(tower + "vision_model."):
            renamed[name] = tower + "vision_model." + name[len(tower):]
        else:
            renamed[name] = name
    return renamed


def word_level_tokenizer(names: Mapping[int, str], special: Iterable[int], unk: str, added: Iterable[int] = ()) -> dict:
    """The ``tokenizer.json`` of a ``tokenizers`` WordLevel model over ``names`` (id -> token; input
    split on whitespace): ``special`` ids are special added tokens, ``added`` ids plain added ones."""
    vocab = {name: i for i, name in names.items()}
    if len(vocab) != len(names):
        raise AssertionError("token names are not unique")
    special = set(special)
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": names[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": i in special} for i in sorted(special | set(added))],
        "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": unk},
    }


def _side_files() -> dict[str, dict]:
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token_name(VOCAB.bos),
        "eos_token": token_name(VOCAB.eos), "pad_token": token_name(VOCAB.pad), "unk_token": token_name(VOCAB.pad),
        "image_token": IMAGE_TOKEN, "extra_special_tokens": {"image_token": IMAGE_TOKEN},
        "model_max_length": 1 << 20, "add_bos_token": False, "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
    }
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
        "do_resize": False, "do_center_crop": False, "do_rescale": False, "do_normalize": False,
        "do_convert_rgb": False, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0],
    }
    processor = {"processor_class": "LlavaProcessor", "patch_size": PATCH_SIZE, "image_token": IMAGE_TOKEN,
                 "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    tokenizer = word_level_tokenizer({i: token_name(i) for i in range(VOCAB.size)},
                                     special=[VOCAB.pad, VOCAB.bos, VOCAB.eos, VOCAB.image], unk=token_name(VOCAB.pad))
    return {"tokenizer.json": tokenizer, "tokenizer_config.json": tokenizer_config,
            "special_tokens_map.json": {k: tokenizer_config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
            "preprocessor_config.json": preprocessor, "processor_config.json": processor}


def prepare_model_dir(source: str | Path, target: str | Path) -> Path:
    """Write a vLLM-ready copy of the model directory ``source`` (config.json, model.safetensors)
    into ``target`` (created; existing files overwritten) and return ``target``. FileNotFoundError
    names a missing input file."""
    source, target = Path(source), Path(target)
    for name in ("config.json", "model.safetensors"):
        if not (source / name).is_file():
            raise FileNotFoundError(f"{str(source / name)!r} does not exist: pass a saved Llava task model directory")
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
    tensors = load_file(str(source / "model.safetensors"))
    names = rename_vision_keys(list(tensors))
    save_file({names[k]: v.contiguous() for k, v in tensors.items()}, str(target / "model.safetensors"),
              metadata={"format": "pt"})
    for name, payload in _side_files().items():
        (target / name).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return target

"""A vLLM-ready copy of the shipped tiny VLM's directory (weights renamed, tokenizer and processor built).

vLLM 0.32's Llava loads the CLIP tower as ``vision_tower.vision_model.*``; checkpoints saved by
transformers >= 5.24 name it ``vision_tower.*``. The shipped model also has no tokenizer (the task
works on token ids): this writes a WordLevel tokenizer over the task vocabulary (``token_name``
of every id) and a CLIP image processor that passes the task's (3, 32, 32) float images through
unchanged (no resize, crop, rescale or normalisation; patch size 4, 64 image tokens).

Only ``tokenizers``, ``safetensors`` and the task data are imported: this runs under the vLLM
environment's transformers (< 5.20) as well as the main one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from csp_compile.data.lookup import IMAGE_SIZE, PATCH_SIZE, VOCAB, token_name

__all__ = ["IMAGE_TOKEN", "prepare_model_dir", "rename_vision_keys"]

IMAGE_TOKEN = token_name(VOCAB.image)  # "<img>"
_VISION = "vision_tower."


def rename_vision_keys(names: list[str]) -> dict[str, str]:
    """Old name -> vLLM name for every tensor name: ``vision_tower.X`` becomes
    ``vision_tower.vision_model.X`` unless it already has that level; other names are unchanged."""
    renamed = {}
    for name in names:
        if name.startswith(_VISION) and not name.startswith(_VISION + "vision_model."):
            renamed[name] = _VISION + "vision_model." + name[len(_VISION):]
        else:
            renamed[name] = name
    return renamed


def _tokenizer_json() -> dict:
    vocab = {token_name(i): i for i in range(VOCAB.size)}
    if len(vocab) != VOCAB.size:
        raise AssertionError("token names of the task vocabulary are not unique")
    special = [VOCAB.pad, VOCAB.bos, VOCAB.eos, VOCAB.image]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": token_name(i), "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in special],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": token_name(VOCAB.pad)},
    }


def _side_files() -> dict[str, dict]:
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token_name(VOCAB.bos),
        "eos_token": token_name(VOCAB.eos), "pad_token": token_name(VOCAB.pad), "unk_token": token_name(VOCAB.pad),
        "image_token": IMAGE_TOKEN, "extra_special_tokens": {"image_token": IMAGE_TOKEN},
        "model_max_length": 1 << 20, "add_bos_token": False, "add_eos_token": False,
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
    return {"tokenizer.json": _tokenizer_json(), "tokenizer_config.json": tokenizer_config,
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

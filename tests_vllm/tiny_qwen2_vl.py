"""A vLLM-loadable directory for a tiny random-weight Qwen2-VL (M-RoPE, image-token count set by the image size).

``prepare_qwen2_vl_dir(target)`` writes, with no hub access:

- ``config.json`` and ``model.safetensors``: ``csp_compile.tiny_vlms.build_tiny_vlm("qwen2_vl")``
  with hidden size 128 (2 layers, 4 query heads over 2 KV heads, head_dim 32: vLLM's CPU attention
  kernel refuses the family's default head_dim 16; M-RoPE sections [4, 6, 6]; a 2-block
  vision tower with patch size 2 and 2 x 2 merge, so one image token per 4 x 4 pixels), built by
  whichever transformers runs this (the vLLM environment's 5.19 or the main one's). Its
  ``state_dict`` names (``model.language_model.*``, ``model.visual.*``, ``lm_head.*``) are the ones
  vLLM 0.32's ``Qwen2VLForConditionalGeneration.hf_to_vllm_mapper`` maps.
- ``tokenizer.json`` (``tokenizers`` WordLevel, written as JSON): ids 0-3 ``<pad> <s> </s> <unk>``,
  text ids ``w<id>``, and Qwen2-VL's special tokens at the config's ids (``<|image_pad|>``,
  ``<|video_pad|>``, ``<|vision_start|>``, ``<|vision_end|>``, then ``<|vision_pad|>``,
  ``<|im_start|>``, ``<|im_end|>`` below them).
- ``preprocessor_config.json`` / ``video_preprocessor_config.json``: Qwen2-VL's image and video
  processors with ``min_pixels`` / ``max_pixels`` small (default 64 .. 1024 pixels: 4 to 64 image
  tokens; ``smart_resize`` rounds each side to a multiple of 4 first).

Prompts are token ids: ``... <|vision_start|> <|image_pad|> <|vision_end|> ...`` with one image;
vLLM expands the one ``<|image_pad|>`` to ``image_tokens(height, width)`` tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

from safetensors.torch import save_file

from tiny_dir_files import token_names, tokenizer_files, write_files

__all__ = ["MAX_PIXELS", "MIN_PIXELS", "SPECIAL_TOKENS", "TEXT_DEFAULTS", "image_tokens", "prepare_qwen2_vl_dir"]

MIN_PIXELS, MAX_PIXELS = 64, 1024
# token name -> config attribute holding its id (None: the next free reserved id below them)
SPECIAL_TOKENS = {"<|image_pad|>": "image_token_id", "<|video_pad|>": "video_token_id",
                  "<|vision_start|>": "vision_start_token_id", "<|vision_end|>": "vision_end_token_id",
                  "<|vision_pad|>": None, "<|im_start|>": None, "<|im_end|>": None}
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
_PATCH, _MERGE, _TEMPORAL = 2, 2, 2  # the tiny family's vision tower (csp_compile.tiny_vlms)
# vLLM's CPU attention kernel supports head_dim 32 and up ("Unsupported CPU attention configuration: head_dim=16")
TEXT_DEFAULTS = {"hidden_size": 128, "intermediate_size": 256}


def image_tokens(height: int, width: int, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS) -> int:
    """Image tokens of a ``height`` x ``width`` image: Qwen2-VL's ``smart_resize`` (each side rounded to a
    multiple of patch x merge = 4, the area then scaled into [min_pixels, max_pixels]), one token per 4 x 4."""
    factor = _PATCH * _MERGE
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)


def _side_files(config, min_pixels: int, max_pixels: int) -> dict[str, dict]:  # noqa: ANN001 (a Qwen2VLConfig)
    names = token_names(config.get_text_config().vocab_size,
                        {name: getattr(config, attr) if attr else None for name, attr in SPECIAL_TOKENS.items()})
    vision = {
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD,
        "min_pixels": min_pixels, "max_pixels": max_pixels,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
        "patch_size": _PATCH, "temporal_patch_size": _TEMPORAL, "merge_size": _MERGE,
        "processor_class": "Qwen2VLProcessor",
    }
    return {
        **tokenizer_files(names, {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}),
        "preprocessor_config.json": {"image_processor_type": "Qwen2VLImageProcessor", **vision},
        "video_preprocessor_config.json": {"video_processor_type": "Qwen2VLVideoProcessor", **vision},
    }


def prepare_qwen2_vl_dir(target: str | Path, *, seed: int = 0, min_pixels: int = MIN_PIXELS,
                         max_pixels: int = MAX_PIXELS, **text_overrides) -> Path:
    """Write the tiny Qwen2-VL (seeded random weights, float32) into ``target`` (created; files
    overwritten) and return it. ``text_overrides`` update the language model's config as in
    ``build_tiny_vlm``, after ``TEXT_DEFAULTS``."""
    from csp_compile.tiny_vlms import build_tiny_vlm

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    model = build_tiny_vlm("qwen2_vl", seed=seed, **{**TEXT_DEFAULTS, **text_overrides})
    config = model.config
    vision = config.vision_config
    if (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) != (_PATCH, _MERGE, _TEMPORAL):
        raise AssertionError("the tiny qwen2_vl family's vision tower changed: update tiny_qwen2_vl's processor sizes")
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    config.save_pretrained(target)
    tensors = {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    write_files(target, _side_files(config, min_pixels, max_pixels))
    return target

"""A vLLM-loadable directory for a tiny random-weight LLaVA-NeXT (any-resolution tiles, image-newline features).

``prepare_llava_next_dir(target)`` writes, with no hub access:

- ``config.json`` and ``model.safetensors``: a ``LlavaNextForConditionalGeneration`` with seeded
  random weights (float32) built by whichever transformers runs this: Llama language model (hidden
  128, 2 layers, 4 query heads over 2 KV heads, head_dim 32: vLLM's CPU attention kernel refuses
  head_dim 16; vocabulary 512, ``<image>`` = 511) and a 2-layer CLIP tower over 16 x 16 tiles with
  patch size 4 (4 x 4 = 16 features per tile; the "default" strategy drops CLS), grid pinpoints
  ``PINPOINTS`` (1 x 2, 2 x 1, 2 x 2, 1 x 3, 3 x 1 and 3 x 3 tiles). Tensor names are the ones vLLM
  0.32's ``LlavaNextForConditionalGeneration.hf_to_vllm_mapper`` maps, with the CLIP tower as
  ``model.vision_tower.vision_model.*`` (transformers >= 5.24 drops the ``vision_model`` level:
  put back here, as ``csp_compile.vllm.model_dir`` does for the shipped Llava).
- ``tokenizer.json`` (``tokenizers`` WordLevel, written as JSON): ids 0-3 ``<pad> <s> </s> <unk>``,
  text ids ``w<id>``, ``<image>`` at the config's image token id.
- ``preprocessor_config.json`` / ``processor_config.json``: LLaVA-NeXT's image processor (shortest
  edge and crop 16, CLIP mean / std, the pinpoints) and processor (patch size 4, one CLS token).

Prompts are token ids with one ``<image>``; vLLM expands it to ``image_tokens(height, width)``
tokens: the base tile's 16 features, then the unpadded tile grid row by row, each row followed by
one image-newline feature.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from csp_compile.vllm.model_dir import rename_vision_keys
from tiny_dir_files import token_names, tokenizer_files, write_files

__all__ = ["IMAGE_TOKEN", "PATCH", "PINPOINTS", "TILE", "best_pinpoint", "image_tokens", "prepare_llava_next_dir",
           "unpadded_grid"]

TILE, PATCH = 16, 4  # the CLIP tower's image size and patch size: 4 x 4 features per tile
PINPOINTS = [[16, 32], [32, 16], [32, 32], [16, 48], [48, 16], [48, 48]]  # (height, width) of the tile grids
VOCAB = 512
IMAGE_TOKEN = "<image>"
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TEXT = dict(model_type="llama", vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, image_size=TILE, patch_size=PATCH, projection_dim=32)


def best_pinpoint(height: int, width: int) -> tuple[int, int]:
    """LLaVA-NeXT's ``select_best_resolution``, written out: the pinpoint with the most effective
    pixels of the image scaled into it (aspect kept, capped at the original's pixels), ties to the
    least wasted area."""
    best, best_key = None, None
    for pin_h, pin_w in PINPOINTS:
        scale = min(pin_w / width, pin_h / height)
        scaled_w, scaled_h = int(width * scale), int(height * scale)
        effective = min(scaled_w * scaled_h, width * height)
        key = (effective, -(pin_w * pin_h - effective))
        if best_key is None or key > best_key:
            best, best_key = (pin_h, pin_w), key
    return best


def unpadded_grid(height: int, width: int) -> tuple[int, int]:
    """(rows, columns) of features of a ``height`` x ``width`` image's tile grid: the best pinpoint's
    tiles, 4 features per tile side, with the rows or columns of padding removed (aspect kept)."""
    side = TILE // PATCH
    pin_h, pin_w = best_pinpoint(height, width)
    rows, cols = side * (pin_h // TILE), side * (pin_w // TILE)
    if width / height > cols / rows:
        rows -= 2 * ((rows - int(round(height * (cols / width), 7))) // 2)
    else:
        cols -= 2 * ((cols - int(round(width * (rows / height), 7))) // 2)
    return rows, cols


def image_tokens(height: int, width: int) -> int:
    """Image tokens of a ``height`` x ``width`` image: 16 base-tile features, then the unpadded tile
    grid row by row, each row followed by one image-newline feature."""
    rows, cols = unpadded_grid(height, width)
    return (TILE // PATCH) ** 2 + rows * (cols + 1)


def _config():  # noqa: ANN202 (a LlavaNextConfig)
    import transformers

    return transformers.LlavaNextConfig(
        text_config=TEXT, vision_config=VISION, image_token_index=VOCAB - 1, image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default", vision_feature_layer=-2, architectures=[
            "LlavaNextForConditionalGeneration"])


def _side_files(image_id: int) -> dict[str, dict]:
    image_processor = {
        "image_processor_type": "LlavaNextImageProcessor", "processor_class": "LlavaNextProcessor",
        "do_resize": True, "size": {"shortest_edge": TILE}, "resample": 3, "do_center_crop": True,
        "crop_size": {"height": TILE, "width": TILE}, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": _CLIP_MEAN, "image_std": _CLIP_STD, "do_pad": True,
        "do_convert_rgb": True, "image_grid_pinpoints": PINPOINTS,
    }
    processor = {"processor_class": "LlavaNextProcessor", "patch_size": PATCH, "image_token": IMAGE_TOKEN,
                 "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    return {
        **tokenizer_files(token_names(VOCAB, {IMAGE_TOKEN: image_id}), {"image_token": IMAGE_TOKEN}),
        "preprocessor_config.json": image_processor, "processor_config.json": processor,
    }


def prepare_llava_next_dir(target: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny LLaVA-NeXT (seeded random weights, float32) into ``target`` (created; files
    overwritten) and return it."""
    import transformers

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    config = _config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlavaNextForConditionalGeneration._from_config(config, dtype=torch.float32)
        with torch.no_grad():  # no matrix (nor the image-newline feature) left at zero, as tiny_vlms does
            for name, param in model.named_parameters():
                if (param.dim() >= 2 or name.endswith("image_newline")) and not param.any():
                    param.normal_(0.0, config.text_config.initializer_range)
    config.save_pretrained(target)
    state = model.state_dict()  # saved with the CLIP tower's vision_model level, which vLLM maps
    names = rename_vision_keys(list(state), tower="model.vision_tower.")
    save_file({names[k]: v.detach().clone().contiguous() for k, v in state.items()}, str(target / "model.safetensors"),
              metadata={"format": "pt"})
    write_files(target, _side_files(config.image_token_id))
    return target

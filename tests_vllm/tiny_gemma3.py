"""A vLLM-loadable directory for a tiny random-weight Gemma3 VLM (sliding-window and full-attention layers).

``prepare_gemma3_dir(target)`` writes, with no hub access:

- ``config.json`` and ``model.safetensors``: ``csp_compile.tiny_vlms.build_tiny_vlm("gemma3")`` with
  hidden size 128 and 4 layers (4 query heads over 2 KV heads, head_dim 32: vLLM's CPU attention
  kernel refuses the family's default head_dim 16), ``sliding_window`` 16 and the family's
  ``sliding_window_pattern`` 2, so the layers are sliding, full, sliding, full (``LAYER_TYPES``);
  a SigLIP tower on 32 x 32 images, pooled to ``IMAGE_TOKENS`` (16) tokens. Its ``state_dict``
  names (``model.language_model.*``, ``model.vision_tower.*``, ``model.multi_modal_projector.*``)
  map with vLLM 0.32's ``Gemma3ForConditionalGeneration.hf_to_vllm_mapper``, once the SigLIP tower's
  ``model.vision_tower.X`` is written as ``model.vision_tower.vision_model.X`` (vLLM's SigLIP level).
- ``tokenizer.json`` (``tokenizers`` WordLevel, written as JSON): ids 0-3 ``<pad> <s> </s> <unk>``,
  text ids ``w<id>``, ``<image_soft_token>``, ``<start_of_image>``, ``<end_of_image>`` at the config's
  ids and the newline runs ``\\n`` .. ``\\n\\n\\n\\n`` (vLLM's Gemma3 processor looks all four up) below them.
- ``preprocessor_config.json`` / ``processor_config.json``: Gemma3's image processor (32 x 32, no
  pan-and-scan) and processor (``image_seq_length`` 16).

Prompts are token ids with one ``<start_of_image>`` per image; vLLM replaces it with
``\\n\\n <start_of_image> <image_soft_token> x 16 <end_of_image> \\n\\n`` (20 tokens).
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from csp_compile.vllm.model_dir import rename_vision_keys
from tiny_dir_files import token_names, tokenizer_files, write_files

__all__ = ["IMAGE_SIZE", "IMAGE_TOKENS", "LAYER_TYPES", "SLIDING_WINDOW", "TEXT_DEFAULTS", "prepare_gemma3_dir"]

IMAGE_SIZE, IMAGE_TOKENS = 32, 16  # the tiny gemma3 family's SigLIP input and pooled token count
SLIDING_WINDOW = 16
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
# vLLM's CPU attention kernel supports head_dim 32 and up ("Unsupported CPU attention configuration: head_dim=16")
TEXT_DEFAULTS = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": len(LAYER_TYPES),
                 "sliding_window": SLIDING_WINDOW}
SPECIAL_TOKENS = {"<image_soft_token>": "image_token_index", "<start_of_image>": "boi_token_index",
                  "<end_of_image>": "eoi_token_index", "\n": None, "\n\n": None, "\n\n\n": None, "\n\n\n\n": None}
_VISION = "model.vision_tower."


def _side_files(config) -> dict[str, dict]:  # noqa: ANN001 (a Gemma3Config)
    names = token_names(config.get_text_config().vocab_size,
                        {name: getattr(config, attr) if attr else None for name, attr in SPECIAL_TOKENS.items()})
    named = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    image_processor = {
        "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
        "do_resize": True, "size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "resample": 2,
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
        "do_pan_and_scan": False, "pan_and_scan_min_crop_size": 256, "pan_and_scan_max_num_crops": 4,
        "pan_and_scan_min_ratio_to_activate": 1.2,
    }
    return {
        **tokenizer_files(names, named), "preprocessor_config.json": image_processor,
        "processor_config.json": {"processor_class": "Gemma3Processor", "image_seq_length": IMAGE_TOKENS},
    }


def prepare_gemma3_dir(target: str | Path, *, seed: int = 0, **text_overrides) -> Path:
    """Write the tiny Gemma3 (seeded random weights, float32) into ``target`` (created; files
    overwritten) and return it. ``text_overrides`` update the language model's config as in
    ``build_tiny_vlm``, after ``TEXT_DEFAULTS``."""
    from csp_compile.tiny_vlms import build_tiny_vlm

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    model = build_tiny_vlm("gemma3", seed=seed, **{**TEXT_DEFAULTS, **text_overrides})
    config = model.config
    if (config.vision_config.image_size, config.mm_tokens_per_image) != (IMAGE_SIZE, IMAGE_TOKENS):
        raise AssertionError("the tiny gemma3 family's vision tower changed: update tiny_gemma3's processor sizes")
    config.architectures = ["Gemma3ForConditionalGeneration"]
    config.save_pretrained(target)
    state = model.state_dict()
    names = rename_vision_keys(list(state), tower=_VISION)
    save_file({names[k]: v.detach().clone().contiguous() for k, v in state.items()}, str(target / "model.safetensors"),
              metadata={"format": "pt"})
    write_files(target, _side_files(config))
    return target

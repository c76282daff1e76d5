"""Tiny random-weight vision-language models for tests, examples and benchmarks.

Every family is built from a config (no hub access needed) with a small but real language model
(GQA, RoPE, the family's own attention and mask code) and a tiny vision tower. `make_inputs`
lays out a prompt the way the family's processor would: image placeholder tokens expanded to the
exact feature count, wrapper tokens, type ids, pixel tensors and optional left padding.

Token ids: 0 = pad, 1 = bos, 2 = eos; the top `RESERVED_TOP` ids of the vocabulary hold the
family's special tokens (image = vocab - 1, video = vocab - 2, then wrappers); random text tokens
are drawn from the ids in between.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import transformers
from transformers import PreTrainedConfig, PreTrainedModel

__all__ = ["BOS", "EOS", "FAMILIES", "FIRST_TEXT_ID", "PAD", "RESERVED_TOP", "build_tiny_vlm", "family_of", "make_inputs"]

PAD, BOS, EOS = 0, 1, 2
FIRST_TEXT_ID = 4
RESERVED_TOP = 16

_TEXT_DEFAULTS: dict = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    pad_token_id=PAD,
    bos_token_id=BOS,
    eos_token_id=EOS,
)
_VISION_DEFAULTS: dict = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def _top_id(vocab_size: int, k: int) -> int:
    """The k-th reserved special id (k = 1 is the last id of the vocabulary)."""
    return vocab_size - k


def _image_id(vocab_size: int) -> int:
    return _top_id(vocab_size, 1)


def _video_id(vocab_size: int) -> int:
    return _top_id(vocab_size, 2)


def _open_id(vocab_size: int) -> int:
    """vision_start / boi / <fake_token_around_image>."""
    return _top_id(vocab_size, 3)


def _close_id(vocab_size: int) -> int:
    """vision_end / eoi / <global-img>."""
    return _top_id(vocab_size, 4)


def _grid_id(vocab_size: int, row: int, col: int) -> int:
    """SmolVLM's <row_r_col_c> tag for crop (row, col), both 0-based, in a 2 x 2 grid."""
    return _top_id(vocab_size, 5 + 2 * row + col)


def _newline_id(vocab_size: int) -> int:
    return _top_id(vocab_size, 9)


def _text_kwargs(overrides: dict) -> dict:
    kw = {**_TEXT_DEFAULTS, **overrides}
    kw.setdefault("head_dim", kw["hidden_size"] // kw["num_attention_heads"])
    return kw


# --------------------------------------------------------------------------------------------
# Configs, one function per family: text kwargs -> full config.
# --------------------------------------------------------------------------------------------

_LLAVA_IMAGE, _PATCH = 16, 4  # 4 x 4 patches
_ANYRES_IMAGE, _ANYRES_SCALE = 8, 2  # 2 x 2 patches per tile, a 2 x 2 tile grid + the base image
_QWEN_PATCH, _QWEN_GRID = 2, (1, 8, 8)  # (t, h, w) patches; 2 x 2 merge -> 16 tokens
_GEMMA3_IMAGE, _GEMMA3_TOKENS = 32, 16  # 8 x 8 patches pooled to 4 x 4
_IDEFICS_IMAGE, _IDEFICS_SCALE = 32, 2  # 8 x 8 patches, pixel-shuffled to 16 tokens
_SMOLVLM_IMAGE = 16  # 4 x 4 patches -> 4 tokens per crop; 2 x 2 crops + the global image


def _clip(image_size: int) -> dict:
    return dict(_VISION_DEFAULTS, model_type="clip_vision_model", image_size=image_size, patch_size=_PATCH,
                projection_dim=32)


def _siglip(image_size: int) -> dict:
    return dict(_VISION_DEFAULTS, model_type="siglip_vision_model", image_size=image_size, patch_size=_PATCH,
                vision_use_head=False)


def _llava_config(text: dict) -> PreTrainedConfig:
    kw = _text_kwargs(text)
    return transformers.LlavaConfig(
        text_config=dict(kw, model_type="llama"), vision_config=_clip(_LLAVA_IMAGE),
        image_token_index=_image_id(kw["vocab_size"]), image_seq_length=(_LLAVA_IMAGE // _PATCH) ** 2,
    )


def _llava_next_config(text: dict) -> PreTrainedConfig:
    kw = _text_kwargs(text)
    side = _ANYRES_IMAGE * _ANYRES_SCALE
    return transformers.LlavaNextConfig(
        text_config=dict(kw, model_type="llama"), vision_config=_clip(_ANYRES_IMAGE),
        image_token_index=_image_id(kw["vocab_size"]), image_grid_pinpoints=[[side, side]],
    )


def _llava_onevision_config(text: dict) -> PreTrainedConfig:
    kw = _text_kwargs(text)
    side = _ANYRES_IMAGE * _ANYRES_SCALE
    return transformers.LlavaOnevisionConfig(
        text_config=dict(kw, model_type="qwen2"), vision_config=_siglip(_ANYRES_IMAGE),
        image_token_index=_image_id(kw["vocab_size"]), video_token_index=_video_id(kw["vocab_size"]),
        image_grid_pinpoints=[[side, side]],
    )


def _mrope(kw: dict) -> dict:
    """M-RoPE sections (temporal, height, width) summing to head_dim / 2, in Qwen's 2:3:3 ratio."""
    half = kw["head_dim"] // 2
    t = half // 4
    h = (half - t) // 2
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [t, h, half - t - h]}


def _qwen_ids(vocab_size: int) -> dict:
    return dict(image_token_id=_image_id(vocab_size), video_token_id=_video_id(vocab_size),
                vision_start_token_id=_open_id(vocab_size), vision_end_token_id=_close_id(vocab_size))


def _qwen2_vl_config(text: dict) -> PreTrainedConfig:
    kw = _text_kwargs(text)
    vision = dict(depth=2, embed_dim=32, hidden_size=kw["hidden_size"], mlp_ratio=2, num_heads=2,
                  patch_size=_QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2)
    return transformers.Qwen2VLConfig(
        text_config=dict(kw, rope_parameters=_mrope(kw)), vision_config=vision, **_qwen_ids(kw["vocab_size"])
    )


def _qwen2_5_vl_config(text: dict) -> PreTrainedConfig:
    kw = _text_kwargs(text)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=kw["hidden_size"],
                  patch_size=_QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=4 * _QWEN_PATCH, fullatt_block_indexes=[1])
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(kw, rope_parameters=_mrope(kw)), vision_config=vision, **_qwen_ids(kw["vocab_size"])
    )


def _qwen3_vl_config(text: dict) -> PreTrainedConfig:
    kw = _text_kwargs(text)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=kw["hidden_size"],
                  patch_size=_QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    rope = dict(_mrope(kw), mrope_interleaved=True)
    return transformers.Qwen3VLConfig(
        text_config=dict(kw, rope_parameters=rope), vision_config=vision, **_qwen_ids(kw["vocab_size"])
    )


def _gemma3_config(text: dict) -> PreTrainedConfig:
    # 3 layers with sliding_window_pattern 2: sliding, full, sliding. A 16-token window is shorter
    # than the default prompt, so the sliding layers really slide.
    kw = _text_kwargs({"num_hidden_layers": 3, "sliding_window": 16, **text})
    kw.setdefault("query_pre_attn_scalar", kw["head_dim"])
    vocab = kw["vocab_size"]
    return transformers.Gemma3Config(
        text_config=dict(kw, sliding_window_pattern=2), vision_config=_siglip(_GEMMA3_IMAGE),
        mm_tokens_per_image=_GEMMA3_TOKENS, image_token_index=_image_id(vocab),
        boi_token_index=_open_id(vocab), eoi_token_index=_close_id(vocab),
    )


def _paligemma_config(text: dict) -> PreTrainedConfig:
    kw = _text_kwargs(text)
    return transformers.PaliGemmaConfig(
        text_config=dict(kw, model_type="gemma"), vision_config=_siglip(_LLAVA_IMAGE),
        image_token_index=_image_id(kw["vocab_size"]), vocab_size=kw["vocab_size"],
        projection_dim=kw["hidden_size"], hidden_size=kw["hidden_size"],
    )


def _idefics_config(config_cls: type, image_size: int) -> Callable[[dict], PreTrainedConfig]:
    def build(text: dict) -> PreTrainedConfig:
        kw = _text_kwargs(text)
        vision = dict(_VISION_DEFAULTS, image_size=image_size, patch_size=_PATCH)
        return config_cls(text_config=dict(kw, model_type="llama"), vision_config=vision,
                          image_token_id=_image_id(kw["vocab_size"]), scale_factor=_IDEFICS_SCALE,
                          pad_token_id=PAD)
    return build


# --------------------------------------------------------------------------------------------
# Image layout, one function per family: config -> (token ids of one image, pixel inputs).
# --------------------------------------------------------------------------------------------

def _pixels(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen)


def _square_image(cfg: PreTrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], dict]:
    # Llava ("default" feature strategy drops CLS) and PaliGemma: one feature per patch.
    n = (_LLAVA_IMAGE // _PATCH) ** 2
    return [cfg.image_token_id] * n, {"pixel_values": _pixels(gen, batch, 3, _LLAVA_IMAGE, _LLAVA_IMAGE)}


def _anyres_image(cfg: PreTrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], dict]:
    # An image exactly the size of the one grid pinpoint: base tile p*p features, then the
    # (s*p) x (s*p) tile grid with one newline feature per row (no unpadding, no downscaling).
    p, s = _ANYRES_IMAGE // _PATCH, _ANYRES_SCALE
    n = p * p + (s * p) ** 2 + s * p
    side = _ANYRES_IMAGE * s
    return [cfg.image_token_id] * n, {
        "pixel_values": _pixels(gen, batch, 1 + s * s, 3, _ANYRES_IMAGE, _ANYRES_IMAGE),
        "image_sizes": torch.tensor([[side, side]] * batch),
    }


def _qwen_image(cfg: PreTrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], dict]:
    vc = cfg.vision_config
    t, h, w = _QWEN_GRID
    n = t * h * w // vc.spatial_merge_size**2
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    span = [cfg.vision_start_token_id] + [cfg.image_token_id] * n + [cfg.vision_end_token_id]
    return span, {
        "pixel_values": _pixels(gen, batch * t * h * w, patch_dim),
        "image_grid_thw": torch.tensor([_QWEN_GRID] * batch),
    }


def _gemma3_image(cfg: PreTrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], dict]:
    span = [cfg.boi_token_id] + [cfg.image_token_id] * cfg.mm_tokens_per_image + [cfg.eoi_token_id]
    return span, {"pixel_values": _pixels(gen, batch, 3, _GEMMA3_IMAGE, _GEMMA3_IMAGE)}


def _idefics_tokens_per_image(cfg: PreTrainedConfig) -> int:
    vc = cfg.vision_config
    return (vc.image_size // vc.patch_size) ** 2 // cfg.scale_factor**2


def _idefics3_image(cfg: PreTrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], dict]:
    # One image, no splitting: <fake><global-img><image>*n<fake>.
    vocab, size = cfg.text_config.vocab_size, cfg.vision_config.image_size
    span = [_open_id(vocab), _close_id(vocab)] + [cfg.image_token_id] * _idefics_tokens_per_image(cfg)
    return span + [_open_id(vocab)], {
        "pixel_values": _pixels(gen, batch, 1, 3, size, size),
        "pixel_attention_mask": torch.ones(batch, 1, size, size, dtype=torch.bool),
    }


def _smolvlm_image(cfg: PreTrainedConfig, batch: int, gen: torch.Generator) -> tuple[list[int], dict]:
    # A 2 x 2 split plus the global image, as SmolVLM's processor lays it out:
    # (<fake><row_r_col_c><image>*n) per crop, "\n" per row, then "\n<fake><global-img><image>*n<fake>".
    vocab, size = cfg.text_config.vocab_size, cfg.vision_config.image_size
    image = [cfg.image_token_id] * _idefics_tokens_per_image(cfg)
    span: list[int] = []
    for row in range(2):
        for col in range(2):
            span += [_open_id(vocab), _grid_id(vocab, row, col)] + image
        span.append(_newline_id(vocab))
    span += [_newline_id(vocab), _open_id(vocab), _close_id(vocab)] + image + [_open_id(vocab)]
    return span, {
        "pixel_values": _pixels(gen, batch, 5, 3, size, size),
        "pixel_attention_mask": torch.ones(batch, 5, size, size, dtype=torch.bool),
    }


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Family:
    model_cls: str  # attribute of `transformers`
    config: Callable[[dict], PreTrainedConfig]
    image: Callable[[PreTrainedConfig, int, torch.Generator], tuple[list[int], dict]]
    type_ids: str | None = None  # "token_type_ids" / "mm_token_type_ids": image placeholders = 1
    prefix_lm: bool = False  # PaliGemma: image, bos, then the text; token_type_ids 0 (= prefix)


_FAMILIES: dict[str, _Family] = {
    "llava": _Family("LlavaForConditionalGeneration", _llava_config, _square_image),
    "llava_next": _Family("LlavaNextForConditionalGeneration", _llava_next_config, _anyres_image),
    "qwen2_vl": _Family("Qwen2VLForConditionalGeneration", _qwen2_vl_config, _qwen_image, "mm_token_type_ids"),
    "qwen2_5_vl": _Family("Qwen2_5_VLForConditionalGeneration", _qwen2_5_vl_config, _qwen_image,
                          "mm_token_type_ids"),
    "gemma3": _Family("Gemma3ForConditionalGeneration", _gemma3_config, _gemma3_image, "token_type_ids"),
    "paligemma": _Family("PaliGemmaForConditionalGeneration", _paligemma_config, _square_image,
                         "token_type_ids", prefix_lm=True),
    "idefics3": _Family("Idefics3ForConditionalGeneration",
                        _idefics_config(transformers.Idefics3Config, _IDEFICS_IMAGE), _idefics3_image),
    "smolvlm": _Family("SmolVLMForConditionalGeneration",
                       _idefics_config(transformers.SmolVLMConfig, _SMOLVLM_IMAGE), _smolvlm_image),
    "llava_onevision": _Family("LlavaOnevisionForConditionalGeneration", _llava_onevision_config, _anyres_image),
    "qwen3_vl": _Family("Qwen3VLForConditionalGeneration", _qwen3_vl_config, _qwen_image, "mm_token_type_ids"),
}

FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def _family(name: str) -> _Family:
    try:
        return _FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown VLM family {name!r}; known: {', '.join(FAMILIES)}") from None


def build_tiny_vlm(
    family: str,
    *,
    attn_implementation: str = "sdpa",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **text_overrides,
) -> PreTrainedModel:
    """The family's `*ForConditionalGeneration` with seeded random weights, in eval mode.

    `text_overrides` update the language model's config (e.g. `num_key_value_heads=1`).
    The caller's global RNG state is left untouched.
    """
    fam = _family(family)
    config = fam.config(text_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, fam.model_cls)._from_config(
            config, attn_implementation=attn_implementation, dtype=dtype
        )
        # Gemma3 zero-initialises its image projection, which would make every image look alike.
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2 and not param.any():
                    param.normal_(0.0, config.get_text_config().initializer_range)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = PAD, BOS, EOS
    return model.eval()


def family_of(model: PreTrainedModel) -> str:
    """The family name `model` was built for (by its config's model_type)."""
    model_type = model.config.model_type
    if model_type not in _FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not a tiny-VLM family; known: {', '.join(FAMILIES)}")
    return model_type


def make_inputs(
    model: PreTrainedModel,
    *,
    batch: int = 1,
    text_len: int = 24,
    pad_left: Sequence[int] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Inputs for `model(**inputs)` / `model.generate(**inputs)`: one image per sequence.

    Every row has the same length: `text_len` text positions plus the image span. Row i spends its
    first `pad_left[i]` text positions on left padding (attention_mask 0); the rest is random text
    split around the image (PaliGemma: image, bos, text, as its processor does).
    """
    fam = _family(family_of(model))
    cfg = model.config
    pad_left = list(pad_left) if pad_left is not None else [0] * batch
    if len(pad_left) != batch:
        raise ValueError(f"pad_left has {len(pad_left)} entries for batch {batch}")
    if min(text_len - p for p in pad_left) < 3:
        raise ValueError(f"text_len={text_len} leaves fewer than 3 text tokens after padding {pad_left}")

    gen = torch.Generator().manual_seed(seed)
    span, pixels = fam.image(cfg, batch, gen)
    vocab = cfg.get_text_config().vocab_size
    rows = []
    for pad in pad_left:
        n_text = text_len - pad
        text = torch.randint(FIRST_TEXT_ID, vocab - RESERVED_TOP, (n_text,), generator=gen).tolist()
        if fam.prefix_lm:
            body = span + [BOS] + text[1:]
        else:
            cut = max(1, n_text // 3)
            body = text[:cut] + span + text[cut:]
        rows.append([PAD] * pad + body)

    input_ids = torch.tensor(rows)
    attention_mask = torch.ones_like(input_ids)
    for i, pad in enumerate(pad_left):
        attention_mask[i, :pad] = 0
    pixels = {k: v.to(model.dtype) if v.is_floating_point() else v for k, v in pixels.items()}
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **pixels}
    if fam.type_ids is not None:
        # Gemma3 / Qwen2-VL: 1 on image placeholders. PaliGemma: 0 on the whole prompt (the prefix).
        is_image = input_ids == cfg.image_token_id
        inputs[fam.type_ids] = torch.zeros_like(input_ids) if fam.prefix_lm else is_image.long()
    return inputs


"""Per-token modality ids (docs/design.md §2): 0 = text, 1 = image, 2 = video, 3+ reserved.

A `ModalitySpec` says how one model family marks modalities: which config attributes hold its
image / video placeholder token ids and which type-id input (if any) carries per-token modality.
Specs are registered by `config.model_type`; unknown families fall back to `DEFAULT_SPEC`, which
reads the usual attribute names.

Decision: only the placeholder tokens that the vision features replace count as image (or
video). Wrapper tokens (Qwen2-VL's vision_start / vision_end, Gemma3's boi / eoi, Idefics3's
<fake_token_around_image>) are ordinary text embeddings, get text positions in M-RoPE and type
id 0 from Qwen2-VL's and Gemma3's processors, so they are text. A family that wants them as
image lists their config attributes in `extra_image_token_attrs`.

Source of truth: `input_ids` compared against the config's ids when both exist (exact, works for
every padding layout); otherwise the family's type-id input; otherwise `ModalityUnavailableError`.
A text-only causal LM (no vision config, no image or video token id) has every token text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedConfig

if TYPE_CHECKING:
    from csp_compile.config import CSPConfig

TEXT, IMAGE, VIDEO = 0, 1, 2


class ModalityUnavailableError(ValueError):
    """Raised when the inputs or the config cannot tell text tokens from image tokens."""


@dataclass(frozen=True)
class ModalitySpec:
    """How one model family marks modalities.

    image_token_attrs / video_token_attrs: config attributes holding placeholder token ids
        (the first one present and not None wins; looked up on the config, then its text config).
    extra_image_token_attrs: config attributes of further ids that count as image (default none).
    type_id_inputs: input names whose values are per-token modality ids (0 text, 1 image,
        2 video, ...), in order of preference. Empty when the family's type ids mean something
        else (PaliGemma's token_type_ids mark prefix vs suffix).
    image_grid: how its image tokens lie (``CSPConfig.image_grid``): "square" when every image (or
        tile) is one run of placeholders filling a row-major square grid, else "run" (pooled 1-D).
    """

    image_token_attrs: tuple[str, ...] = ("image_token_id", "image_token_index")
    video_token_attrs: tuple[str, ...] = ("video_token_id", "video_token_index")
    extra_image_token_attrs: tuple[str, ...] = ()
    type_id_inputs: tuple[str, ...] = ("mm_token_type_ids",)
    image_grid: str = "run"


DEFAULT_SPEC = ModalitySpec()
_REGISTRY: dict[str, ModalitySpec] = {}


def register_modality(model_type: str, spec: ModalitySpec) -> None:
    """Use `spec` for configs whose `model_type` (or text config's model_type) is `model_type`."""
    _REGISTRY[model_type] = spec


# Llava family: placeholder ids; their processors' mm_token_type_ids (when requested) agree. Llava-1.5's
# image is one square run; the anyres families put the base image, its tiles and newline tokens in one run.
register_modality("llava", ModalitySpec(image_grid="square"))
for _name in ("llava_next", "llava_next_video", "llava_onevision"):
    register_modality(_name, DEFAULT_SPEC)
# Idefics3 / SmolVLM: their processors' mm_token_type_ids also mark the wrapper tokens
# (<fake_token_around_image>, <global-img>, <row_i_col_j>) as image, so they are not used. Each tile is a
# square run of placeholders between wrapper tokens.
for _name in ("idefics3", "smolvlm"):
    register_modality(_name, ModalitySpec(type_id_inputs=(), image_grid="square"))
# Qwen2-VL / Qwen2.5-VL: the model itself reads mm_token_type_ids (M-RoPE); vision_start/end are text.
# Their grids are h x w from image_grid_thw (not read here): a non-square grid can have a square count.
register_modality("qwen2_vl", DEFAULT_SPEC)
register_modality("qwen2_5_vl", DEFAULT_SPEC)
# Gemma3: the processor renames mm_token_type_ids to token_type_ids (1 on image tokens, not boi/eoi).
register_modality("gemma3", ModalitySpec(type_id_inputs=("token_type_ids", "mm_token_type_ids"), image_grid="square"))
# PaliGemma: token_type_ids are 0 on the bidirectional prefix (image + prompt), 1 on the suffix.
register_modality("paligemma", ModalitySpec(type_id_inputs=(), image_grid="square"))


def _config_of(config_or_model) -> PreTrainedConfig:
    return config_or_model.config if isinstance(config_or_model, torch.nn.Module) else config_or_model


def _configs(config: PreTrainedConfig) -> list[PreTrainedConfig]:
    text = config.get_text_config()
    return [config] if text is config else [config, text]


def spec_for(config_or_model) -> ModalitySpec:
    """The registered spec for this config's model_type (or its text config's), else `DEFAULT_SPEC`."""
    config = _config_of(config_or_model)
    model_type = config.model_type
    for key in (model_type, model_type.removesuffix("_text"), config.get_text_config().model_type):
        if key in _REGISTRY:
            return _REGISTRY[key]
    return DEFAULT_SPEC


def _first_id(config: PreTrainedConfig, attrs: tuple[str, ...]) -> int | None:
    for cfg in _configs(config):
        for attr in attrs:
            value = getattr(cfg, attr, None)
            if value is not None:
                return int(value)
    return None


def image_token_ids(config_or_model) -> tuple[int, ...]:
    """Token ids that mark image positions: the placeholder id, then any extra ids of the spec."""
    config = _config_of(config_or_model)
    spec = spec_for(config)
    ids = [_first_id(config, spec.image_token_attrs)]
    ids += [_first_id(config, (attr,)) for attr in spec.extra_image_token_attrs]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def is_text_only(config_or_model) -> bool:
    """True for a text-only language model: no vision / audio config and no image or video token id
    on the config (every token is text, CSP spends its whole budget on the self part)."""
    config = _config_of(config_or_model)
    spec = spec_for(config)
    media_configs = ("vision_config", "audio_config", "vision_tower_config")
    if any(getattr(config, name, None) is not None for name in media_configs):
        return False
    media_ids = spec.image_token_attrs + spec.extra_image_token_attrs + spec.video_token_attrs
    return _first_id(config, media_ids) is None


def check_modality_source(config_or_model) -> str:
    """How modality ids will be read for this model, in words; ModalityUnavailableError (at
    ``optimize``, before any prompt) when there is no way to tell modalities apart."""
    config = _config_of(config_or_model)
    if is_text_only(config):
        return "text-only model: every token is text (CSP = n-softmax window scoring, whole budget on the self part)"
    spec = spec_for(config)
    images = image_token_ids(config)
    video = _first_id(config, spec.video_token_attrs)
    if images:
        video_text = "" if video is None else f", video token id {video}"
        return f"image token ids {list(images)}{video_text}, read from input_ids"
    if spec.type_id_inputs:
        return f"per-token type ids from {' or '.join(spec.type_id_inputs)} (the config has no image token id)"
    raise ModalityUnavailableError(
        f"config of model_type {config.model_type!r} has a vision part but no image token id: looked for "
        f"{', '.join(spec.image_token_attrs + spec.extra_image_token_attrs)} on the config and its text config; "
        f"{_type_id_hint(spec)}, or register a ModalitySpec for {config.model_type!r}."
    )


def with_image_grid(config: CSPConfig, config_or_model) -> CSPConfig:
    """``config`` with ``image_grid="auto"`` resolved to the model family's rule (``ModalitySpec.image_grid``)."""
    if config.image_grid != "auto":
        return config
    return config.replace(image_grid=spec_for(_config_of(config_or_model)).image_grid)


def _type_id_hint(spec: ModalitySpec) -> str:
    if spec.type_id_inputs:
        return f"per-token type ids would also do: {' or '.join(spec.type_id_inputs)}"
    return "this family has no type-id input that marks modality"


def modality_ids(
    config_or_model,
    input_ids: torch.LongTensor | None = None,
    *,
    token_type_ids: torch.Tensor | None = None,
    mm_token_type_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.LongTensor:
    """Modality id per token, shape (batch, L), int64; padding (attention_mask == 0) is TEXT; all
    TEXT for a text-only model (``is_text_only``), shaped like ``input_ids`` or ``attention_mask``.

    Raises ModalityUnavailableError when neither `input_ids` with the config's placeholder ids nor a
    type-id input this family reads as modality is available.
    """
    config = _config_of(config_or_model)
    spec = spec_for(config)
    images = image_token_ids(config)
    type_ids = {"token_type_ids": token_type_ids, "mm_token_type_ids": mm_token_type_ids}
    given = [type_ids[name] for name in spec.type_id_inputs if type_ids[name] is not None]

    if is_text_only(config):
        shape_of = input_ids if input_ids is not None else attention_mask
        if shape_of is None:
            raise ModalityUnavailableError("csp: a text-only model's prompt length comes from input_ids or "
                                           "attention_mask: pass one of them with inputs_embeds")
        return torch.zeros_like(torch.atleast_2d(shape_of), dtype=torch.long)
    if input_ids is not None and images:
        modality = torch.zeros_like(input_ids, dtype=torch.long)
        modality[torch.isin(input_ids, torch.tensor(images, device=input_ids.device))] = IMAGE
        video = _first_id(config, spec.video_token_attrs)
        if video is not None:
            modality[input_ids == video] = VIDEO
    elif given:
        modality = given[0].to(torch.long)
    elif not images:
        raise ModalityUnavailableError(
            f"config of model_type {config.model_type!r} has no image token id: looked for "
            f"{', '.join(spec.image_token_attrs + spec.extra_image_token_attrs)} on the config and its "
            f"text config; {_type_id_hint(spec)}, or register a ModalitySpec for {config.model_type!r}."
        )
    else:
        raise ModalityUnavailableError(
            f"cannot tell modalities apart for model_type {config.model_type!r}: need input_ids (image "
            f"placeholder ids {list(images)}); {_type_id_hint(spec)}."
        )

    modality = torch.atleast_2d(modality)
    if attention_mask is not None:
        modality = modality.masked_fill(torch.atleast_2d(attention_mask) == 0, TEXT)
    return modality

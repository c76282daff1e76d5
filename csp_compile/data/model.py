"""The shipped tiny VLM: its architecture (built from config) and loading it from the package."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

from csp_compile.data.lookup import IMAGE_SIZE, IMAGE_TOKENS, PATCH_SIZE, VOCAB

__all__ = ["GRID_MODEL_DIR", "SHIPPED_MODEL_DIR", "build_grid_model", "build_model", "load_model", "load_tokenizer"]

SHIPPED_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_vlm"
GRID_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "grid_vlm"  # the glyph-grid task's model


def build_model(seed: int = 0, vocab=VOCAB) -> transformers.LlavaForConditionalGeneration:
    """The untrained model: Llama 128 hidden, 4 layers, 4 query / 2 KV heads; CLIP 64 hidden, 2 layers.
    ``vocab`` (the lookup task's by default) gives the vocabulary size and the special ids."""
    text = dict(
        model_type="llama", vocab_size=vocab.size, hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=1024, pad_token_id=vocab.pad, bos_token_id=vocab.bos,
        eos_token_id=vocab.eos, tie_word_embeddings=True,
        initializer_range=0.08,  # ~1/sqrt(hidden): with the usual 0.02 attention stays uniform for hundreds of steps
    )
    vision = dict(
        model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64,
    )
    config = transformers.LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=vocab.image, image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = vocab.pad, vocab.bos, vocab.eos
    return model


def build_grid_model(seed: int = 0) -> transformers.LlavaForConditionalGeneration:
    """The glyph-grid task's untrained model: the same architecture over the grid vocabulary
    (same 32 x 32 images, 4-pixel patches, 64 image tokens)."""
    from csp_compile.data import grid

    assert (grid.IMAGE_SIZE, grid.PATCH_SIZE) == (IMAGE_SIZE, PATCH_SIZE)
    return build_model(seed, grid.VOCAB)


_ALLOWED = ("pass smollm2 (after `csp-compile prepare smollm2`) or a local save_pretrained directory of a "
            "vision-language model or a text-only causal LM (config.json and its weights)")


def _one_line(error: BaseException, limit: int = 160) -> str:
    """``Type: message`` on one line, cut to about ``limit`` characters."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[:limit].rstrip() + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_model(path: str | Path | None = None, *, shipped: Path | None = None,
               train_script: str = "examples/train_tiny_vlm.py") -> transformers.PreTrainedModel:
    """A VLM or a text-only causal LM from a local ``save_pretrained`` directory (default: the shipped
    model in ``shipped``, the lookup task's tiny VLM unless told; ``train_script`` trains it), in eval
    mode with SDPA attention; no network. A missing or unloadable directory (no config.json, a corrupt
    or foreign config, missing, corrupt or mismatched weights, neither a VLM nor a text-only causal LM)
    raises FileNotFoundError / ValueError with one line saying which path, what is wrong and what it must hold."""
    directory = Path(path) if path is not None else Path(shipped if shipped is not None else SHIPPED_MODEL_DIR)
    config_file = directory / "config.json"
    if path is None and not config_file.is_file():
        raise FileNotFoundError(
            f"no trained tiny VLM is shipped in {str(directory)!r} yet: train one with "
            f"`python {train_script}` (it saves there) or pass --model DIR"
        )
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist: {_ALLOWED}")
    if not config_file.is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no config.json: {_ALLOWED}")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(config_file)!r} is not valid JSON ({error}): {_ALLOWED}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise ValueError(f"{str(config_file)!r} is not a transformers model config (no \"model_type\"): {_ALLOWED}")
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would bury one-line errors
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # load reports become the one-line errors below
    try:
        try:
            config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
        except Exception as error:  # a foreign file: unknown model_type, wrong field types, ...
            raise ValueError(f"{str(config_file)!r} is not a config transformers can load "
                             f"({_one_line(error)}): {_ALLOWED}") from None
        auto = _auto_class(config, directory)
        try:
            model, info = auto.from_pretrained(directory, config=config, local_files_only=True,
                                               attn_implementation="sdpa", ignore_mismatched_sizes=True,
                                               output_loading_info=True)
        except OSError as error:  # no weights file
            raise FileNotFoundError(f"{str(directory)!r} has no readable weights ({_one_line(error)}): "
                                    f"{_ALLOWED}") from None
        except Exception as error:  # a corrupt or truncated safetensors / bin file
            raise ValueError(f"{str(directory)!r} has corrupt weights ({_one_line(error)}): {_ALLOWED}") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    for kind in ("missing_keys", "mismatched_keys"):
        keys = sorted(str(key[0] if isinstance(key, tuple) else key) for key in info.get(kind) or ())
        if keys:
            what = "lack" if kind == "missing_keys" else "have the wrong shape for"
            raise ValueError(f"the weights in {str(directory)!r} {what} {len(keys)} of the model's tensors "
                             f"(e.g. {keys[0]}): {_ALLOWED}")
    return model.eval()


def _auto_class(config: transformers.PreTrainedConfig, directory: Path) -> type:
    """AutoModelForImageTextToText for a VLM config, AutoModelForCausalLM for a text-only causal LM's;
    a ValueError naming the directory and the config class otherwise."""
    from csp_compile.modality import is_text_only

    if type(config) in transformers.AutoModelForImageTextToText._model_mapping:
        return transformers.AutoModelForImageTextToText
    causal = transformers.AutoModelForCausalLM
    if type(config) in causal._model_mapping and is_text_only(config):
        return causal
    what = ("with an image or video token id but no vision-language model class: not a text-only causal LM"
            if type(config) in causal._model_mapping else "not a vision-language model or a text-only causal LM")
    raise ValueError(f"{str(directory)!r} holds a {type(config).__name__}, {what}: {_ALLOWED}")


def load_tokenizer(directory: str | Path):
    """The tokenizer saved in a text model's directory (local files only); a FileNotFoundError in one
    line naming the directory when it has none."""
    directory = Path(directory)
    needs = ("a text model's directory needs its tokenizer files (tokenizer.json, tokenizer_config.json), as the "
             "tokenizer's save_pretrained writes them")
    if not any((directory / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(f"{str(directory)!r} has no tokenizer: {needs}")
    transformers.utils.logging.disable_progress_bar()
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:  # tokenizer files transformers cannot read
        raise FileNotFoundError(f"{str(directory)!r} has no tokenizer transformers can load ({_one_line(error)}): "
                                f"{needs}") from None
    finally:
        transformers.utils.logging.set_verbosity(verbosity)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

"""The shipped tiny VLM: its architecture (built from config) and loading it from the package."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

from csp_compile.data.lookup import IMAGE_SIZE, IMAGE_TOKENS, PATCH_SIZE, VOCAB

__all__ = ["SHIPPED_MODEL_DIR", "build_model", "load_model"]

SHIPPED_MODEL_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_vlm"


def build_model(seed: int = 0) -> transformers.LlavaForConditionalGeneration:
    """The untrained model: Llama 128 hidden, 4 layers, 4 query / 2 KV heads; CLIP 64 hidden, 2 layers."""
    text = dict(
        model_type="llama", vocab_size=VOCAB.size, hidden_size=128, intermediate_size=256,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=1024, pad_token_id=VOCAB.pad, bos_token_id=VOCAB.bos,
        eos_token_id=VOCAB.eos, tie_word_embeddings=True,
        initializer_range=0.08,  # ~1/sqrt(hidden): with the usual 0.02 attention stays uniform for hundreds of steps
    )
    vision = dict(
        model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64,
    )
    config = transformers.LlavaConfig(
        text_config=text, vision_config=vision, image_token_index=VOCAB.image, image_seq_length=IMAGE_TOKENS,
        vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = VOCAB.pad, VOCAB.bos, VOCAB.eos
    return model


def load_model(path: str | Path | None = None) -> transformers.PreTrainedModel:
    """A VLM from a local ``save_pretrained`` directory (default: the shipped tiny VLM), in eval
    mode with SDPA attention; no network. A missing or unloadable directory raises FileNotFoundError /
    ValueError saying which path and what it must hold."""
    directory = Path(path) if path is not None else SHIPPED_MODEL_DIR
    if path is None and not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"no trained tiny VLM is shipped in {str(directory)!r} yet: train one with "
            "`python examples/train_tiny_vlm.py` (it saves there) or pass --model DIR"
        )
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist: pass a local save_pretrained directory")
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{str(directory)!r} has no config.json: pass a local save_pretrained directory")
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would bury one-line errors
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    classes = [transformers.AutoModelForImageTextToText]
    for auto in classes:
        try:
            model = auto.from_pretrained(directory, local_files_only=True, attn_implementation="sdpa")
            return model.eval()
        except ValueError:
            continue
    raise ValueError(f"{str(directory)!r} holds a {type(config).__name__}, not a vision-language model")

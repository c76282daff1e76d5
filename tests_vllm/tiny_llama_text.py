"""A vLLM-loadable directory for a tiny random-weight text-only Llama (``LlamaForCausalLM``).

``prepare_llama_text_dir(target)`` writes, with no hub access: ``config.json`` and
``model.safetensors`` (transformers' ``save_pretrained``, float32; ``LAYERS`` layers, 4 query heads
over 2 KV heads of dim 32: vLLM's CPU attention kernel refuses head_dim 16) and a WordLevel
tokenizer over ``VOCAB`` ids (``tiny_dir_files``: ``<pad> <s> </s> <unk>`` at 0-3, ``w<id>``
elsewhere). No vision part, no image token: every token is text.
"""

from __future__ import annotations

from pathlib import Path

from tiny_dir_files import token_names, tokenizer_files, write_files

__all__ = ["FIRST_TEXT_ID", "KV_HEADS", "LAYERS", "VOCAB", "prepare_llama_text_dir"]

VOCAB, LAYERS, KV_HEADS = 256, 3, 2
FIRST_TEXT_ID = 4  # ids 0-3: pad, bos, eos, unk
_CONFIG = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=LAYERS,
               num_attention_heads=4, num_key_value_heads=KV_HEADS, head_dim=32, max_position_embeddings=1024,
               bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)


def prepare_llama_text_dir(target: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny text Llama (seeded random weights, float32) into ``target`` (created; files
    overwritten) and return it."""
    import torch
    import transformers

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_CONFIG)).to(torch.float32).eval()
    model.save_pretrained(target)
    write_files(target, tokenizer_files(token_names(VOCAB, {}), {}))
    return target

"""The bench model: a random-weight Llava whose language model has a 1B-class *shape*, scaled down.

Llama-3.2-1B's language model is hidden 2048, 16 layers, 32 heads of head_dim 64 (8 KV heads),
intermediate 4 x hidden. The bench keeps head_dim 64 and the 4 x MLP, scales hidden / layers /
heads down so that an 8192-token prefill takes seconds on 2 CPU cores, and makes attention MHA
(KV heads = heads): with GQA-8 at this size the KV cache would be a small share of what a decode
step reads and no eviction could speed decoding up much (see ``decode_bound_b20``).

Prompts are multi-image Llava prompts: BOS, then text and blocks of consecutive 16-token images
(the tiny CLIP tower's 16 x 16 pixels, 4 x 4 patches), then a text question at the end, so that the
observation window is text; ``image_share`` of the tokens are image placeholders.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel

from csp_compile.tiny_vlms import BOS, FIRST_TEXT_ID, RESERVED_TOP, build_tiny_vlm

__all__ = ["BENCH_SHAPE", "QUICK_SHAPE", "ModelShape", "bench_inputs", "build_bench_model", "decode_weight_bytes",
           "image_share_of", "padded_pair", "parameter_count", "share_weights"]


@dataclass(frozen=True)
class ModelShape:
    """The Llama language model of the bench Llava (text config overrides of ``build_tiny_vlm``)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    label: str

    def overrides(self) -> dict:
        shape = asdict(self)
        del shape["label"]
        return dict(shape, max_position_embeddings=16384)

    def replace(self, **changes) -> "ModelShape":
        return ModelShape(**{**asdict(self), **changes})


# hidden 256 = 4 heads x 64; intermediate 4 x hidden (as Llama-3.2-1B: 8192 = 4 x 2048).
BENCH_SHAPE = ModelShape(
    hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
    intermediate_size=1024, vocab_size=2048,
    label="Llama-3.2-1B-class shape scaled down for 2 CPU cores: hidden 2048->256, layers 16->4, "
          "heads 32->4 (head_dim 64 kept), MHA instead of GQA-8, MLP 4x hidden, vocab 2048",
)
QUICK_SHAPE = BENCH_SHAPE.replace(
    hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, intermediate_size=512,
    vocab_size=1024,
    label="--quick: the bench shape at half width and depth (hidden 128, 2 layers, 2 heads of 64, MHA)",
)


def build_bench_model(shape: ModelShape, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                      seed: int = 0) -> PreTrainedModel:
    """The random-weight Llava of ``shape`` (attention "sdpa"), in eval mode on ``device``."""
    model = build_tiny_vlm("llava", seed=seed, dtype=dtype, **shape.overrides())
    return model.to(device)


def share_weights(model: PreTrainedModel, source: PreTrainedModel) -> PreTrainedModel:
    """``model`` (built from the same config) with ``source``'s very parameter and buffer tensors, so that
    two bench variants read the same memory: timings then cannot differ by where each copy's weights
    happen to lie (separately built copies differ by up to ~1.5% in matmul time on these CPUs)."""
    model.load_state_dict(source.state_dict(), assign=True)
    ours = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in source.named_parameters(remove_duplicate=False):
        if ours[name].data_ptr() != tensor.data_ptr():
            raise AssertionError(f"share_weights: {name} was copied, not shared")
    return model


def bench_inputs(model: PreTrainedModel, length: int, *, image_share: float = 0.3, image_blocks: int = 4,
                 tail_text: int = 64, seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A batch-1 prompt of exactly ``length`` tokens, ``image_share`` of them image placeholders (0: text only).

    Layout: BOS, text, [image block], text, [image block], ..., text question (>= ``tail_text``
    tokens, so the observation window is text). Each block is consecutive 16-token images.
    """
    cfg = model.config
    per_image = int(cfg.image_seq_length)
    n_images = max(1, round(length * image_share / per_image)) if image_share > 0 else 0
    text_len = length - 1 - n_images * per_image
    if text_len < tail_text + image_blocks:
        raise ValueError(f"a {length}-token prompt is too short for {n_images} images of {per_image} tokens "
                         f"and a {tail_text}-token question")
    blocks = max(1, min(image_blocks, n_images))
    images_in = [n_images // blocks + (i < n_images % blocks) for i in range(blocks)]
    lead = text_len - tail_text
    text_in = [lead // blocks + (i < lead % blocks) for i in range(blocks)] + [tail_text]

    gen = torch.Generator().manual_seed(seed)
    vocab = cfg.get_text_config().vocab_size
    ids = [BOS]
    for n_text, n_img in zip(text_in, images_in + [0]):
        ids += torch.randint(FIRST_TEXT_ID, vocab - RESERVED_TOP, (n_text,), generator=gen).tolist()
        ids += [cfg.image_token_id] * (n_img * per_image)
    input_ids = torch.tensor([ids], device=device)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if n_images:
        side = cfg.vision_config.image_size
        inputs["pixel_values"] = torch.randn(n_images, 3, side, side, generator=gen).to(device=device, dtype=model.dtype)
    return inputs


def padded_pair(model: PreTrainedModel, length: int, *, image_share: float = 0.3, pad: int | None = None,
                device: str = "cpu") -> dict[str, torch.Tensor]:
    """A left-padded batch of two prompts of ``length`` and ``length - pad`` tokens (default pad L / 8):
    the attention mask is then not SDPA's causal one (``csp::attention`` runs it as causal plus a row of
    padding keys; transformers' eager SDPA call runs the whole mask)."""
    pad = length // 8 if pad is None else pad
    first = bench_inputs(model, length, image_share=image_share, seed=0, device=device)
    second = bench_inputs(model, length - pad, image_share=image_share, seed=1, device=device)
    filler = torch.zeros(1, pad, dtype=first["input_ids"].dtype, device=device)
    inputs = {
        "input_ids": torch.cat([first["input_ids"], torch.cat([filler, second["input_ids"]], dim=1)]),
        "attention_mask": torch.cat([first["attention_mask"], torch.cat([filler, second["attention_mask"]], dim=1)]),
    }
    pixels = [x["pixel_values"] for x in (first, second) if "pixel_values" in x]
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels)
    return inputs


def image_share_of(model: PreTrainedModel, inputs: dict) -> float:
    return float((inputs["input_ids"] == model.config.image_token_id).float().mean())


def decode_weight_bytes(model: PreTrainedModel) -> int:
    """Bytes of weights one decode step reads: every language-model parameter except the embedding
    table (a step reads one row of it), plus the LM head (read whole, also when tied to the embedding)."""
    language_model = model.get_decoder()
    embed = language_model.get_input_embeddings().weight
    total = sum(p.numel() * p.element_size() for p in language_model.parameters() if p is not embed)
    head = model.get_output_embeddings().weight
    return total + head.numel() * head.element_size()


def parameter_count(model: PreTrainedModel) -> dict[str, int]:
    language_model = model.get_decoder()
    lm = sum(p.numel() for p in language_model.parameters())
    return {"parameters_total": sum(p.numel() for p in model.parameters()), "parameters_language_model": lm}

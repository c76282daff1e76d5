"""``demo`` and ``show-kept`` for a text-only causal LM (``--model smollm2`` or a directory with a
tokenizer): a short chat question and a pass-key retrieval question, full cache vs CSP."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CHAT_QUESTION = "What is the capital of France? Answer in one sentence."
PASSKEY_TOKENS = 1536  # about 1.5k tokens of filler around the key
PASSKEY_DEPTH = 0.7  # SmolLM2-135M finds the key with the full cache from about here on (earlier: often not)
CHAT_NEW_TOKENS = 24


@dataclass(frozen=True)
class Prompt:
    """One prompt's token ids and, for the pass key, the key's ``span`` [start, stop) and ``value``."""

    name: str
    input_ids: torch.Tensor
    span: tuple[int, int] | None = None
    value: str | None = None


def load_tokenizer_or_fail(name_or_path: str | Path) -> Any:
    """The text model's tokenizer; a CLIError naming --model when its directory has none."""
    from csp_compile.cli import CLIError
    from csp_compile.cli.common import resolve_model_or_fail
    from csp_compile.data.model import load_tokenizer

    try:
        tokenizer = load_tokenizer(resolve_model_or_fail(name_or_path))
    except FileNotFoundError as error:
        raise CLIError(f"--model: {error}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise CLIError(f"--model: the tokenizer in {str(name_or_path)!r} has no chat template: the text demo builds "
                       "its prompts with one (an instruct model's tokenizer)")
    return tokenizer


def chat_prompt(tokenizer: Any, question: str = CHAT_QUESTION) -> Prompt:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         tokenize=False)
    return Prompt("chat", torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]))


def passkey_prompt(tokenizer: Any, length: int = PASSKEY_TOKENS, depth: float = PASSKEY_DEPTH,
                   index: int = 0) -> Prompt:
    """Pass-key example ``index``: a 5-digit key hidden at ``depth`` in about ``length`` tokens of filler,
    asked at the end; the prompt ends with the answer prefix "The pass key is" (``csp_compile.real.tasks``)."""
    from csp_compile.real.tasks import get_real_task, make_example

    example = make_example(get_real_task("passkey"), tokenizer, length, index, depth)
    return Prompt("pass key", example.input_ids, example.needle_spans[0], example.value)


def left_padded(prompts: list[Prompt], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(p.input_ids) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt.input_ids):] = prompt.input_ids
        attention_mask[row, length - len(prompt.input_ids):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def greedy(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int) -> tuple[torch.Tensor, float]:
    """(new tokens (b, new_tokens), seconds) of a greedy generate."""
    started = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1]:], time.perf_counter() - started


def kv_bytes_per_token(model: Any) -> int:
    """KV cache bytes one prompt token takes in one layer (keys and values of every KV head)."""
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_key_value_heads * head_dim * model.dtype.itemsize


def kept_bytes(model: Any, kept: list[torch.Tensor | None], attention_mask: torch.Tensor) -> list[int]:
    """Per batch row the KV bytes its real prompt tokens hold after the prefill (evicted layers: the
    kept slots; other layers: the whole prompt)."""
    per_head_token = kv_bytes_per_token(model) // model.config.get_text_config().num_key_value_heads
    real = attention_mask.sum(-1)
    sizes = []
    for row in range(attention_mask.shape[0]):
        total = 0
        for layer in kept:
            slots = int(real[row]) * kv_heads(model) if layer is None else int((layer[row] >= 0).sum())
            total += slots * per_head_token
        sizes.append(total)
    return sizes


def kv_heads(model: Any) -> int:
    return model.config.get_text_config().num_key_value_heads


def needle_kept(kept: list[torch.Tensor | None], row: int, span: tuple[int, int], offset: int) -> list[list[int]]:
    """Per evicted layer, per needle token: how many KV heads kept it (``offset``: the row's left padding)."""
    positions = torch.arange(span[0], span[1]) + offset
    return [[int((layer[row] == p).any(-1).sum()) for p in positions] for layer in kept if layer is not None]


def decode(tokenizer: Any, tokens: torch.Tensor) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _stage(started: float, what: str | None) -> None:
    elapsed = time.perf_counter() - started
    print(f"[{elapsed:5.0f} s] {what}" if what else f"[{elapsed:5.0f} s] done", file=sys.stderr, flush=True)


def run_demo(model: Any, tokenizer: Any, source: str, config: Any) -> int:
    """The text demo: both prompts in one left-padded batch (the pass compiles once), full cache vs CSP."""
    import csp_compile
    from csp_compile.modality import check_modality_source

    started = time.perf_counter()
    prompts = [chat_prompt(tokenizer), passkey_prompt(tokenizer)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    inputs = left_padded(prompts, pad_id)
    passkey = prompts[1]
    key_tokens = len(tokenizer(" " + passkey.value, add_special_tokens=False)["input_ids"])
    print(f"model: {source}")
    print(f"modality: {check_modality_source(model)}")
    print(f"config: budget={config.budget} window={config.window} policy={config.policy}; both prompts in one "
          "left-padded batch, greedy")
    _stage(started, "answering with the full cache")
    full, full_seconds = greedy(model, inputs, CHAT_NEW_TOKENS)
    _stage(started, "answering with CSP (the first call compiles the language model: minutes for 30 layers)")
    csp_compile.optimize(model, config)
    try:
        pruned, first_seconds = greedy(model, inputs, CHAT_NEW_TOKENS)
        _stage(started, "answering with CSP again (compiled)")
        again, csp_seconds = greedy(model, inputs, CHAT_NEW_TOKENS)
        kept = csp_compile.kept_positions(model)
    finally:
        csp_compile.restore(model)
    _stage(started, None)

    mask = inputs["attention_mask"]
    real = mask.sum(-1).tolist()
    full_bytes = [n * kv_bytes_per_token(model) * len(kept) for n in real]
    csp_bytes = kept_bytes(model, kept, mask)
    evicted = [k for k in kept if k is not None]
    for row, prompt in enumerate(prompts):
        kept_share = sum(int((k[row] >= 0).sum()) for k in evicted) / (len(evicted) * kv_heads(model) * real[row])
        print(f"\n{prompt.name} question ({real[row]} prompt tokens):")
        if prompt.span is None:
            print(f"  question:   {CHAT_QUESTION}")
            same = "same as the full cache" if torch.equal(pruned[row], full[row]) else "differs from the full cache"
            print(f"  full cache: {decode(tokenizer, full[row])}")
            print(f"  CSP:        {decode(tokenizer, pruned[row])}   ({same})")
        else:
            answers = [decode(tokenizer, tokens[row, :key_tokens + 1]) for tokens in (full, pruned)]
            right = [passkey.value in answer for answer in answers]
            print(f"  the key {passkey.value} is prompt tokens {prompt.span[0]}..{prompt.span[1] - 1} "
                  f"(depth {PASSKEY_DEPTH}); the prompt ends with \"The pass key is\"")
            print(f"  full cache: {answers[0]}   ({'right' if right[0] else 'wrong'})")
            print(f"  CSP:        {answers[1]}   ({'right' if right[1] else 'wrong'})")
            counts = needle_kept(kept, row, prompt.span, mask.shape[1] - real[row])
            whole = sum(all(c > 0 for c in layer) for layer in counts)
            print(f"  the key's {len(counts[0])} tokens kept by at least one KV head in {whole} of {len(counts)} "
                  "layers")
            if right[0] and not right[1]:
                print(f"  CSP lost the key at budget {config.budget}: the full cache finds it, the pruned cache does "
                      f"not (n-softmax scores from the last {config.window} tokens' queries kept all of the key's "
                      f"tokens in only {whole} of {len(counts)} layers). A measured limitation of the policy on this "
                      "prompt, not an error of the pass")
        print(f"  kept {kept_share:.2f} of the prompt (mean over {len(evicted)} evicted layers and "
              f"{kv_heads(model)} KV heads); KV cache after prefill {csp_bytes[row] / 2**20:.2f} MiB with CSP vs "
              f"{full_bytes[row] / 2**20:.2f} MiB full")
    print(f"\ntimes for the batch ({CHAT_NEW_TOKENS} new tokens): full cache {full_seconds:.1f} s; CSP first call "
          f"{first_seconds:.1f} s (compiles the pass), compiled {csp_seconds:.1f} s")
    if not torch.equal(again, pruned):
        print("note: the compiled CSP run's tokens differ from the first CSP run's")
    return 0


def run_show_kept(model: Any, tokenizer: Any, source: str, config: Any, label: str, out: Path, index: int = 0) -> int:
    """Which prompt positions each layer kept for pass-key prompt ``index``: a text summary and a PNG map."""
    import csp_compile
    from csp_compile.evaluation.kept_map import kept_map

    prompt = passkey_prompt(tokenizer, index=index)
    inputs = {"input_ids": prompt.input_ids[None], "attention_mask": torch.ones(1, len(prompt.input_ids),
                                                                                 dtype=torch.long)}
    key_tokens = len(tokenizer(" " + prompt.value, add_special_tokens=False)["input_ids"]) + 1
    full, _ = greedy(model, inputs, key_tokens)
    csp_compile.optimize(model, config)
    try:
        pruned, _ = greedy(model, inputs, key_tokens)
        kept = csp_compile.kept_positions(model)
    finally:
        csp_compile.restore(model)
    modality = torch.zeros_like(inputs["input_ids"])
    kmap = kept_map(kept, inputs["attention_mask"], modality)
    answers = [decode(tokenizer, tokens[0]) for tokens in (full, pruned)]
    heads = kv_heads(model)
    start, stop = prompt.span
    title = (f"{label} at budget {config.budget}, window {config.window}: pass key {prompt.value}; full cache "
             f"answers {answers[0]!r}, {label} {answers[1]!r}")
    layers = [i for i, k in enumerate(kept) if k is not None]
    plot_text_kept_map(kmap.per_layer, heads, prompt.span, out, layers=layers, title=title)

    length = len(prompt.input_ids)
    print(f"model: {source}; pass-key prompt {index}, {length} tokens, the key {prompt.value} at tokens "
          f"{start}..{stop - 1} (depth {PASSKEY_DEPTH})")
    print(f"answer: full cache {answers[0]!r} ({'right' if prompt.value in answers[0] else 'wrong'}), "
          f"{label} {answers[1]!r} ({'right' if prompt.value in answers[1] else 'wrong'})")
    whole = 0
    for layer, row in zip(layers, kmap.per_layer):
        needle = row[start:stop].tolist()
        whole += all(n > 0 for n in needle)
        window = row[length - config.window:]
        print(f"layer {layer:>2}: kept {int(row.sum()) // heads} of {length} positions per KV head; key tokens "
              f"kept by {'/'.join(str(n) for n in needle)} of {heads} heads; window {int(window.sum())}/"
              f"{heads * len(window)}")
    print(f"the key's tokens kept by at least one head in {whole} of {len(layers)} layers")
    print(f"wrote {out}")
    return 0


def plot_text_kept_map(per_layer: torch.Tensor, heads: int, span: tuple[int, int], path: Path, *,
                       layers: list[int] | None = None, title: str = "") -> None:
    """PNG: evicted layers x prompt positions shaded by the share of KV heads that kept each position;
    the needle's positions marked in red (a band between dashed lines and a marker above the map)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    share = (per_layer.float() / heads).numpy()
    count, length = share.shape
    layers = list(range(count)) if layers is None else layers
    figure, axis = plt.subplots(figsize=(12, 0.16 * count + 2.2))
    image = axis.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    axis.axvspan(span[0] - 0.5, span[1] - 0.5, color="red", alpha=0.15, lw=0)
    for edge in (span[0] - 0.5, span[1] - 0.5):
        axis.axvline(edge, color="red", ls="--", lw=0.6)
    axis.plot([(span[0] + span[1] - 1) / 2], [-0.5], marker="v", color="red", markersize=9, clip_on=False)
    axis.set_yticks(range(count), labels=[str(layer) for layer in layers], fontsize=6)
    axis.set_xlabel(f"prompt position (pass key: red, tokens {span[0]}..{span[1] - 1})")
    axis.set_ylabel("layer")
    axis.set_title(title, fontsize=9, pad=12)
    figure.colorbar(image, ax=axis, label="share of KV heads that kept it", fraction=0.03)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)

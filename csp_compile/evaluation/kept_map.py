"""Which prompt tokens each layer kept: counts over layers and KV heads, and their picture."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["KeptMap", "kept_map", "plot_kept_map"]


@dataclass(frozen=True)
class KeptMap:
    """For one prompt of ``length`` real tokens: ``counts`` (length,) how many (layer, KV head)
    pairs kept each token out of ``pairs``; ``per_layer`` (layers, length) the same per layer
    (out of the KV heads); ``modality`` (length,) 0 text / 1 image."""

    counts: torch.Tensor
    per_layer: torch.Tensor
    pairs: int
    modality: torch.Tensor


def kept_map(kept: list[torch.Tensor | None], attention_mask: torch.Tensor, modality: torch.Tensor, row: int = 0) -> KeptMap:
    """Counts from ``csp_compile.kept_positions(model)`` (per layer (b, hkv, P), -1 = empty slot)
    for batch row ``row`` of a left-padded batch; positions are re-based on the first real token."""
    real = attention_mask[row].bool()
    offset = int((~real).sum())  # left padding
    length = int(real.sum())
    layers = [k for k in kept if k is not None]
    if not layers:
        raise ValueError("no layer was evicted: nothing to show")
    per_layer = torch.zeros(len(layers), length, dtype=torch.int64)
    for i, layer in enumerate(layers):
        positions = layer[row].flatten()
        positions = positions[positions >= 0] - offset
        per_layer[i].index_add_(0, positions, torch.ones_like(positions))
    return KeptMap(per_layer.sum(0), per_layer, len(layers) * layers[0].shape[1], modality[row][real].cpu())


def plot_kept_map(kmap: KeptMap, image: torch.Tensor, words: list[str], path: str | Path, *, title: str = "",
                  grid: tuple[int, int] | None = None, highlight: set[int] = frozenset()) -> None:
    """PNG at ``path``: the image with each patch shaded by how often it was kept (image tokens in
    order, row-major ``grid``), and the prompt's text tokens coloured by the same share; positions
    in ``highlight`` are boxed (e.g. the answer's record)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    share = kmap.counts.float() / kmap.pairs
    image_share = share[kmap.modality == 1]
    if grid is None:
        side = int(round(len(image_share) ** 0.5))
        grid = (side, len(image_share) // max(side, 1))
    if grid[0] * grid[1] != len(image_share):
        raise ValueError(f"{len(image_share)} image tokens do not fill a {grid[0]} x {grid[1]} patch grid")
    figure = plt.figure(figsize=(11, 6.5), dpi=100)
    picture = figure.add_axes((0.02, 0.45, 0.28, 0.5))
    shown = image.detach().float().permute(1, 2, 0)
    shown = (shown - shown.min()) / (shown.max() - shown.min() + 1e-6)
    picture.imshow(shown.numpy(), extent=(0, grid[1], grid[0], 0))
    picture.imshow(image_share.view(grid).numpy(), cmap="magma", alpha=0.6, vmin=0, vmax=1,
                   extent=(0, grid[1], grid[0], 0))
    picture.set_title("image patches: share of (layer, KV head) that kept them", fontsize=8)
    picture.set_xticks([]), picture.set_yticks([])
    layers = figure.add_axes((0.36, 0.55, 0.6, 0.38))
    layers.imshow(kmap.per_layer.float().numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    layers.set_xlabel("prompt position", fontsize=8)
    layers.set_ylabel("layer", fontsize=8)
    layers.set_title("kept KV heads per layer and position (bright = kept by every head)", fontsize=8)
    text = figure.add_axes((0.02, 0.02, 0.96, 0.36))
    text.axis("off")
    cmap = colormaps["magma"]
    x, y, text_positions = 0.0, 1.0, (kmap.modality == 0).nonzero().flatten().tolist()
    for position in text_positions:
        word = words[position]
        step = 0.0085 * (len(word) + 1)
        if x + step > 1.0:
            x, y = 0.0, y - 0.085
        box = dict(facecolor=cmap(0.15 + 0.8 * float(share[position])), edgecolor="cyan" if position in highlight
                   else "none", linewidth=1.5, pad=1.2)
        ink = "black" if float(share[position]) > 0.5 else "white"
        text.text(x, y, word, fontsize=7, family="monospace", va="top", color=ink, bbox=box)
        x += step
    if title:
        figure.suptitle(title, fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)

"""``csp-compile show-kept``: which prompt tokens each layer kept, as a PNG and a text summary."""

from __future__ import annotations

import argparse
from pathlib import Path

from csp_compile.cli.common import add_model_argument, add_task_argument, get_task_or_fail, load_model_or_fail, set_threads

HELP = ("show which image patches and text tokens each layer kept for one prompt (PNG + summary); with a text model "
        "(--model smollm2): one pass-key prompt, layers x positions")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    add_task_argument(parser)
    parser.add_argument("--image", type=Path, default=None,
                        help="PNG to ask about instead of the test prompt's own glyph (resized to the model's input)")
    parser.add_argument("--index", type=int, default=0,
                        help="which held-out test prompt (text models: which pass-key prompt) (default 0)")
    parser.add_argument("--budget", type=float, default=0.2, help="fraction of the prompt kept (default 0.2)")
    parser.add_argument("--policy", default="csp",
                        help="one eviction policy, spelled as in eval's --policies, e.g. csp:mass (default csp)")
    parser.add_argument("--out", type=Path, default=Path("kept.png"), help="PNG to write (default kept.png)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def load_image(path: Path, size: int):
    """(3, size, size) float tensor in the task's pixel range from a PNG file."""
    import matplotlib.image
    import torch
    import torch.nn.functional as F

    if not path.is_file():
        raise FileNotFoundError(f"--image {str(path)!r} does not exist: pass a PNG file")
    try:
        array = matplotlib.image.imread(path)
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"--image {str(path)!r} is not a readable PNG: {error}") from None
    pixels = torch.as_tensor(array, dtype=torch.float32)
    if pixels.dim() == 2:
        pixels = pixels[..., None].expand(-1, -1, 3)
    pixels = pixels[..., :3].permute(2, 0, 1)
    if pixels.max() > 1.0:
        pixels = pixels / 255.0
    pixels = F.interpolate(pixels[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    return pixels * 2.0 - 1.0


def run(args: argparse.Namespace) -> int:
    import torch

    import csp_compile
    from csp_compile.config import CSPConfig
    from csp_compile.evaluation import parse_policy
    from csp_compile.evaluation.kept_map import kept_map, plot_kept_map
    from csp_compile.modality import is_text_only, modality_ids

    task = get_task_or_fail(args.task)
    data = task.data
    spec = parse_policy(args.policy, "--policy")
    config = spec.config(args.budget, CSPConfig())
    if args.index < 0:
        raise ValueError(f"--index must be >= 0: got {args.index}")
    if args.image is not None and not args.image.is_file():
        raise FileNotFoundError(f"--image {str(args.image)!r} does not exist: pass a PNG file")
    set_threads(args.threads)
    model, source = load_model_or_fail(args.model, task)
    if is_text_only(model):
        from csp_compile.cli.text_demo import load_tokenizer_or_fail, run_show_kept

        if args.image is not None:
            raise ValueError(f"--image {str(args.image)!r}: {source} is a text-only model: --image is for VLMs")
        return run_show_kept(model, load_tokenizer_or_fail(args.model), source, config, spec.label, args.out,
                             args.index)
    if not task.is_task_model(model):
        raise ValueError(f"{source} is not a model of the {task.name} task: show-kept --task {task.name} needs its "
                         f"shipped tiny VLM (or one trained by {task.train_script})")
    example = data.make_example(args.index, "test")
    inputs = data.collate([example])
    if args.image is not None:
        inputs["pixel_values"] = load_image(args.image, data.IMAGE_SIZE)[None]
    n = task.answer_tokens
    with torch.no_grad():
        full = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, -n:]
        csp_compile.optimize(model, config)
        try:
            pruned = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)[0, -n:]
            kept = csp_compile.kept_positions(model)
        finally:
            csp_compile.restore(model)
    modality = modality_ids(model, inputs["input_ids"])
    kmap = kept_map(kept, inputs["attention_mask"], modality)
    words = [data.token_name(int(t)) for t in inputs["input_ids"][0]]
    record = set(task.highlight(example))
    render_tokens = data.render_tokens
    title = (f"{spec.label} at budget {args.budget}: full cache answers {render_tokens(full)}, "
             f"{spec.label} answers {render_tokens(pruned)}")
    plot_kept_map(kmap, inputs["pixel_values"][0], words, args.out, title=title, highlight=record)

    image = kmap.modality == 1
    heads = kmap.pairs // kmap.per_layer.shape[0]
    print(f"model: {source}; prompt {args.index} of the test split, {len(words)} tokens ({int(image.sum())} image)")
    shown = f"{args.image}" if args.image is not None else task.describe_image(example)
    print(f"image: {shown}")
    print(f"answer: expected {render_tokens(example.answer)}, full cache {render_tokens(full)}, {spec.label} {render_tokens(pruned)}")
    for layer, row in enumerate(kmap.per_layer):
        image_kept = float((row[image] > 0).float().mean())
        text_kept = float((row[~image] > 0).float().mean())
        if len(record) <= 4:  # the lookup's two records
            marks = "answer record: " + ", ".join(f"{words[p]}@{p} by {int(row[p])}/{heads} heads" for p in sorted(record))
        else:  # the grid's asked row: 4 image tokens per answer cell
            per_cell = [sum(int(row[p] > 0) for p in cell) for cell in example.cells.tolist()]
            marks = ("image tokens of the answer cells kept by any head (columns 0..3): "
                     + " ".join(f"{k}/{len(cell)}" for k, cell in zip(per_cell, example.cells.tolist())))
        print(f"layer {layer}: kept {float(row.sum()) / (heads * len(words)):.2f} of the prompt per head; "
              f"image tokens kept by any head {image_kept:.2f}, text {text_kept:.2f}; {marks}")
    print(f"wrote {args.out}")
    return 0

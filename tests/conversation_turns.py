"""The inputs of a conversation's second turn: the whole conversation so far plus the new user turn, with
what transformers needs to continue each family from a cache."""

import torch

from csp_compile.tiny_vlms import make_inputs

TYPE_IDS = ("token_type_ids", "mm_token_type_ids")


def text_turn(model, first: dict, sequences: torch.Tensor, length: int = 6, seed: int = 7) -> dict:
    """The whole conversation after turn 1 plus ``length`` new text tokens (the second user turn)."""
    batch = sequences.shape[0]
    vocab = model.config.get_text_config().vocab_size
    new = torch.randint(4, vocab - 16, (batch, length), generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([sequences, new], dim=-1)
    grown = ids.shape[1] - first["input_ids"].shape[1]
    turn = {"input_ids": ids,
            "attention_mask": torch.cat([first["attention_mask"], torch.ones(batch, grown, dtype=torch.long)], dim=-1)}
    for key in TYPE_IDS:
        if key in first:
            turn[key] = torch.cat([first[key], torch.zeros(batch, grown, dtype=first[key].dtype)], dim=-1)
    for key in ("image_grid_thw",):  # M-RoPE positions of the whole conversation need the first image's grid
        if key in first:
            turn[key] = first[key]
    return turn


def image_turn(model, first: dict, sequences: torch.Tensor, seed: int = 3) -> dict:
    """The conversation after turn 1 plus a new user turn holding a new image, with what transformers
    needs to continue it from a cache (``new_image_inputs``)."""
    batch = sequences.shape[0]
    new = make_inputs(model, batch=batch, text_len=6, seed=seed)
    ids = torch.cat([sequences, new["input_ids"]], dim=-1)
    grown = ids.shape[1] - first["input_ids"].shape[1]
    turn = {"input_ids": ids,
            "attention_mask": torch.cat([first["attention_mask"], torch.ones(batch, grown, dtype=torch.long)], dim=-1)}
    generated = sequences.shape[1] - first["input_ids"].shape[1]
    for key in TYPE_IDS:
        if key in first:
            turn[key] = torch.cat([first[key], torch.zeros(batch, generated, dtype=first[key].dtype), new[key]], dim=-1)
    turn.update(new_image_inputs(model, first, new, turn))
    return turn


def new_image_inputs(model, first: dict, new: dict, turn: dict) -> dict:
    """The image inputs of a second turn, as transformers 5.24 continues each family correctly from a cache:
    - M-RoPE (Qwen-VL): ``image_grid_thw`` of every image of the conversation (generate computes the whole
      conversation's positions from it) and the new image already encoded as ``mm_encoder_outputs`` (generate
      would otherwise encode every grid's image from the new pixels alone);
    - PaliGemma: the new turn typed as suffix (token_type_ids 1): its prefix block is only read at the positions
      of the uncached tokens (a prefix-typed turn is refused on an optimised model);
    - the others: the new image's pixels (Gemma3: token_type_ids over the whole conversation, as above)."""
    pixels = {k: v for k, v in new.items() if k not in ("input_ids", "attention_mask", *TYPE_IDS)}
    if "image_grid_thw" in new:
        grids = torch.stack([first["image_grid_thw"], new["image_grid_thw"]], dim=1).flatten(0, 1)  # per sequence
        with torch.no_grad():
            encoded = model.get_image_features(new["pixel_values"], new["image_grid_thw"], return_dict=True)
        return {"image_grid_thw": grids, "mm_encoder_outputs": {"image": encoded}}
    if model.config.model_type == "paligemma":
        suffix = turn["token_type_ids"].clone()
        suffix[:, first["input_ids"].shape[1]:] = 1
        return {**pixels, "token_type_ids": suffix}
    return pixels


def one_shot(model, first: dict, turn: dict, type_ids: dict, seed: int = 3) -> dict:
    """``turn`` (from ``image_turn`` with the same ``seed``) as one prompt holding both images: each sequence's
    first and new image (pixels; every grid), typed by ``type_ids``. Gemma3, PaliGemma and the M-RoPE families."""
    batch = first["input_ids"].shape[0]
    new = make_inputs(model, batch=batch, text_len=6, seed=seed)
    inputs = {"input_ids": turn["input_ids"], "attention_mask": turn["attention_mask"], **type_ids}
    if "image_grid_thw" in new:
        rows = first["pixel_values"].shape[0] // batch
        pixels = [p[s * rows:(s + 1) * rows] for s in range(batch)
                  for p in (first["pixel_values"], new["pixel_values"])]
        return {**inputs, "pixel_values": torch.cat(pixels), "image_grid_thw": turn["image_grid_thw"]}
    return {**inputs, "pixel_values": torch.stack([first["pixel_values"], new["pixel_values"]], dim=1).flatten(0, 1)}

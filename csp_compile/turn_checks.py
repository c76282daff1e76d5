"""New turns with an image that transformers itself would continue wrongly from a cache: refused in one line.

Each rule was measured on the unmodified model (transformers 5.24, full cache): a two-turn ``generate``
whose second turn carries a new image, against one-shot generation of the whole conversation.

- PaliGemma: ``PaliGemmaModel.forward`` builds its bidirectional prefix block on a non-empty cache only
  when ``pixel_values`` come (``generate`` hands a new image over pre-encoded, as ``mm_encoder_outputs``,
  so never there), and then from the ``token_type_ids`` of the uncached tokens while
  ``masking_utils.blockwise_overlay`` reads them at absolute positions: a prefix-typed (0) new turn gets
  no block, or one at the wrong positions. A suffix-typed (1) turn is right: it is causal either way.
- Gemma3: its image blocks are read by absolute position as well; ``generate`` hands the model the
  whole ``token_type_ids`` at a turn's first forward, so they must cover the whole conversation.
- M-RoPE (Qwen2/2.5/3-VL): a new image needs the 3-D positions ``get_rope_index`` gives over the whole
  conversation; ``_prepare_position_ids_for_generation`` only computes them when ``mm_token_type_ids``
  cover the whole conversation (given ids of the new tokens only, the image gets text positions), and a
  direct call without ``position_ids`` gives the new tokens text positions (or restarts them at 0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from csp_compile.modality import TEXT

NewTurnRule = Callable[[dict, int, torch.Tensor, torch.Tensor], None]  # (kwargs, logical, media, valid)


def check_new_turn(model: nn.Module, kwargs: dict, logical: int, modality: torch.Tensor, valid: torch.Tensor) -> None:
    """Raise ``ValueError`` (one line) if the call ``kwargs`` on a cache of ``logical`` tokens brings image
    or video tokens that the unmodified model would place or mask wrongly. ``modality`` / ``valid``
    (b, q): the new tokens' modality ids and padding (1 = real)."""
    valid = valid.bool()
    media = (modality != TEXT) & valid
    if not bool(media.any()):
        return
    rule = _RULES.get(model.config.model_type)
    if rule is None and _uses_mrope(model):
        rule = _mrope_positions
    if rule is not None:
        rule(kwargs, logical, media, valid)


def _paligemma_suffix(kwargs: dict, logical: int, media: torch.Tensor, valid: torch.Tensor) -> None:
    type_ids = kwargs.get("token_type_ids")
    if type_ids is None:
        return
    prefix = ((type_ids[..., -media.shape[-1]:] == 0) & valid).sum().item()
    if prefix:
        raise ValueError(
            f"csp: token_type_ids mark {prefix} new tokens as prefix (0) in a turn with a new image on a cache of "
            f"{logical} tokens: transformers 5.24 PaliGemma reads that prefix block at the wrong positions; type the "
            "new turn as suffix (1) or start a new conversation"
        )


def _gemma3_whole_conversation(kwargs: dict, logical: int, media: torch.Tensor, valid: torch.Tensor) -> None:
    type_ids = kwargs.get("token_type_ids")
    expected = logical + media.shape[-1]
    if type_ids is not None and type_ids.shape[-1] != expected:
        raise ValueError(
            f"csp: token_type_ids cover {type_ids.shape[-1]} tokens in a turn with a new image on a cache of {logical} "
            f"tokens: Gemma3 reads its image blocks by absolute position, pass them for the whole conversation "
            f"({expected} tokens)"
        )


def _mrope_positions(kwargs: dict, logical: int, media: torch.Tensor, valid: torch.Tensor) -> None:
    positions = kwargs.get("position_ids")
    if positions is None:
        raise ValueError(
            f"csp: a turn with a new image on a cache of {logical} tokens needs its M-RoPE position_ids: call generate "
            "(with mm_token_type_ids and image_grid_thw for the whole conversation) or pass position_ids"
        )
    rows = positions[-3:] if positions.dim() == 3 else positions[None]  # (r, b, q): t, h, w rows, or one text row
    flat = (rows == rows[:1]).all(0).expand_as(media)
    # an image (or video) of more than one token always has unequal rows somewhere; 1-token ones cannot tell
    multi_token = (media[:, 1:] & media[:, :-1]).any(-1)
    text_like = multi_token & (flat | ~media).all(-1)
    if bool(text_like.any()):
        row = int(text_like.nonzero()[0])
        raise ValueError(
            f"csp: the new image tokens of sequence {row} got text positions (equal M-RoPE rows) "
            f"on a cache of {logical} tokens: pass mm_token_type_ids for the whole conversation and image_grid_thw of "
            "every image in it (the new image pre-encoded as mm_encoder_outputs)"
        )


def _uses_mrope(model: nn.Module) -> bool:
    rope = getattr(model.config.get_text_config(), "rope_parameters", None) or {}
    return "mrope_section" in rope


_RULES: dict[str, NewTurnRule] = {"paligemma": _paligemma_suffix, "gemma3": _gemma3_whole_conversation}

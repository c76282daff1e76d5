"""Score pooling (``CSPConfig.pool``): "1d" is SnapKV's, "image" averages image / video tokens over their
own image's neighbours (2-D on a square grid) and leaves text alone; checked against a per-token loop."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig
from hypothesis import given, settings
from hypothesis import strategies as st

import csp_compile
from csp_compile.config import CSPConfig, pooling_in_words
from csp_compile.modality import with_image_grid
from csp_compile.policies import get_policy
from csp_compile.scoring import AttentionInputs, pool_scores
from csp_compile.selection import make_attention_inputs, select_kept
from csp_compile.tiny_vlms import build_tiny_vlm, make_inputs
from eager_oracle import evicting_generate
from greedy import NEW_TOKENS, generate


def _inputs(modality: torch.Tensor, valid: torch.Tensor, window: int, positions: torch.Tensor | None = None) -> AttentionInputs:
    b, length = modality.shape
    return AttentionInputs(query=torch.zeros(b, 2, length, 4), key=torch.zeros(b, 1, length, 4), modality=modality,
                           valid=valid, mask=None, scale=1.0, window=torch.full((b,), window), positions=positions)


def _runs(modality: list[int], valid: list[bool], positions: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each run: consecutive real non-text tokens of one modality at consecutive positions."""
    runs, start = [], None
    for i, m in enumerate(modality):
        media = valid[i] and m != 0
        joined = (start is not None and media and modality[i - 1] == m and positions[i - 1] + 1 == positions[i])
        if start is not None and not joined:
            runs.append((start, i - 1))
            start = None
        if media and start is None:
            start = i
    if start is not None:
        runs.append((start, len(modality) - 1))
    return runs


def _reference(scores: torch.Tensor, inputs: AttentionInputs, kernel: int, square: bool) -> torch.Tensor:
    """``pool_scores(mode="image")`` one token at a time."""
    scores = scores * inputs.candidates()[:, None, :]
    out = scores.clone()
    half = kernel // 2
    for row in range(scores.shape[0]):
        modality, valid = inputs.modality[row].tolist(), inputs.valid[row].tolist()
        positions = list(range(len(modality))) if inputs.positions is None else inputs.positions[row].tolist()
        for start, end in _runs(modality, valid, positions):
            count = end - start + 1
            side = math.isqrt(count) if square and inputs.positions is None and math.isqrt(count) ** 2 == count else count
            for i in range(start, end + 1):
                r, c = divmod(i - start, side)
                members = [start + rr * side + cc for rr in range(r - half, r + half + 1) for cc in range(c - half, c + half + 1)
                           if 0 <= cc < side and 0 <= rr * side + cc < count]
                out[row, :, i] = scores[row, :, members].mean(-1)
    return out


@st.composite
def _layouts(draw):
    """A batch of 1-2 sequences of left padding, text and image / video runs (some of a square length)."""
    b = draw(st.integers(1, 2))
    length = draw(st.integers(4, 40))
    modality = torch.zeros(b, length, dtype=torch.int64)
    valid = torch.ones(b, length, dtype=torch.bool)
    for row in range(b):
        pad = draw(st.integers(0, 3))
        valid[row, :pad] = False
        i = pad
        while i < length:
            kind = draw(st.sampled_from([0, 1, 1, 2]))
            run = draw(st.sampled_from([1, 2, 4, 9, 16, 3, 6]))
            modality[row, i:i + run] = kind
            i += run
    return modality, valid


@settings(max_examples=60, deadline=None)
@given(_layouts(), st.sampled_from([1, 3, 5]), st.booleans(), st.integers(1, 4), st.booleans())
def test_image_pooling_equals_a_per_token_loop(layout, kernel, square, window, pruned):
    modality, valid = layout
    b, length = modality.shape
    positions = None
    if pruned:  # a pruned cache: some positions skipped, so runs break where positions jump
        gaps = torch.randint(1, 3, (b, length), generator=torch.Generator().manual_seed(length))
        positions = torch.cumsum(gaps, -1)
    inputs = _inputs(modality, valid, window, positions)
    scores = torch.rand(b, 3, length, dtype=torch.float64, generator=torch.Generator().manual_seed(kernel))
    config = CSPConfig(policy="csp", pool="image", pool_kernel=kernel, image_grid="square" if square else "run")
    torch.testing.assert_close(pool_scores(scores, inputs, config), _reference(scores, inputs, kernel, square))


def test_2d_pooling_reaches_the_vertical_neighbour_and_leaves_text_alone():
    """An 8 x 8 image between text: a spike at image cell (2, 3) reaches (1..3, 2..4) at kernel 3, with
    the cell below it 8 tokens later; 1-D pooling reaches only the tokens beside it; text is unchanged."""
    modality = torch.tensor([[0] * 5 + [1] * 64 + [0] * 6])
    inputs = _inputs(modality, torch.ones_like(modality, dtype=torch.bool), window=2)
    scores = torch.zeros(1, 1, 75, dtype=torch.float64)
    scores[0, 0, 5 + 2 * 8 + 3] = 9.0
    scores[0, 0, 1] = 0.5  # a text token
    square = pool_scores(scores, inputs, CSPConfig(pool="image", pool_kernel=3, image_grid="square"))[0, 0]
    reached = {(int(i) - 5) // 8 * 10 + (int(i) - 5) % 8 for i in torch.nonzero(square[5:69]).flatten() + 5}
    assert reached == {r * 10 + c for r in (1, 2, 3) for c in (2, 3, 4)}
    assert square[5 + 2 * 8 + 3] == 1.0 and square[1] == 0.5 and square[:5].sum() == 0.5
    run = pool_scores(scores, inputs, CSPConfig(pool="image", pool_kernel=3, image_grid="run"))[0, 0]
    assert set(torch.nonzero(run[5:69]).flatten().tolist()) == {2 * 8 + 2, 2 * 8 + 3, 2 * 8 + 4}


def test_snapkv_default_is_1d_avg_pooling_and_csp_default_is_none():
    torch.manual_seed(0)
    query, key = torch.randn(2, 4, 30, 8), torch.randn(2, 2, 30, 8)
    modality = torch.zeros(2, 30, dtype=torch.int64)
    modality[:, 6:22] = 1
    snap = CSPConfig(policy="snapkv", budget=0.3, window=4)
    assert snap.pooling == "1d" and CSPConfig().pooling == "none"
    inputs = make_attention_inputs(query, key, modality, snap)
    summed = get_policy("snapkv").score(inputs, snap.replace(pool="none")).primary  # the same sum, unpooled
    expected = F.avg_pool1d(summed * inputs.candidates()[:, None, :], 5, stride=1, padding=2)
    torch.testing.assert_close(get_policy("snapkv").score(inputs, snap).primary, expected)
    for a, b in [(snap, snap.replace(pool="1d")), (CSPConfig(budget=0.3, window=4), CSPConfig(budget=0.3, window=4, pool="none"))]:
        assert torch.equal(select_kept(query, key, modality, a).indices, select_kept(query, key, modality, b).indices)


def test_image_pooling_changes_csp_selection_only_through_image_scores():
    """On an all-text prompt "image" pooling keeps what unpooled CSP keeps; with an image it differs."""
    torch.manual_seed(1)
    query, key = torch.randn(1, 4, 90, 8), torch.randn(1, 2, 90, 8)
    text = torch.zeros(1, 90, dtype=torch.int64)
    config = CSPConfig(budget=0.3, window=6, image_grid="square")
    pooled = config.replace(pool="image")
    assert torch.equal(select_kept(query, key, text, config).indices, select_kept(query, key, text, pooled).indices)
    image = text.clone()
    image[:, 10:74] = 1
    assert not torch.equal(select_kept(query, key, image, config).indices, select_kept(query, key, image, pooled).indices)


@pytest.mark.parametrize("fields, words", [
    ({"pool": "2d"}, "CSPConfig.pool='2d' is invalid: allowed None (the policy's default) or one of ['none', '1d', 'image']"),
    ({"policy": "h2o", "pool": "image"}, "CSPConfig.pool='image' is invalid: allowed None or 'none' with policy 'h2o'"),
    ({"image_grid": "hex"}, "CSPConfig.image_grid='hex' is invalid: allowed one of ['run', 'square', 'auto']"),
    ({"pool": "image", "pool_kernel": 4}, "CSPConfig.pool_kernel=4 is invalid: allowed an odd int >= 1"),
])
def test_bad_pooling_settings_are_one_line_errors(fields, words):
    with pytest.raises(ValueError) as error:
        CSPConfig(**fields)
    assert str(error.value).startswith(words) and "\n" not in str(error.value)


@pytest.mark.parametrize("family, grid", [("llava", "square"), ("gemma3", "square"), ("idefics3", "square"),
                                          ("qwen2_vl", "run"), ("llava_next", "run")])
def test_auto_image_grid_is_the_familys(family, grid):
    config = CSPConfig(pool="image", image_grid="auto")
    assert CSPConfig(pool="image").image_grid == "run"
    assert with_image_grid(config, AutoConfig.for_model(family)).image_grid == grid
    assert with_image_grid(config.replace(image_grid="run"), AutoConfig.for_model(family)).image_grid == "run"


def test_pooling_in_words_names_mode_kernel_and_grid():
    assert pooling_in_words(CSPConfig()) == "none (policy csp's default)"
    assert pooling_in_words(CSPConfig(policy="snapkv")).startswith("1d (policy snapkv's default): each key averaged over 5")
    words = pooling_in_words(CSPConfig(pool="image", pool_kernel=3, image_grid="square"))
    assert words.startswith("image: each image / video token averaged over its 3 x 3 neighbours on the image's square grid")


@pytest.mark.slow  # compiles three tiny VLMs
@pytest.mark.parametrize("family", ["llava", "idefics3", "qwen2_vl"])
def test_compiled_pass_with_image_pooling_keeps_the_oracle_positions(family):
    """pool="image" traced into the prefill graph: kept positions and tokens equal the eager model evicted
    with ``select_kept`` under the family's grid rule (square for Llava and Idefics3 tiles, runs for Qwen2-VL)."""
    model = build_tiny_vlm(family)
    inputs = make_inputs(model, batch=2, text_len=30, pad_left=[0, 4])
    config = CSPConfig(budget=0.3, window=4, pool="image", pool_kernel=3, image_grid="auto")
    reference, reference_kept = evicting_generate(model, inputs, with_image_grid(config, model), NEW_TOKENS)
    csp_compile.optimize(model, config)
    out = generate(model, inputs)
    kept = csp_compile.kept_positions(model)
    assert any(k is not None for k in kept)
    for layer, (ours, theirs) in enumerate(zip(kept, reference_kept)):
        assert (ours is None) == (theirs is None) and (ours is None or torch.equal(ours, theirs)), layer
    assert torch.equal(out.sequences, reference.sequences)
    assert "pooling: image: each image / video token averaged over" in csp_compile.explain(model)

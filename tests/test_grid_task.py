"""The glyph-grid task: deterministic, split-separated, the answer in the image and nowhere else;
its shipped model reads the image; the task registry and --task on the command line."""

import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from csp_compile.cli import main
from csp_compile.data import grid
from csp_compile.data.grid import (
    BODY_MAX,
    BODY_MIN,
    CELL_PIXELS,
    GLYPHS,
    GRID,
    IMAGE_TOKENS,
    NUM_GLYPHS,
    VOCAB,
    collate,
    make_example,
    render_grid,
    render_tokens,
    token_name,
)
from csp_compile.data.model import GRID_MODEL_DIR
from csp_compile.tasks import DEFAULT_TASK, TASKS, get_task, task_of_model

shipped = pytest.mark.skipif(not (GRID_MODEL_DIR / "config.json").is_file(), reason="no grid VLM shipped in this checkout")


def test_same_call_same_example_and_splits_differ():
    a, b = make_example(3, "test"), make_example(3, "test")
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert torch.equal(a.answer, b.answer) and torch.equal(a.grid, b.grid)
    for split in ("train", "val"):
        other = make_example(3, split)
        assert not torch.equal(other.pixel_values, a.pixel_values)
    assert not torch.equal(make_example(3, "test", seed=1).grid, a.grid) or make_example(3, "test", seed=1).row != a.row


@given(index=st.integers(0, 10_000), split=st.sampled_from(["train", "test", "val"]))
def test_format_and_answer_is_the_asked_row_of_the_grid(index, split):
    example = make_example(index, split)
    ids = example.input_ids.tolist()
    assert ids[0] == VOCAB.bos and ids[1 : 1 + IMAGE_TOKENS] == [VOCAB.image] * IMAGE_TOKENS
    assert ids[-1] == VOCAB.row(example.row)
    body = ids[1 + IMAGE_TOKENS : -1]
    assert BODY_MIN <= len(body) <= BODY_MAX
    assert all(VOCAB.first_filler <= t < VOCAB.first_answer for t in body)  # fillers and glyph names only
    assert example.answer.tolist() == [VOCAB.answer(example.row, c, int(example.grid[example.row, c])) for c in range(GRID)]
    assert example.grid.shape == (GRID, GRID) and int(example.grid.min()) >= 0 and int(example.grid.max()) < NUM_GLYPHS
    # the answer cells' image tokens: 2 x 2 patches per cell, all image placeholders
    assert example.cells.shape == (GRID, 4) and all(ids[p] == VOCAB.image for p in example.cells.flatten().tolist())


def test_the_image_shows_the_grid_and_only_the_cells_changed_change():
    grid_a = torch.tensor([[i * GRID + j for j in range(GRID)] for i in range(GRID)]) % NUM_GLYPHS
    grid_b = grid_a.clone()
    grid_b[2, 1] = (grid_a[2, 1] + 3) % NUM_GLYPHS
    image_a, image_b = render_grid(grid_a, random.Random(0)), render_grid(grid_b, random.Random(0))
    changed = (image_a != image_b).any(0)
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert changed.any()
    assert rows.min() >= 2 * CELL_PIXELS and rows.max() < 3 * CELL_PIXELS  # cell (2, 1) only
    assert cols.min() >= 1 * CELL_PIXELS and cols.max() < 2 * CELL_PIXELS
    # foreground (glyph bits) brighter than background in every cell, despite the noise
    bits = GLYPHS[grid_a].permute(0, 2, 1, 3).reshape(GRID * 4, GRID * 4)
    mask = bits.repeat_interleave(2, 0).repeat_interleave(2, 1).bool()
    assert image_a.mean(0)[mask].mean() > image_a.mean(0)[~mask].mean() + 0.5


def test_glyph_classes_are_distinct_patterns():
    flat = GLYPHS.flatten(1)
    distance = (flat[:, None] != flat[None]).sum(-1)
    assert len(GLYPHS) == NUM_GLYPHS and int(distance[~torch.eye(NUM_GLYPHS, dtype=torch.bool)].min()) >= 5


def test_collate_labels_only_the_answer_and_bad_arguments():
    examples = [make_example(i) for i in range(3)]
    batch = collate(examples, with_answer=True)
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    for row, example in enumerate(examples):
        assert batch["labels"][row][batch["labels"][row] != -100].tolist() == example.answer.tolist()
    with pytest.raises(ValueError, match="split"):
        make_example(0, "dev")
    with pytest.raises(ValueError, match="body"):
        make_example(0, body=(5, 2))


def test_render_tokens_names_every_kind():
    example = make_example(0)
    text = render_tokens(example.input_ids)
    assert text.startswith(f"<bos> <img>x{IMAGE_TOKENS} ") and text.endswith(f" ROW{example.row}")
    assert token_name(VOCAB.answer(2, 1, 7)) == "r2c1:g7" and token_name(VOCAB.name(3)) == "g3"
    assert token_name(VOCAB.filler(4)) == "f04" and token_name(VOCAB.image) == "<img>"


def test_registry():
    assert DEFAULT_TASK == "lookup" and set(TASKS) == {"lookup", "grid"}
    assert get_task("grid").answer_tokens == GRID and get_task("lookup").answer_tokens == 2
    assert get_task("grid").data is grid
    with pytest.raises(ValueError, match=r"--task: unknown task 'nope': allowed lookup, grid"):
        get_task("nope", "--task")
    evalset = get_task("grid").eval_set(3)
    assert evalset.answer_tokens == GRID and evalset.answers.shape == (3, GRID)
    assert "glyph-grid" in evalset.description


def test_lookup_model_is_not_a_grid_model():
    from csp_compile.data.model import build_grid_model, build_model

    assert task_of_model(build_model()) is TASKS["lookup"]
    assert task_of_model(build_grid_model()) is TASKS["grid"]


@shipped
def test_shipped_weights_are_small_and_answer_from_the_image():
    from csp_compile.evaluation import run_full

    files = list(GRID_MODEL_DIR.glob("*.safetensors"))
    assert files and sum(f.stat().st_size for f in files) < 30 * 2**20
    task = get_task("grid")
    model = task.load_model()
    evalset = task.eval_set(64)
    outcome = run_full(model, evalset)
    assert float((outcome.tokens == evalset.answers).all(-1).float().mean()) >= 0.95
    # the same prompts with each other's images (rolled by one): the answers follow the image
    examples = grid.make_dataset(64, "test")
    swapped = dict(evalset.inputs, pixel_values=evalset.inputs["pixel_values"].roll(1, 0))
    with torch.no_grad():
        out = model.generate(**swapped, max_new_tokens=GRID, min_new_tokens=GRID, do_sample=False)[:, -GRID:]
    expected = torch.stack([
        torch.tensor([VOCAB.answer(e.row, c, int(examples[(i - 1) % 64].grid[e.row, c])) for c in range(GRID)])
        for i, e in enumerate(examples)])
    assert float((out == expected).all(-1).float().mean()) >= 0.9
    assert float((out == evalset.answers).all(-1).float().mean()) <= 0.1


@shipped
def test_eval_task_grid_reports_accuracy(tmp_path, capsys):
    import json

    out = tmp_path / "eval.json"
    assert main(["eval", "--task", "grid", "--policies", "full", "--budgets", "1.0", "--n", "4", "--json", str(out),
                 "--threads", "1"]) == 0
    payload = json.loads(out.read_text())
    assert payload["task"] == "grid" and "glyph-grid" in payload["data"]
    (record,) = payload["records"]
    assert record["policy"] == "full" and record["n"] == 4 and record["accuracy"] >= 0.75
    assert "glyph-grid" in capsys.readouterr().out


@shipped
@pytest.mark.slow
def test_eval_demo_and_show_kept_on_the_grid_task(tmp_path, capsys):
    assert main(["eval", "--task", "grid", "--policies", "csp,random", "--budgets", "0.2", "--n", "4",
                 "--threads", "1"]) == 0
    assert main(["demo", "--task", "grid", "--n", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "accuracy: full cache" in out and "4 x 4 grid" in out
    png = tmp_path / "kept.png"
    assert main(["show-kept", "--task", "grid", "--out", str(png), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG" and out.count("answer cells") == 4


@pytest.mark.parametrize("command", ["eval", "demo", "show-kept"])
def test_unknown_task_is_one_line_and_exit_2(command, capsys):
    assert main([command, "--task", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"csp-compile {command}: error: --task: unknown task 'nope': allowed lookup, grid"


def test_eval_task_of_another_model_is_one_line(task_model_dir, capsys):
    assert main(["eval", "--task", "grid", "--model", str(task_model_dir), "--policies", "full", "--n", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a model of the 'lookup' task: pass --task lookup" in err


def test_missing_grid_model_says_how_to_get_one(monkeypatch, tmp_path, capsys):
    import csp_compile.data.model as model_module

    monkeypatch.setattr(model_module, "GRID_MODEL_DIR", tmp_path / "grid_vlm")
    assert main(["demo", "--task", "grid"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train_grid_vlm.py" in err and "--model" in err and len(err.splitlines()) == 1

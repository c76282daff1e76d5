"""``csp-compile eval --prefill-chunk``: chunked-prefill rows next to the one-shot ones, and bad
chunk sizes -> exit code 2 with one line."""

import json

import pytest

from csp_compile.cli import main
from csp_compile.evaluation import parse_prefill_chunks

pytestmark = pytest.mark.slow  # compiles whole models: `pytest -m "not slow"` skips this module

ONE_SHOT_KEYS = {"policy", "budget", "accuracy", "kl", "top1_agreement", "kept_fraction", "kv_bytes_ratio", "n"}



def test_chunked_rows_follow_each_one_shot_row(task_model_dir, tmp_path, capsys):
    out, plot = tmp_path / "eval.json", tmp_path / "eval.png"
    # prompts are ~250 tokens: 16 splits them into ~16 chunks, 1000 leaves them whole (= one-shot)
    code = main(["eval", "--model", str(task_model_dir), "--policies", "csp", "--budgets", "0.2", "--n", "3",
                 "--prefill-chunk", "16,1000", "--json", str(out), "--plot", str(plot), "--threads", "1"])
    assert code == 0
    records = json.loads(out.read_text())["records"]
    assert [(r["policy"], r["budget"], r["prefill_chunk"]) for r in records] == [
        ("full", 1.0, None), ("csp", 0.2, None), ("csp (chunk 16)", 0.2, 16), ("csp (chunk 1000)", 0.2, 1000)]
    for record in records:
        assert set(record) == ONE_SHOT_KEYS | {"prefill_chunk"} and record["n"] == 3
    _, one_shot, chunk16, whole = records
    for chunked in (chunk16, whole):  # the same B of the real prompt tokens is left at the end
        assert chunked["kept_fraction"] == pytest.approx(one_shot["kept_fraction"], rel=1e-6)
        assert chunked["kv_bytes_ratio"] == pytest.approx(one_shot["kv_bytes_ratio"], rel=1e-6)
        assert 0.0 <= chunked["accuracy"] <= 1.0
    assert chunk16["kl"] > 0.0  # evicting after every chunk of 16 changes the answer distribution
    assert chunk16["kl"] != one_shot["kl"]  # the chunking was applied ...
    for metric in ("accuracy", "kl", "top1_agreement"):  # ... and a chunk longer than the prompt is one-shot
        assert whole[metric] == pytest.approx(one_shot[metric], rel=1e-4, abs=1e-6)
    table = capsys.readouterr().out
    assert "csp (chunk 16)" in table and "csp (chunk 1000)" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(
    "value, message",
    [
        ("0", "--prefill-chunk 0 is out of range"),
        ("16,-4", "--prefill-chunk -4 is out of range"),
        ("16,abc", "--prefill-chunk 'abc' is not an integer"),
        ("1.5", "--prefill-chunk '1.5' is not an integer"),
        ("32,32", "--prefill-chunk lists 32 more than once"),
        (" , ", "--prefill-chunk is empty"),
    ],
)
def test_bad_prefill_chunk_is_one_line_and_exit_2(value, message, task_model_dir, capsys):
    assert main(["eval", "--model", str(task_model_dir), "--prefill-chunk", value]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("csp-compile eval: error: ")
    assert message in err and "Traceback" not in err


def test_parse_prefill_chunks():
    assert parse_prefill_chunks(None) == []
    assert parse_prefill_chunks(" 64, 16 ,1") == [64, 16, 1]

"""The real-model evaluation: replayed selections against the eager oracle and the compiled pass,
the retrieval tasks' prompts, and ``eval``'s text-model path."""

import pytest
import torch

import csp_compile
from csp_compile import CSPConfig, select_kept
from csp_compile.cli import main
from csp_compile.evaluation.policy_spec import parse_policy
from csp_compile.real import prepare
from csp_compile.real.replay import ScoreCache, kept_positions, record_prefill, teacher_forced_logprobs
from csp_compile.real.tasks import REAL_TASKS, make_examples
from eager_oracle import evicting_generate
from test_text_models import VOCAB, tiny_text_lm

UNIFORM = [CSPConfig(budget=0.3, window=8), CSPConfig(policy="snapkv", budget=0.2, window=8),
           CSPConfig(policy="h2o", budget=0.3, window=4), CSPConfig(policy="streaming", budget=0.25, window=8)]
ADAPTIVE = [parse_policy("adakv").config(0.2, CSPConfig(window=8)), parse_policy("csp+pyramid").config(0.3, CSPConfig(window=8))]

needs_smollm2 = pytest.mark.skipif(not prepare.is_prepared(), reason="SmolLM2 is not prepared: "
                                   f"{prepare.INSTALL_HINT} && csp-compile prepare smollm2")


def prompt(length: int = 80, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def logprobs_of(out) -> torch.Tensor:
    return torch.stack([torch.log_softmax(step[0].float(), -1) for step in out.logits])


@pytest.mark.parametrize("config", UNIFORM, ids=lambda c: c.policy)
def test_replay_equals_the_eager_oracle(config):
    """Kept positions and every decoded step's log-probabilities equal the plain model + reference
    selection + pruned DynamicCache of the oracle, on the oracle's own greedy tokens."""
    model, ids = tiny_text_lm("llama"), prompt()
    out, kept = evicting_generate(model, {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(),
                                                                                               dtype=torch.long)}, config, 5)
    record = record_prefill(model, ids)
    mine = kept_positions(ScoreCache(record), config)
    for oracle_layer, replay_layer in zip(kept, mine):
        assert torch.equal(torch.sort(oracle_layer[0], -1).values, torch.sort(replay_layer, -1).values)
    tokens = out.sequences[0, ids.numel():]
    replayed = teacher_forced_logprobs(model, record, [mine], tokens)[0]
    torch.testing.assert_close(replayed, logprobs_of(out), atol=2e-5, rtol=0)


def test_configs_batched_equal_configs_alone():
    """Row c of a batched replay (configs keeping different slot counts per layer and head) equals c alone."""
    model, ids = tiny_text_lm("qwen2"), prompt(96, seed=1)
    record = record_prefill(model, ids)
    scores = ScoreCache(record)
    configs = UNIFORM + ADAPTIVE
    kept = [kept_positions(scores, config) for config in configs]
    widths = {tuple(layer.shape[-1] for layer in rows) for rows in kept}
    assert len(widths) > 1 and any(bool((layer < 0).any()) for rows in kept for layer in rows)
    answer = prompt(4, seed=2)
    batched = teacher_forced_logprobs(model, record, kept, answer)
    for c, rows in enumerate(kept):
        torch.testing.assert_close(batched[c], teacher_forced_logprobs(model, record, [rows], answer)[0], atol=2e-5,
                                   rtol=0)


def test_scores_are_shared_across_budgets_and_match_select_kept():
    model, ids = tiny_text_lm("llama"), prompt(64, seed=3)
    record = record_prefill(model, ids)
    scores = ScoreCache(record)
    for policy in ("csp", "h2o", "random"):
        for budget in (0.1, 0.25, 0.5):
            config = CSPConfig(policy=policy, budget=budget, window=6)
            for layer, rows in enumerate(kept_positions(scores, config)):
                direct = select_kept(record.queries[layer], record.keys[layer], record.modality, config,
                                     scale=record.scales[layer], layer=(layer, len(record.keys)))
                assert torch.equal(rows, direct.indices[0])
    assert len(scores._scores) == 3  # one score computation per policy, whatever the budget


def test_text_only_identities():
    """With every token text, CSP's give-back variant is CSP and LOOK-M's text prior is H2O."""
    generator = torch.Generator().manual_seed(4)
    query, key = torch.randn(1, 4, 50, 16, generator=generator), torch.randn(1, 2, 50, 16, generator=generator)
    text = torch.zeros(1, 50, dtype=torch.long)
    for a, b in (("csp", "csp_giveback"), ("h2o", "lookm_text_prior")):
        config = CSPConfig(policy=a, budget=0.3, window=6)
        assert torch.equal(select_kept(query, key, text, config).indices,
                           select_kept(query, key, text, config.replace(policy=b)).indices)


@pytest.mark.slow
@pytest.mark.parametrize("config", ADAPTIVE, ids=("adakv", "csp+pyramid"))
def test_replay_equals_the_compiled_pass_with_adaptive_budgets(config):
    """Per-head and per-layer budgets (empty slots) replay to the compiled pass's kept positions and logits."""
    model, ids = tiny_text_lm("llama"), prompt(90, seed=5)
    inputs = {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long)}
    csp_compile.optimize(model, config)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        compiled_kept = csp_compile.kept_positions(model)
    finally:
        csp_compile.restore(model)
    record = record_prefill(model, ids)
    mine = kept_positions(ScoreCache(record), config)
    for theirs, ours in zip(compiled_kept, mine):
        valid = theirs[0][theirs[0] >= 0]
        assert torch.equal(torch.sort(valid.reshape(-1)).values, torch.sort(ours[ours >= 0].reshape(-1)).values)
    replayed = teacher_forced_logprobs(model, record, [mine], out.sequences[0, ids.numel():])[0]
    torch.testing.assert_close(replayed, logprobs_of(out), atol=1e-4, rtol=0)


@needs_smollm2
@pytest.mark.parametrize("task", list(REAL_TASKS))
def test_task_prompts_hit_their_length_and_mark_the_needle(task):
    from csp_compile.data.model import load_tokenizer

    tokenizer = load_tokenizer(prepare.prepared_dir())
    examples = make_examples(REAL_TASKS[task], tokenizer, 1024, 4)
    assert sorted(round(e.depth, 3) for e in examples) == [0.125, 0.375, 0.625, 0.875]
    for example in examples:
        assert 1024 - 24 <= example.input_ids.numel() <= 1024
        start, stop = example.needle_spans[0]
        assert tokenizer.decode(example.input_ids[start:stop]) == example.value
        assert abs(start / example.input_ids.numel() - example.depth) < 0.15
        assert tokenizer.decode(example.answer) == " " + example.value
        text = tokenizer.decode(example.input_ids)
        assert text.startswith("<|im_start|>system") and "<|im_start|>assistant\n" in text
    again = make_examples(REAL_TASKS[task], tokenizer, 1024, 4)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(examples, again))
    assert len({e.value for e in examples}) == 4


@needs_smollm2
@pytest.mark.slow
def test_replay_equals_the_eager_oracle_on_smollm2():
    import transformers

    from csp_compile.data.model import load_tokenizer

    directory = prepare.prepared_dir()
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                              attn_implementation="sdpa").eval()
    example = make_examples(REAL_TASKS["passkey"], load_tokenizer(directory), 1024, 2)[1]
    ids = example.input_ids
    config = CSPConfig(budget=0.2, window=32)
    out, kept = evicting_generate(model, {"input_ids": ids[None], "attention_mask": torch.ones(1, ids.numel(),
                                                                                               dtype=torch.long)}, config, 6)
    record = record_prefill(model, ids)
    mine = kept_positions(ScoreCache(record), config)
    assert all(torch.equal(torch.sort(a[0], -1).values, torch.sort(b, -1).values) for a, b in zip(kept, mine))
    replayed = teacher_forced_logprobs(model, record, [mine], out.sequences[0, ids.numel():])[0]
    torch.testing.assert_close(replayed, logprobs_of(out), atol=2e-4, rtol=0)


def test_eval_text_task_errors_are_one_line(capsys, task_model_dir):
    assert main(["eval", "--task", "passkey"]) == 2
    assert "needs a text model: --model smollm2" in capsys.readouterr().err
    assert main(["eval", "--task", "passkey", "--model", str(task_model_dir)]) == 2
    assert "needs a text-only causal LM" in capsys.readouterr().err
    assert main(["eval", "--task", "passkey", "--model", str(task_model_dir), "--lengths", "1k"]) == 2
    assert "--lengths: expected comma-separated ints >= 64, got '1k'" in capsys.readouterr().err


@needs_smollm2
def test_eval_log_resumes_and_max_minutes_stops(tmp_path, monkeypatch):
    """Scored prompts go to the log one line each; a second run reuses them instead of scoring again,
    and a run out of time reports the prompts it scored."""
    import transformers

    from csp_compile.data.model import load_tokenizer
    from csp_compile.real import evaluate as real_evaluate

    tokenizer = load_tokenizer(prepare.prepared_dir())
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    kwargs = dict(lengths=[256, 320], n=3, specs=[parse_policy("csp"), parse_policy("snapkv")], budgets=[0.2],
                  windows=[8], log=tmp_path / "log.jsonl")
    first = real_evaluate.evaluate_real(model, tokenizer, REAL_TASKS["passkey"], **kwargs)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 6
    assert {(r["length"], r["n"]) for r in first} == {(256, 3), (320, 3)} and len(first) == 2 * 3
    monkeypatch.setattr(real_evaluate, "example_scores", lambda *a: pytest.fail("a logged prompt was scored again"))
    assert real_evaluate.evaluate_real(model, tokenizer, REAL_TASKS["passkey"], **kwargs) == first
    stopped = real_evaluate.evaluate_real(model, tokenizer, REAL_TASKS["passkey"], **{**kwargs, "n": 4, "log": None},
                                          max_minutes=1e-9)
    assert stopped == []


def test_results_tables_in_the_docs_equal_their_json():
    """Every generated table block in the README and docs/ equals what its committed JSON gives."""
    from pathlib import Path

    from csp_compile.evaluation.doc_tables import render

    root = Path(__file__).resolve().parents[1]
    files = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    blocks = 0
    for file in files:
        text = file.read_text()
        blocks += text.count("<!-- table: ")
        assert render(text, root) == text, f"{file.name}: run python -m csp_compile.evaluation.doc_tables {file.name}"
    assert blocks >= 2


def test_doc_table_blocks_are_regenerated_from_their_json(tmp_path):
    import json

    from csp_compile.evaluation.doc_tables import render

    records = [{"task": "passkey", "length": 2048, "policy": "full", "window": None, "budget": 1.0, "accuracy": 0.5,
                "n": 4},
               {"task": "passkey", "length": 2048, "policy": "csp", "window": 32, "budget": 0.2, "accuracy": 0.25,
                "n": 4}]
    (tmp_path / "r.json").write_text(json.dumps({"records": records}))
    stale = "x\n<!-- table: eval r.json window=32 metric=accuracy -->\n| old |\n<!-- /table -->\ny\n"
    fresh = render(stale, tmp_path)
    assert "| old |" not in fresh and "| full cache | 0.50 |" in fresh and "| csp | 0.25 |" in fresh
    assert fresh.startswith("x\n<!-- table: eval r.json") and fresh.endswith("<!-- /table -->\ny\n")
    assert render(fresh, tmp_path) == fresh


def test_task_table_blocks_are_regenerated_from_their_json(tmp_path):
    import json

    from csp_compile.evaluation.doc_tables import render

    records = [{"policy": "full", "budget": 1.0, "prefill_chunk": None, "accuracy": 1.0, "n": 200},
               {"policy": "csp", "budget": 0.1, "prefill_chunk": None, "accuracy": 0.04, "n": 200},
               {"policy": "csp", "budget": 0.2, "prefill_chunk": None, "accuracy": 0.155, "n": 200},
               {"policy": "csp", "budget": 0.2, "prefill_chunk": 32, "accuracy": 0.9, "n": 200}]
    (tmp_path / "t.json").write_text(json.dumps({"records": records}))
    fresh = render("<!-- table: task t.json metric=accuracy -->\n| old |\n<!-- /table -->\n", tmp_path)
    assert "| old |" not in fresh and "| policy | b0.1 | b0.2 |" in fresh
    assert "| full cache | 1.000 | 1.000 |" in fresh and "| csp | 0.040 | 0.155 |" in fresh and "0.900" not in fresh
    assert render(fresh, tmp_path) == fresh

"""The shipped model's synthetic task: deterministic, split-separated, answers really in the prompt."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from csp_compile.data import IMAGE_TOKENS, NUM_RECORDS, VOCAB, collate, make_example, render_tokens, token_name
from csp_compile.data.lookup import NUM_KEYS, NUM_VALUES


def test_same_call_same_example_and_splits_differ():
    a, b = make_example(3, "test"), make_example(3, "test")
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.pixel_values, b.pixel_values)
    assert not torch.equal(make_example(3, "train").input_ids, a.input_ids)


@given(index=st.integers(0, 10_000), split=st.sampled_from(["train", "test", "val"]),
       records=st.integers(1, NUM_RECORDS))
def test_answer_is_the_values_of_the_shown_keys_records(index, split, records):
    example = make_example(index, split, num_records=records)
    ids = example.input_ids.tolist()
    assert ids[0] == VOCAB.bos and ids[1 : 1 + IMAGE_TOKENS] == [VOCAB.image] * IMAGE_TOKENS and ids[-1] == VOCAB.query
    a_value, b_value = (int(t) for t in example.answer)
    assert VOCAB.first_a <= a_value < VOCAB.first_b <= b_value < VOCAB.first_filler
    a_record = VOCAB.a_record(example.key, a_value - VOCAB.first_a)
    b_record = VOCAB.b_record(example.key, b_value - VOCAB.first_b)
    assert ids.count(a_record) == 1 and ids.count(b_record) == 1
    assert example.record.tolist() == [ids.index(a_record), ids.index(b_record)]
    a_keys = [divmod(t - VOCAB.first_a_record, NUM_VALUES)[0] for t in ids if VOCAB.first_a_record <= t < VOCAB.first_b_record]
    b_keys = [divmod(t - VOCAB.first_b_record, NUM_VALUES)[0] for t in ids if VOCAB.first_b_record <= t < VOCAB.image]
    assert sorted(a_keys) == sorted(b_keys) and len(set(a_keys)) == records == len(a_keys)
    assert example.key in a_keys


def test_other_tasks_and_bad_arguments():
    name = make_example(0, task="name")
    assert name.answer.tolist() == [VOCAB.key(name.key)] and name.input_ids[-1] == VOCAB.name
    drill = make_example(0, task="drill", num_records=4)
    assert VOCAB.image not in drill.input_ids.tolist() and drill.scored.tolist()[:3] == [False, True, True]
    with pytest.raises(ValueError, match="split"):
        make_example(0, "dev")
    with pytest.raises(ValueError, match="task"):
        make_example(0, task="caption")
    with pytest.raises(ValueError, match="num_records"):
        make_example(0, num_records=NUM_KEYS + 1)


def test_collate_left_pads_and_labels_only_the_answer():
    examples = [make_example(i, num_records=r) for i, r in enumerate([2, 5])]
    batch = collate(examples, with_answer=True)
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][0, 0] == 0
    for row, example in enumerate(examples):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        assert labelled.tolist() == example.answer.tolist()


def test_render_tokens_names_every_kind():
    text = render_tokens(make_example(0).input_ids)
    assert text.startswith(f"<bos> <img>x{IMAGE_TOKENS} ") and text.endswith(" ?")
    assert token_name(VOCAB.a(3)) == "a03" and token_name(VOCAB.b(12)) == "b12" and token_name(VOCAB.key(0)) == "k00"
    assert token_name(VOCAB.b_record(5, 7)) == "k05=b07"

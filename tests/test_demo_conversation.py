"""The demo's two-turn conversation on the shipped tiny VLM: the question asked again is answered from
the records (full cache: right, equal to a recomputation without cache, not copied from the history);
CSP "evict" re-selects B of the tokens seen, "append" grows by exactly the new tokens."""

import pytest
import torch

from csp_compile import CSPConfig, resolve_budget
from csp_compile.data import VOCAB
from csp_compile.data.model import SHIPPED_MODEL_DIR, load_model
from csp_compile.evaluation import task_eval_set
from csp_compile.evaluation.conversation import (
    CHATTER,
    recomputed_second_answers,
    run_conversation,
    second_turn_inputs,
    wrong_answers,
)
from csp_compile.data.lookup import ANSWER_TOKENS

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (SHIPPED_MODEL_DIR / "config.json").is_file(),
                                reason="no tiny VLM shipped in this checkout")]

PROMPTS = 3
NEW_TOKENS = 1 + CHATTER + 1 + (ANSWER_TOKENS - 1)  # turn 1's last answer token, chatter, "?", turn 2's decoded


@pytest.fixture(scope="module")
def model():
    return load_model()


@pytest.fixture(scope="module")
def evalset():
    return task_eval_set(PROMPTS)


@pytest.fixture(scope="module")
def full(model, evalset):
    return run_conversation(model, evalset)


@pytest.fixture(autouse=True)
def default_stance():
    yield
    torch.compiler.set_stance("default")


def test_second_turn_inputs_append_chatter_and_question(evalset):
    inputs = evalset.inputs
    sequences = torch.cat([inputs["input_ids"], evalset.answers], dim=1)
    turn2 = second_turn_inputs(inputs, sequences, chatter=5, seed=3)
    width = sequences.shape[1]
    assert torch.equal(turn2["input_ids"][:, :width], sequences)
    assert turn2["input_ids"].shape[1] == width + 6
    assert (turn2["input_ids"][:, -1] == VOCAB.query).all()
    assert torch.equal(turn2["attention_mask"][:, :inputs["input_ids"].shape[1]], inputs["attention_mask"])
    assert (turn2["attention_mask"][:, inputs["input_ids"].shape[1]:] == 1).all()
    assert torch.equal(second_turn_inputs(inputs, sequences, chatter=5, seed=3)["input_ids"], turn2["input_ids"])


def test_full_cache_answers_turn_two_from_the_records(model, evalset, full):
    assert torch.equal(full.first.tokens, evalset.answers)
    assert torch.equal(full.second.tokens, evalset.answers)
    # the cached conversation equals one prefill of the whole conversation without a cache
    assert torch.equal(recomputed_second_answers(model, evalset, full.first.tokens), full.second.tokens)
    # turn 2 reads the records: a wrong turn-1 answer in the history does not change it
    decoy = wrong_answers(evalset.answers)
    assert not (decoy == evalset.answers).any()
    assert torch.equal(recomputed_second_answers(model, evalset, decoy), evalset.answers)
    # the full cache holds every token it saw
    assert torch.equal(full.second.slots, full.second.seen)
    assert torch.equal(full.second.seen - full.first.seen, torch.full((PROMPTS,), NEW_TOKENS))
    assert full.second.logical == full.second.physical == full.turn2_inputs["input_ids"].shape[1] + ANSWER_TOKENS - 1


def test_csp_evict_stays_within_budget_and_append_grows_by_the_new_tokens(model, evalset, full):
    config = CSPConfig()
    evict = run_conversation(model, evalset, config.replace(on_new_turn="evict"))
    append = run_conversation(model, evalset, config.replace(on_new_turn="append"))
    decoded = ANSWER_TOKENS - 1
    prompt = evalset.inputs["attention_mask"].sum(-1)

    for conversation in (evict, append):  # turn 1 does not depend on on_new_turn
        assert torch.equal(conversation.first.tokens, full.first.tokens)
        assert torch.equal(conversation.first.seen, full.first.seen)
        assert conversation.first.logical == full.first.logical
        turn1 = torch.tensor([resolve_budget(int(n), config)[0] for n in prompt]) + decoded
        assert torch.equal(conversation.first.slots, turn1)
        assert conversation.first.physical == int(turn1.max())  # the slot axis of the cache tensors
        assert torch.equal(conversation.second.seen, full.second.seen)
        assert conversation.second.logical == full.second.logical

    # evict: B of the tokens seen at the turn-2 prefill, then the decoded tokens
    at_prefill = evict.second.seen - decoded
    bound = torch.tensor([resolve_budget(int(n), config)[0] for n in at_prefill]) + decoded
    assert torch.equal(evict.second.slots, bound)
    assert evict.second.physical == int(bound.max())
    assert (evict.second.slots - evict.first.slots < NEW_TOKENS).all()
    # append: turn 1's pruned cache plus exactly the new tokens
    assert torch.equal(append.second.slots - append.first.slots, torch.full((PROMPTS,), NEW_TOKENS))
    assert append.second.physical - append.first.physical == append.second.logical - append.first.logical == NEW_TOKENS
    # both answer turn 2 from the pruned cache like the full cache on these prompts
    assert torch.equal(evict.second.tokens, full.second.tokens)
    assert torch.equal(append.second.tokens, full.second.tokens)

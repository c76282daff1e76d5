import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from csp_compile import CSPConfig, available_policies

INVALID = [
    ("budget", 0),
    ("budget", -3),
    ("budget", 0.0),
    ("budget", 1.5),
    ("budget", float("nan")),
    ("budget", True),
    ("budget", "0.2"),
    ("window", 0),
    ("window", 2.0),
    ("window", False),
    ("cross_ratio", -0.1),
    ("cross_ratio", 1.01),
    ("cross_ratio", float("nan")),
    ("cross_ratio", "popularity"),
    ("cross_ratio", None),
    ("n", -1e-9),
    ("n", float("inf")),
    ("n", "1"),
    ("policy", "snap"),
    ("policy", None),
    ("sink_tokens", -1),
    ("pool_kernel", 4),
    ("pool_kernel", 0),
    ("seed", -1),
    ("on_new_turn", "forget"),
    ("on_new_turn", None),
    ("decode_budget", 0),
    ("decode_budget", 1.5),
    ("decode_budget", "64"),
    ("decode_every", 0),
    ("decode_every", 2.0),
    ("prefill_chunk", 0),
    ("prefill_chunk", 64.0),
    ("prefill_chunk", True),
]


@pytest.mark.parametrize(("field", "value"), INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_field_raises_naming_field_and_value(field, value):
    with pytest.raises(ValueError) as excinfo:
        CSPConfig(**{field: value})
    message = str(excinfo.value)
    assert f"CSPConfig.{field}=" in message
    assert repr(value) in message
    assert "allowed" in message


def test_defaults():
    config = CSPConfig()
    assert (config.budget, config.window, config.cross_ratio, config.n, config.policy) == (0.2, 32, "auto", 1.0, "csp")


def test_unknown_policy_lists_known_ones():
    with pytest.raises(ValueError) as excinfo:
        CSPConfig(policy="nope")
    for name in available_policies():
        assert name in str(excinfo.value)


def test_frozen_and_keyword_only():
    config = CSPConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.budget = 0.5
    with pytest.raises(TypeError):
        CSPConfig(0.5)


def test_replace_validates_and_rejects_unknown_fields():
    config = CSPConfig()
    assert config.replace(budget=64).budget == 64
    with pytest.raises(ValueError, match="CSPConfig.window"):
        config.replace(window=0)
    with pytest.raises(ValueError, match="no field"):
        config.replace(bugdet=0.3)


@given(
    budget=st.one_of(st.floats(min_value=1e-6, max_value=1.0), st.integers(min_value=1, max_value=10**6)),
    window=st.integers(min_value=1, max_value=4096),
    cross_ratio=st.one_of(st.floats(min_value=0, max_value=1), st.sampled_from(["auto", "population", "mass"])),
    n=st.floats(min_value=0, max_value=1e6),
    policy=st.sampled_from(available_policies()),
)
def test_valid_values_are_accepted(budget, window, cross_ratio, n, policy):
    config = CSPConfig(budget=budget, window=window, cross_ratio=cross_ratio, n=n, policy=policy)
    assert config.budget == budget and isinstance(config.n, float) and math.isfinite(config.n)


@given(st.one_of(st.floats(allow_nan=True), st.integers(), st.text(max_size=3), st.none(), st.booleans()))
def test_fuzzed_budget_is_accepted_or_rejected_cleanly(value):
    valid = (isinstance(value, int) and not isinstance(value, bool) and value >= 1) or (
        isinstance(value, float) and 0 < value <= 1
    )
    if valid:
        assert CSPConfig(budget=value).budget == value
    else:
        with pytest.raises(ValueError, match="CSPConfig.budget"):
            CSPConfig(budget=value)


@given(st.one_of(st.none(), st.floats(allow_nan=True), st.integers(-5, 10**6), st.text(max_size=3), st.booleans()),
       st.one_of(st.integers(-5, 100), st.floats(), st.none()),
       st.one_of(st.none(), st.integers(-5, 10**6), st.floats(), st.booleans()))
def test_fuzzed_conversation_fields_are_accepted_or_rejected_cleanly(decode_budget, decode_every, prefill_chunk):
    try:
        config = CSPConfig(decode_budget=decode_budget, decode_every=decode_every, prefill_chunk=prefill_chunk)
    except ValueError as error:
        assert any(name in str(error) for name in ("decode_budget", "decode_every", "prefill_chunk"))
        return
    assert config.decode_every >= 1 and (config.prefill_chunk is None or config.prefill_chunk >= 1)
    if config.decode_budget is not None:
        assert config.decode_config.budget == config.decode_budget and config.decode_config.decode_budget is None

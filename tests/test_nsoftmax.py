import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from csp_compile import n_softmax

finite = st.floats(min_value=-30, max_value=30, allow_nan=False)
rows = st.lists(st.one_of(finite, st.just(float("-inf"))), min_size=1, max_size=12)
n_values = st.floats(min_value=0, max_value=100, allow_nan=False)


def direct(row: list[float], n: float) -> list[float]:
    """exp(x_i) / (n + sum_j exp(x_j)) in float64, straight from the definition."""
    exps = [math.exp(v) for v in row]
    denom = n + math.fsum(exps)
    return [e / denom if denom > 0 else 0.0 for e in exps]


@given(rows, n_values)
def test_matches_direct_formula_in_float64(row, n):
    got = n_softmax(torch.tensor(row, dtype=torch.float64), n=n)
    expected = torch.tensor(direct(row, n), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@given(st.lists(finite, min_size=1, max_size=12))
def test_n_zero_is_softmax(row):
    x = torch.tensor(row, dtype=torch.float32)
    assert torch.equal(n_softmax(x, n=0.0), torch.softmax(x, dim=-1))


@given(st.lists(finite, min_size=1, max_size=12), n_values, n_values)
def test_non_increasing_in_n(row, n1, n2):
    x = torch.tensor(row, dtype=torch.float64)
    small, large = sorted((n1, n2))
    assert bool((n_softmax(x, n=large) <= n_softmax(x, n=small) + 1e-15).all())


@given(st.lists(finite, min_size=1, max_size=12), st.floats(min_value=1e-3, max_value=100))
def test_row_sum_is_below_one_by_the_n_share(row, n):
    x = torch.tensor(row, dtype=torch.float64)
    total = n_softmax(x, n=n).sum()
    lse = torch.logsumexp(x, 0)
    torch.testing.assert_close(total, torch.sigmoid(lse - math.log(n)))


@pytest.mark.parametrize("n", [0.0, 1.0, 5.0])
def test_fully_masked_rows_give_zeros(n):
    x = torch.randn(3, 5)
    x[1] = float("-inf")
    out = n_softmax(x, n=n)
    assert not out.isnan().any()
    assert torch.equal(out[1], torch.zeros(5))
    assert bool((out[0] > 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_round_trip(dtype):
    x = torch.randn(4, 7, dtype=torch.float32).to(dtype)
    out = n_softmax(x, n=1.0)
    assert out.dtype == dtype
    expected = n_softmax(x.to(torch.float64), n=1.0).to(dtype)
    torch.testing.assert_close(out, expected)


def test_half_inputs_are_computed_in_float32():
    x = torch.full((300,), -2.0, dtype=torch.float16)  # fp16 summation of 300 exps would drift
    expected = n_softmax(x.double(), n=1.0).to(torch.float16)
    torch.testing.assert_close(n_softmax(x, n=1.0), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_dim_argument(dim):
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    moved = n_softmax(x.movedim(dim, -1), n=2.0).movedim(-1, dim)
    torch.testing.assert_close(n_softmax(x, n=2.0, dim=dim), moved)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "1"])
def test_invalid_n_raises(bad):
    with pytest.raises(ValueError, match="n="):
        n_softmax(torch.zeros(3), n=bad)


def test_integer_input_raises():
    with pytest.raises(ValueError, match="dtype"):
        n_softmax(torch.zeros(3, dtype=torch.int64))


@given(st.lists(rows, min_size=1, max_size=4).filter(lambda r: len({len(x) for x in r}) == 1), n_values)
def test_from_a_given_lse_equals_n_softmax(block, n):
    """What the prefill graph computes from the attention kernel's log-sum-exp equals ``n_softmax``."""
    from csp_compile.nsoftmax import n_softmax_from_lse

    x = torch.tensor(block, dtype=torch.float64)
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    torch.testing.assert_close(n_softmax_from_lse(x, lse, n), n_softmax(x, n=n), rtol=1e-12, atol=1e-15)

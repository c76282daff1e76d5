"""The prefill-overhead figures pooled over processes (``bench.overhead``): the arithmetic on known
rounds, and the settings a child process receives."""

from __future__ import annotations

import statistics

import pytest
import torch
from hypothesis import given, settings, strategies as st

from csp_compile.bench import BenchSettings, QUICK_SHAPE, overhead


def _rounds(plain: list[float], factor: dict[str, list[float]]) -> overhead.Rounds:
    """One process's rounds of one case (text/64): plain's seconds, every other variant's as plain x factor."""
    rounds = {"plain/text/64": plain}
    for name in overhead.VARIANTS[1:]:
        rounds[f"{name}/text/64"] = [p * f for p, f in zip(plain, factor[name])]
    return rounds


positive = st.floats(0.5, 2.0, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.data())
def test_each_case_is_the_median_of_the_ratios_within_rounds_pooled_over_processes(processes, repeats, data):
    per_process, expected = [], {name: [] for name in overhead.VARIANTS[1:]}
    for _ in range(processes):
        plain = data.draw(st.lists(positive, min_size=repeats, max_size=repeats))
        factor = {name: data.draw(st.lists(positive, min_size=repeats, max_size=repeats))
                  for name in overhead.VARIANTS[1:]}
        per_process.append(_rounds(plain, factor))
        for name in expected:
            expected[name].append(factor[name])
    figures = overhead.overhead_figures(per_process)

    for name in ("csp", "snapkv"):
        pooled = statistics.median(f for process in expected[name] for f in process)
        assert figures["prefill_overhead_cases"][f"{name}/text/64"] == pytest.approx(pooled)
        by_process = [statistics.median(process) for process in expected[name]]
        assert figures["prefill_overhead_by_process"][f"{name}/text/64"] == pytest.approx(by_process)
    noise = statistics.median(f for process in expected["plain_copy"] for f in process)
    assert figures["prefill_noise_cases"] == {"text/64": pytest.approx(noise)}
    assert figures["prefill_noise_worst"] == pytest.approx(abs(noise - 1))
    worst = max(figures["prefill_overhead_cases"].values())
    assert figures["prefill_overhead_ratio"] == worst
    assert figures["prefill_overhead_cases"][figures["prefill_overhead_worst_case"]] == worst


def test_one_unlucky_process_moves_the_pooled_figure_less_than_its_own_ratio():
    fair = _rounds([1.0, 1.0], {"csp": [1.01, 1.01], "snapkv": [1.01, 1.01], "plain_copy": [1.0, 1.0]})
    unlucky = _rounds([1.0, 1.0], {"csp": [1.05, 1.05], "snapkv": [1.01, 1.01], "plain_copy": [1.0, 1.0]})
    figures = overhead.overhead_figures([fair, unlucky, fair])
    assert figures["prefill_overhead_by_process"]["csp/text/64"] == pytest.approx([1.01, 1.05, 1.01])
    assert figures["prefill_overhead_cases"]["csp/text/64"] == pytest.approx(1.01)


def test_a_child_process_gets_the_settings_that_shape_the_timing():
    sent = BenchSettings(shape=QUICK_SHAPE.replace(num_hidden_layers=1), prompt=192, long_prompt=256, chunk_prompt=512,
                         prefill_chunk=64, image_share=0.25, budget=0.1, window=16, prefill_repeats=3,
                         overhead_processes=2, threads=1, dtype=torch.float32)
    received = overhead._settings_from_json(overhead._settings_json(sent))
    for name in ("shape", "prompt", "long_prompt", "image_share", "budget", "window", "prefill_repeats", "device",
                 "threads", "dtype"):
        assert getattr(received, name) == getattr(sent, name), name


def test_bad_process_count_is_a_clear_error():
    with pytest.raises(ValueError, match="overhead-processes=0"):
        BenchSettings(overhead_processes=0)

"""The prompt-token budget of a step (``serving.schedule.ChunkBudget``): pure logic, synthetic step times."""

from __future__ import annotations

import pytest

from serving.schedule import ChunkBudget


def _cpu_like(budget: ChunkBudget, steps: int, decode_s=0.070, token_s=0.0012) -> list[int]:
    """Drive the budget with a device where a step costs ``decode_s`` plus ``token_s`` per prompt token."""
    for _ in range(5):
        budget.observe(decode_s, decoding=4, prompt_tokens=0)
    chunks = []
    for _ in range(steps):
        k = budget.tokens(decoding=4)
        chunks.append(k)
        budget.observe(decode_s + token_s * k, decoding=4, prompt_tokens=k)
    return chunks


def test_the_budget_holds_a_step_to_the_slowdown_once_measured():
    chunks = _cpu_like(ChunkBudget(cap=256, slowdown=2.0), 10)
    assert chunks[0] == 16  # nothing measured yet: the floor
    assert chunks[-1] == int(0.070 / 0.0012)  # (2 - 1) × 70 ms / 1.2 ms = 58 tokens
    assert 0.070 + 0.0012 * chunks[-1] <= 2.0 * 0.070


def test_a_device_where_tokens_are_cheap_gets_the_cap():
    """On a GPU a decode step is bound by reading the weights: hundreds of prompt tokens ride along."""
    chunks = _cpu_like(ChunkBudget(cap=256, slowdown=1.8), 5, decode_s=0.020, token_s=0.00002)
    assert chunks[-1] == 256


def test_no_decoding_rows_no_slowdown_or_no_measurement():
    budget = ChunkBudget(cap=256, slowdown=1.8)
    assert budget.tokens(decoding=0) == 256  # nobody waits on the step: prefill the whole cap
    assert budget.tokens(decoding=3) == 16  # no decode step measured yet
    budget.observe(0.5, decoding=3, prompt_tokens=100)  # ignored: nothing to compare it with
    assert budget.prompt_token_s is None
    assert ChunkBudget(cap=256, slowdown=None).tokens(decoding=3) == 256  # off: the fixed chunk
    assert ChunkBudget(cap=4).tokens(decoding=3) == 4  # the floor never exceeds the cap


def test_one_slow_step_does_not_skew_the_decode_time_and_costs_grow_with_the_prompt():
    budget = ChunkBudget(cap=256, slowdown=2.0)
    for s in (0.070, 0.071, 0.069, 0.5, 0.070):  # the cache grew once
        budget.observe(s, decoding=4, prompt_tokens=0)
    assert budget.decode_step_s == pytest.approx(0.070)
    for per_token in (0.0010, 0.0011, 0.0012):  # the prompt's tokens cost more as its prefix grows
        budget.observe(0.070 + 40 * per_token, decoding=4, prompt_tokens=40)
    assert budget.prompt_token_s == pytest.approx(0.0012)  # the latest, largest: holds for the next step
    assert budget.tokens(decoding=4) == int(0.070 / 0.0012)


def test_a_slowdown_of_one_or_less_is_refused():
    with pytest.raises(ValueError, match="slowdown must be > 1"):
        ChunkBudget(cap=256, slowdown=1.0)

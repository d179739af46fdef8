"""The planner against the resident peak of real training steps on this machine (see benchmarks/memory.py)."""

from __future__ import annotations

import pytest

from benchmarks.memory import LIVE_MALLOC, _measure, planned


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_planner_within_15_percent_of_measured_smollm2(method):
    """SmolLM2-135M, 3 AdamW steps on 4 × 128-token batches, in a fresh process whose glibc returns
    freed blocks at once (so the resident set is the live memory the planner models)."""
    raw = {
        "model": {"base": "smollm2-135m"},
        "method": {"name": method, "r": 16, "dropout": 0.0},
        "data": {"max_length": 128},
        "train": {"micro_batch_size": 4},
    }
    measured = _measure(raw, LIVE_MALLOC)["measured"]
    assert abs(planned(raw) / measured - 1) < 0.15, (planned(raw) / 2**20, measured / 2**20)

"""The line a job logs for a placement group that waits (cluster/waits.py): pure."""

from __future__ import annotations

from cluster.waits import describe_wait


def test_a_waiting_group_names_what_it_asks_why_and_what_is_free():
    group = {
        "bundles": {"0": {"CPU": 1.0}, "1": {"CPU": 1.0}, "2": {"CPU": 1.0, "GPU": 1.0}},
        "strategy": "SPREAD",
        "state": "PENDING",
        "stats": {"scheduling_state": "NO_RESOURCES"},
    }
    line = describe_wait(group, 61.4, {"CPU": 0.5}, {"CPU": 2.0, "GPU": 1.0, "memory": 1e9})
    assert line == (
        "[raypeft] waiting 61s for the cluster: a placement group asks CPU 1 ×2; CPU 1, GPU 1 ×1 (SPREAD), "
        "Ray says NO_RESOURCES; free now: CPU 0.5 of 2, GPU 0 of 1"
    )


def test_an_infeasible_group_says_no_node_could_hold_it():
    group = {"bundles": {"0": {"CPU": 64.0}}, "state": "PENDING", "stats": {"scheduling_state": "INFEASIBLE"}}
    line = describe_wait(group, 5, {"CPU": 2.0}, {"CPU": 2.0})
    assert "asks CPU 64 ×1 (PACK), Ray says INFEASIBLE (no node could ever hold a bundle); free now: CPU 2 of 2" in line

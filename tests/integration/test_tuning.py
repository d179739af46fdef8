"""Ray Tune sweeps and the layerwise search, on a real local Ray cluster (2 CPUs) with SQLite MLflow."""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path

import pytest

from cluster.connect import init_ray
from cluster.local import ray_start_head
from tests.conftest import tiny_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def local_ray():
    """Our local cluster, started by init_ray while another Ray cluster runs on the same machine (as a user's
    own would): Tune's Train V2 integration and Train's placement-group cleaner find their controllers
    through the state API, which must reach our cluster and not fail on "multiple active Ray instances"."""
    import ray

    ray.shutdown()
    with ray_start_head(secrets.token_hex(32), num_cpus=1, dashboard=False):
        init_ray(num_cpus=2)
        yield
        ray.shutdown()


def test_a_placement_group_the_cluster_cannot_place_is_reported_while_it_waits(local_ray):
    """``watch_pending`` beside a blocking call: a group asking more CPUs than any node has is logged with
    what it asks, Ray's reason and what is free, and again while it goes on waiting; a placed one is not."""
    import time

    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from cluster.waits import watch_pending

    lines: list[str] = []
    placed = placement_group([{"CPU": 0.5}])
    ray.get(placed.ready(), timeout=60)
    stuck = placement_group([{"CPU": 64}, {"CPU": 64}])
    try:
        with watch_pending(lines.append, every_s=1):
            deadline = time.time() + 60
            while len(lines) < 2 and time.time() < deadline:
                time.sleep(0.2)
    finally:
        remove_placement_group(stuck)
        remove_placement_group(placed)
    assert len(lines) >= 2, lines
    assert all("asks CPU 64 ×2" in x and "INFEASIBLE" in x and "free now: CPU 1.5 of 2" in x for x in lines), lines


def test_the_state_api_in_our_workers_reaches_our_cluster_beside_another(local_ray):
    import ray

    @ray.remote(num_cpus=0)
    def nodes_seen_by_the_state_api():
        from ray.util.state import list_nodes

        return [n.node_id for n in list_nodes()]

    ours = [n["NodeID"] for n in ray.nodes()]
    assert ray.get(nodes_seen_by_the_state_api.remote(), timeout=120) == ours


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_asha_sweep_stops_trials_early_registers_the_best_and_loses_no_metrics(
    local_ray, raypeft_home, tiny_model_dir, chat_data
):
    from tuning.sweep import sweep

    spec = tiny_spec(
        tiny_model_dir,
        chat_data,
        name="sweep",
        train={"max_steps": 12, "eval_every": 3},
        scaling={"cpus_per_worker": 0.9},  # two trials at once on 2 CPUs (each also holds 0.01 for its Tune driver)
        tracking={"registered_model": "sweep-best"},
        tune={
            # three trials, started in this order, two at a time: the small learning rate starts only when a
            # large one has ended, so it reaches the first rung (step 3) with only large ones recorded there,
            # both with a lower loss, and ASHA stops it whatever the timing
            "space": {"train.lr": {"grid": [0.02, 0.003, 1e-4]}, "method.r": {"choice": [4, 8]}},
            "num_samples": 1,
            "seed": 0,
        },
    )
    result = sweep(spec)

    rows = result["rows"]
    assert result["trials"] == 3 and result["failed"] == 0
    assert result["stopped_early"] >= 1, "ASHA stopped no trial"
    assert result["total_steps"] < result["full_grid_steps"]
    best = result["best"]
    finished = [r for r in rows if r["steps"] == 12]
    assert best["eval_loss"] == min(r["eval_loss"] for r in finished)

    c = _client(result["tracking_uri"])
    # the best trial's adapter is registered, on its own child run
    version = c.get_model_version("sweep-best", str(best["version"]))
    assert version.run_id == best["run_id"]
    assert (Path(best["adapter_dir"]) / "adapter_model.safetensors").is_file()
    # one child run per trial under the parent; every eval each trial reached is in MLflow (SQLite, 2 trials at once)
    exp = c.get_run(result["parent_run_id"]).info.experiment_id
    children = c.search_runs([exp], f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert len(children) == 3
    by_trial = {r["trial"]: r for r in rows}
    for child in children:
        row = by_trial[child.data.tags["raypeft.trial_id"]]
        evals = c.get_metric_history(child.info.run_id, "eval_loss")
        assert [m.step for m in evals] == list(range(3, row["steps"] + 1, 3)), child.data.tags
        assert child.data.tags["raypeft.stopped_early"] == str(row["steps"] < 12).lower()
        assert child.info.status == "FINISHED"
    artifacts = {a.path for a in c.list_artifacts(result["parent_run_id"])}
    assert {"sweep.png", "sweep_results.md"} <= artifacts


def test_layerwise_search_plans_fit_the_budget_and_the_plan_trains(
    local_ray, raypeft_home, tiny_model_dir, chat_data, tmp_path
):
    import torch
    import yaml
    from peft import PeftModel

    from cluster.memory import Shape
    from pipelines.lifecycle import load_base_as_trained
    from pipelines.train import load_checked_spec, run
    from tuning import layerwise as L
    from tuning.search import plan_memory, search, under_baseline

    spec = tiny_spec(
        tiny_model_dir,
        chat_data,
        name="lw",
        train={"max_steps": 8, "eval_every": 4},
        scaling={"cpus_per_worker": 0.9},
        # the fewest trials that still run both phases: 3 short trials (the 2 calibrated seeds, the baseline
        # first, and one NSGA-II sample), one promoted plan and the uniform reference trained in full (at most
        # two at once on 2 CPUs)
        tune={"layerwise": {"trials": 3, "population": 2, "short_steps": 3, "promote": 1, "calibration_samples": 8}},
    )
    shape = Shape.from_config(json.loads((tiny_model_dir / "config.json").read_text()))
    out = tmp_path / "plan.yaml"
    result = search(spec, out=str(out))  # the default: QLoRA with checkpointing as the baseline and its budget

    searched, baseline = under_baseline(spec)
    assert baseline == L.uniform(shape, 4, 4) and result["gradient_checkpointing"]
    budget = result["budget_bytes"]
    assert budget == math.ceil(plan_memory(searched)(baseline))
    assert result["front"], "no plan on the Pareto front"
    assert all(r["memory_bytes"] <= budget for r in result["front"])
    chosen = result["chosen"]
    assert chosen["memory_bytes"] <= budget and "eval_loss" in chosen
    # the baseline is always trained in full as the reference, and the search never returns a plan that did
    # worse than it
    ref = result["reference"]
    assert ref["layers"] == baseline and "eval_loss" in ref
    assert chosen["eval_loss"] <= ref["eval_loss"]
    c = _client(result["tracking_uri"])
    assert {"pareto_front.png", "pareto_front.md", "calibration.json", "plan.yaml"} <= {
        a.path for a in c.list_artifacts(result["parent_run_id"])
    }

    # the written spec trains unchanged through the training pipeline
    written = yaml.safe_load(out.read_text())
    assert written["model"]["quantization_plan"] and written["method"]["rank_pattern"]
    assert written["model"]["gradient_checkpointing"] is True  # the baseline's setting, which the plan was fitted under
    plan_spec = load_checked_spec(str(out), ["name=lw-plan", "train.max_steps=4"])
    trained = run(plan_spec)
    assert trained["metrics"]["eval_loss"] < 100

    # the plan survives save → load: every linear of the rebuilt base has the planned bit-width
    import bitsandbytes as bnb

    base, _, q = load_base_as_trained(Path(trained["adapter_dir"]))
    assert q == "mixed"
    kinds = {bnb.nn.Linear4bit: 4, bnb.nn.Linear8bitLt: 8, torch.nn.Linear: 16}
    for i, (bits, _rank) in enumerate(chosen["layers"]):
        layer = base.model.layers[i]
        assert {kinds[type(m)] for m in layer.modules() if type(m) in kinds} == {bits}, (i, bits)
    model = PeftModel.from_pretrained(base, trained["adapter_dir"])
    for i, (_bits, rank) in enumerate(chosen["layers"]):
        a = [p for n, p in model.named_parameters() if f"layers.{i}." in n and "lora_A" in n]
        assert {p.shape[0] for p in a} == ({rank} if rank else set()), (i, rank)

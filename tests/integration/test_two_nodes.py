"""A training job across two Ray nodes on this machine: a `ray start --head` and a `ray start --address` node,
1 CPU each, both started (and stopped) by this test in process groups of their own (tests/heads.py). The
2-worker job's ranks land on different nodes, checkpoint to storage both nodes see, and register."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from tests.heads import BIN, head_env, ray_start_head, ray_start_node, wait_for_nodes

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_two_worker_job_runs_one_rank_on_each_node(tiny_model_dir, chat_data, tmp_path):
    import ray
    from mlflow import MlflowClient

    from cluster.connect import init_ray

    ray.shutdown()  # this process's own local cluster, if an earlier test started one
    token = os.environ["RAY_AUTH_TOKEN"]
    home = tmp_path / "home"
    spec = {
        "name": "two-nodes",
        "model": {"base": str(tiny_model_dir)},
        "method": {"name": "lora", "r": 4},
        "data": {"train": str(chat_data), "format": "chat", "max_length": 64, "eval_fraction": 0.2},
        "train": {
            "max_steps": 4,
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "lr": 0.01,
            "warmup_steps": 1,
            "eval_every": 0,
            "eval_base": False,
        },
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},  # one CPU per node: a rank on each
        "checkpoint": {"every_steps": 2},
        "tracking": {"registered_model": "two-nodes-adapter"},
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    with ray_start_head(token, num_cpus=1, dashboard=False) as gcs, ray_start_node(gcs, token, num_cpus=1):
        env = {**head_env(token, RAYPEFT_HOME=str(home)), "RAY_ADDRESS": gcs}  # head_env drops RAY_ADDRESS
        os.environ["RAY_ADDRESS"] = gcs
        try:
            init_ray()
            wait_for_nodes(2)
            cluster_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        finally:
            ray.shutdown()
            del os.environ["RAY_ADDRESS"]
        proc = subprocess.run(
            [str(BIN / "raypeft"), "train", str(spec_path)], env=env, capture_output=True, text=True, timeout=600
        )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    result = next(json.loads(x) for x in reversed(proc.stdout.splitlines()) if x.startswith('{"run_id"'))
    assert result["version"] == 1 and result["registered_model"] == "two-nodes-adapter"

    run = MlflowClient(result["tracking_uri"]).get_run(result["run_id"])
    nodes = json.loads(run.data.tags["raypeft.worker_nodes"])
    assert len(nodes) == 2 and set(nodes) == cluster_nodes, (nodes, cluster_nodes)  # one rank on each node
    assert "workers on 2 node(s)" in out
    assert run.info.status == "FINISHED" and run.data.metrics["train_loss"] > 0

    ckpts = sorted(p.name for p in home.rglob("step_*") if p.is_dir())
    assert ckpts[-2:] == ["step_0000002", "step_0000004"], ckpts  # both ranks wrote to the shared storage

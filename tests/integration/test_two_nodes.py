"""A training job across two Ray nodes on this machine: a `ray start --head` and a `ray start --address` node,
1 CPU each, both started (and stopped) by this test in process groups of their own (cluster/local.py). First
the data preparation spreads over both nodes. The 2-worker job's ranks land on different nodes and checkpoint to storage both nodes see; then the second node
is lost mid-run, a node joins again, and the job finishes in the same MLflow run with every step logged."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml

from cluster.local import BIN, head_env, ray_start_head, ray_start_node, wait_for_nodes

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _raylet(node: subprocess.Popen) -> psutil.Process:
    """The raylet of a node this test started (a child of its `ray start --block`), found by parentage."""
    for p in psutil.Process(node.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.name() == "raylet":
                return p
    raise AssertionError("the node's raylet is not running")


def _tail(log_path: Path) -> str:
    return log_path.read_text(errors="replace")[-6000:]


def _registered(run_dir: Path) -> int:
    """Step of the latest checkpoint Ray Train's controller has registered, else 0."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    return int(((snap.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("step", 0))


def _prepare_on_both_nodes(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Data preparation on Ray Data spreads the chunks over both nodes, and the rows equal the in-process path's."""
    from pipelines import data as D
    from pipelines.data.prepare import open_layout, prepare
    from pipelines.model import load_tokenizer
    from tests.conftest import tiny_spec, write_chat_data

    data = write_chat_data(tmp_path / "prep.jsonl", n=4000)  # ≈ 300 KB: four chunks
    spec = tiny_spec(tiny_model_dir, data, checkpoint={"storage": str(tmp_path / "store")})
    p = prepare(spec, log=lambda *_: None, local_max_bytes=-1)  # on Ray Data, however small
    assert p.stats["data_nodes"] == 2, p.stats
    meta = json.loads((Path(p.shards) / "meta.json").read_text())
    assert len(meta["chunks"]) >= 4
    train, _, _, _ = open_layout(p.layout)
    old_train, _ = D.train_eval_records(spec.data, spec.train.seed)
    expected = D.encode_all(old_train, spec.data, load_tokenizer(str(tiny_model_dir)))
    assert len(train) == len(expected) == 3200
    assert [train[i] for i in range(len(train))] == expected


def test_losing_a_node_mid_run_repeats_at_most_one_checkpoint_interval(tiny_model_dir, chat_data, tmp_path):
    """SIGKILL the second node (its raylet, then its other processes, by PID) during a 2-worker run, then
    start a node again: Ray Train restarts the worker group from the last registered checkpoint, with its
    default health-check interval. One MLflow run, continuous steps, at most one checkpoint interval
    repeated."""
    import ray
    from mlflow import MlflowClient

    from cluster.connect import init_ray

    ray.shutdown()
    token = os.environ["RAY_AUTH_TOKEN"]
    home = tmp_path / "home"
    steps, every = STEPS, EVERY
    raw = _lossy_spec(tiny_model_dir, chat_data, steps, every)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    log_path = tmp_path / "driver.log"
    with contextlib.ExitStack() as stack:
        gcs = stack.enter_context(ray_start_head(token, num_cpus=1, dashboard=False))
        second = contextlib.ExitStack()
        node = second.enter_context(ray_start_node(gcs, token, num_cpus=1))
        os.environ["RAY_ADDRESS"] = gcs
        try:
            init_ray()
            wait_for_nodes(2)
            cluster_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
            _prepare_on_both_nodes(tiny_model_dir, tmp_path)
        finally:
            ray.shutdown()
            del os.environ["RAY_ADDRESS"]
        env = {**head_env(token, RAYPEFT_HOME=str(home)), "RAY_ADDRESS": gcs}  # head_env drops RAY_ADDRESS
        env.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", None)  # Ray Train's default
        with open(log_path, "wb") as out:
            driver = subprocess.Popen(
                [str(BIN / "raypeft"), "train", str(spec_path)], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        stack.callback(lambda: driver.poll() is None and driver.kill())
        run_dir = home / "runs" / "lossy"
        deadline = time.time() + 300
        while _registered(run_dir) < every:
            assert driver.poll() is None and time.time() < deadline, _tail(log_path)
            time.sleep(0.05)
        killed_after = _registered(run_dir)
        processes = psutil.Process(node.pid).children(recursive=True)  # the node's raylet, agents and workers
        _raylet(node).kill()  # SIGKILL, by PID
        for p in processes:  # and the rest of the node, as when a machine goes away (a worker outlives its
            with contextlib.suppress(psutil.NoSuchProcess):  # raylet for a while otherwise, still training)
                p.kill()
        t_lost = time.time()
        second.close()  # its `ray start --block` ends when its raylet dies; anything left in its group goes
        stack.enter_context(ray_start_node(gcs, token, num_cpus=1))  # a node joins again
        try:
            code = driver.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the job did not end 600 s after the loss; its log ends:\n{_tail(log_path)}")
        assert code == 0, _tail(log_path)
        t_done = time.time()
    out = log_path.read_text(errors="replace")
    result = next(json.loads(x) for x in reversed(out.splitlines()) if x.startswith('{"run_id"'))
    assert result["version"] == 1 and result["registered_model"] == "lossy-adapter"
    placements = list(dict.fromkeys(x.split("node(s): ", 1)[1] for x in out.splitlines() if "workers on " in x))
    first = [x.split("→ ")[1][:12] for x in placements[0].split(", ")]
    assert sorted(first) == sorted(n[:12] for n in cluster_nodes), (placements, cluster_nodes)  # a rank on each
    ckpts = {p.name for p in (home / "runs" / "lossy").glob("step_*") if p.is_dir()}
    assert f"step_{steps:07d}" in ckpts, ckpts  # both ranks wrote to the storage both nodes see
    c = MlflowClient(result["tracking_uri"])
    resumed = c.get_metric_history(result["run_id"], "resumed_from_step")
    assert len(resumed) == 1 and resumed[0].value >= killed_after, (resumed, killed_after)
    logged = [h.step for h in c.get_metric_history(result["run_id"], "train_loss")]
    assert sorted(set(logged)) == list(range(1, steps + 1)), "steps are not continuous"
    repeated = len(logged) - len(set(logged))
    assert repeated <= every, f"{repeated} steps repeated, more than one checkpoint interval ({every})"
    run_ = c.get_run(result["run_id"])
    assert len(c.search_runs([run_.info.experiment_id])) == 1
    final = json.loads(run_.data.tags["raypeft.worker_nodes"])
    assert len(placements) == 2 and len(set(final)) == 2, placements  # the tag names the new placement:
    assert {n[:12] for n in final} != set(first), placements
    restart_at = max(h.timestamp for h in c.get_metric_history(result["run_id"], "first_step_at")) / 1000
    print(
        f"\nnode loss: {repeated} steps repeated (checkpoint every {every}), resumed from step "
        f"{int(resumed[0].value)}, training again {restart_at - t_lost:.1f}s after the loss, "
        f"job done {t_done - t_lost:.1f}s after it"
    )

    # that the resumed run ends where an uninterrupted one would (model, optimizer, RNG and data restored) is
    # test_distributed's kill tests' to check: the same restore, after the same worker-group restart


STEPS, EVERY = 200, 100  # a checkpoint interval of several seconds: longer than the default health check (2 s)


def _lossy_spec(tiny_model_dir, chat_data, steps: int, every: int) -> dict:
    return {
        "name": "lossy",
        "model": {"base": str(tiny_model_dir)},
        "method": {"name": "lora", "r": 4, "dropout": 0.1},  # dropout: the RNG state must be restored too
        "data": {"train": str(chat_data), "format": "chat", "max_length": 64, "eval_fraction": 0.2},
        "train": {
            "max_steps": steps,
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "lr": 0.01,
            "warmup_steps": 1,
            "eval_every": 0,
            "eval_base": False,
        },
        "scaling": {"num_workers": 2, "cpus_per_worker": 1},
        "checkpoint": {"every_steps": every, "max_failures": 2, "keep": 2},
        "tracking": {"registered_model": "lossy-adapter"},
    }

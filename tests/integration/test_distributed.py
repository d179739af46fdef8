"""DeepSpeed ZeRO 1/2/3 on 2 Ray Train CPU workers (gloo), QLoRA under ZeRO-3, and fault-tolerant resume.

Everything is real: a local Ray cluster, DeepSpeed, bitsandbytes, MLflow on SQLite; the
worker is killed with SIGKILL by PID, and the driver is killed the same way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from cluster.connect import init_ray
from tests.conftest import ZERO3_PARTITION_ALL, tiny_spec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.shutdown()
    # the controller registers reported checkpoints when it polls the workers (default every 2 s);
    # the tiny model runs dozens of steps in that time, so poll faster to make the kill test exact
    old = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
    init_ray(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")
    else:
        os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = old


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _losses(result) -> list[float]:
    hist = _client(result["tracking_uri"]).get_metric_history(result["run_id"], "train_loss")
    return [h.value for h in sorted(hist, key=lambda h: h.step)]


def _two_workers(model_dir, data, name, strategy, method="lora", steps=10, **extra):
    return tiny_spec(
        model_dir,
        data,
        name=name,
        method={"name": method, "r": 4, "dropout": 0.0},
        train={"max_steps": steps, "micro_batch_size": 2, "lr": 0.01, "eval_every": 0},
        scaling={
            "num_workers": 2,
            "cpus_per_worker": 1,
            "strategy": strategy,
            **({"deepspeed": ZERO3_PARTITION_ALL} if strategy == "zero3" else {}),
        },
        **extra,
    )


@pytest.fixture(scope="module")
def ddp_losses(local_ray, tmp_path_factory, tiny_model_dir, chat_data):
    from pipelines.train import run

    with pytest.MonkeyPatch.context() as mp:  # restores the session's own isolated home afterwards
        mp.setenv("RAYPEFT_HOME", str(tmp_path_factory.mktemp("ddp-home")))
        return _losses(run(_two_workers(tiny_model_dir, chat_data, "ref-ddp", "ddp")))


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero2_offload", "zero3"])
def test_zero_stage_trains_and_matches_ddp(strategy, ddp_losses, raypeft_home, tiny_model_dir, chat_data):
    from pipelines.train import run

    result = run(_two_workers(tiny_model_dir, chat_data, f"z-{strategy}", strategy))
    losses = _losses(result)
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    # same seed, same data, fp32: ZeRO shards the same computation DDP does
    assert losses == pytest.approx(ddp_losses, rel=1e-3), (losses, ddp_losses)
    adapter = Path(result["adapter_dir"]) / "adapter_model.safetensors"
    from safetensors.torch import load_file

    tensors = load_file(adapter)
    lora_b = [t for k, t in tensors.items() if "lora_B" in k]
    assert lora_b and all(t.numel() > 0 for t in lora_b) and any(t.abs().sum() > 0 for t in lora_b)


def _assert_4bit_adapter_reproduces_the_probe(spec, adapter_dir: str, probe_file: Path) -> None:
    """The adapter saved from a partitioned 4-bit model is complete: a fresh 4-bit base + it give the logits
    the trained model gave on the checkpoint's probe."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipelines.model import quantization_config

    probe = torch.load(probe_file)
    base = AutoModelForCausalLM.from_pretrained(
        spec.model.base, quantization_config=quantization_config(spec), dtype=torch.float32, device_map={"": "cpu"}
    )
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    assert isinstance(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"]).logits
        with model.disable_adapter():
            base_logits = model(input_ids=probe["input_ids"]).logits
    adapter_effect = (probe["logits"] - base_logits).abs().max().item()
    mismatch = (probe["logits"] - logits).abs().max().item()
    assert adapter_effect > 0.1, "training did not move the logits"
    assert mismatch < 0.01 * adapter_effect, (mismatch, adapter_effect)


# --------------------------------------------------------------------------- fault tolerance


def _train_worker_pids() -> list[int]:
    """Ray Train workers of this test's own local cluster: descendants of this process (its raylet's
    workers), never a process found by name elsewhere on the machine."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::RayTrainWorker"):
                pids.append(p.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def _registered_checkpoint(run_dir: Path) -> int:
    """Step of the latest checkpoint Ray Train has registered (its snapshot in the run dir), else 0."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return 0
    latest = snap.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("step", 0))


def _wait_for(predicate, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _uninterrupted(spec) -> dict:
    """The result of ``spec`` run without a kill, under its own name."""
    from pipelines.train import run

    return run(spec.model_copy(update={"name": f"un{spec.name}"}))


def _kill_spec(tiny_model_dir, chat_data, name, strategy, method, steps, every, max_failures=1):
    """A 2-worker job that checkpoints every ``every`` steps and may restart ``max_failures`` times; dropout
    on, so the RNG state must be restored too."""
    kw = dict(checkpoint={"every_steps": every, "max_failures": max_failures, "keep": 2})
    spec = _two_workers(tiny_model_dir, chat_data, name, strategy, method=method, steps=steps, **kw)
    return spec.model_copy(update={"method": spec.method.model_copy(update={"dropout": 0.1})})


def _in_background(spec):
    """Start ``pipelines.train.run(spec)`` in a daemon thread (a hung run cannot hold the session); returns a
    ``wait()`` that joins it (600 s at most) and gives ``{"result": ...}`` or ``{"error": exception}``."""
    from pipelines.train import run

    box: dict = {}

    def target():
        try:
            box["result"] = run(spec)
        except Exception as e:  # noqa: BLE001 - handed to the test, which asserts on it
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def wait() -> dict:
        thread.join(timeout=600)
        return box

    return wait


def _assert_resumed_exactly(result, spec, every: int) -> dict:
    """The job resumed once from a checkpoint, in one MLflow run whose steps are continuous and repeat at most
    one checkpoint interval, and ended with the adapter an uninterrupted run of it ends with (model,
    optimizer, RNG and data restored; to float tolerance)."""
    from safetensors.torch import load_file

    steps = spec.train.max_steps
    c = _client(result["tracking_uri"])
    resumed = c.get_metric_history(result["run_id"], "resumed_from_step")
    assert len(resumed) == 1 and 0 < resumed[0].value < steps and resumed[0].value % every == 0
    logged = [h.step for h in c.get_metric_history(result["run_id"], "train_loss")]
    assert sorted(set(logged)) == list(range(1, steps + 1)), "steps are not continuous"
    repeated = len(logged) - len(set(logged))
    assert repeated <= every, f"{repeated} steps repeated, more than one checkpoint interval ({every})"
    exp = c.get_run(result["run_id"]).info.experiment_id
    assert len(c.search_runs([exp])) == 1

    clean = _uninterrupted(spec)
    a = load_file(Path(result["adapter_dir"]) / "adapter_model.safetensors")
    b = load_file(Path(clean["adapter_dir"]) / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    return clean


def test_sigkilled_worker_resumes_from_checkpoint_exactly(local_ray, raypeft_home, tiny_model_dir, chat_data):
    """SIGKILL one worker of a QLoRA job under ZeRO-3 mid-run (partitioned 4-bit weights, adapter and
    optimizer): Ray Train restarts the group, the run completes from its last checkpoint, exactly, and
    the adapter saved from the partitioned model is complete. (ZeRO-2 is killed the same way, both workers
    at once, by the torn-checkpoint test; QLoRA under DDP by the restarts-run-out test, resumed by a rerun.)"""
    steps, every = 60, 20
    name = "killed-zero3-qlora"
    spec = _kill_spec(tiny_model_dir, chat_data, name, "zero3", "qlora", steps, every)
    wait = _in_background(spec)
    run_dir = raypeft_home / "runs" / name
    _wait_for(lambda: _registered_checkpoint(run_dir), 300, "a registered checkpoint")
    pids = _wait_for(_train_worker_pids, 10, "Ray Train worker processes")
    os.kill(pids[-1], signal.SIGKILL)
    box = wait()
    assert "result" in box, f"the run did not complete after a worker was killed: {box.get('error')!r}"
    result = box["result"]
    clean = _assert_resumed_exactly(result, spec, every)
    losses = _losses(clean)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses
    probe = raypeft_home / "runs" / name / f"step_{steps:07d}" / "probe.pt"
    _assert_4bit_adapter_reproduces_the_probe(spec, result["adapter_dir"], probe)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` (a session leader) and every process it started, as a machine failure would: its
    process group, and the descendants listed before the kill that left the group (Ray's workers start
    sessions of their own, and one left running would outlive the cluster it belonged to)."""
    import psutil

    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    os.killpg(proc.pid, signal.SIGKILL)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=60)
    psutil.wait_procs(tree, timeout=60)


def _project(root: Path, tiny_model_dir: Path) -> dict:
    """A user's project folder: data, eval set and base model under paths relative to it (the eval set as a
    ``file://`` URL), checkpoints kept in it; returns the spec, written to ``root/spec.yaml``."""
    from tests.conftest import write_chat_data

    (root / "data").mkdir(parents=True)
    write_chat_data(root / "data" / "chat.jsonl", n=32)
    write_chat_data(root / "data" / "eval.jsonl", n=8, seed=1)
    (root / "models").mkdir()
    (root / "models" / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    spec = {
        "name": "crashy",
        "model": {"base": "models/tiny"},
        "method": {"name": "lora", "r": 4},
        "data": {"train": "data/chat.jsonl", "eval": (root / "data" / "eval.jsonl").as_uri(), "max_length": 64},
        "train": {
            "max_steps": 200,
            "micro_batch_size": 2,
            "lr": 0.01,
            "warmup_steps": 1,
            "eval_every": 0,
            "eval_base": False,
        },
        "checkpoint": {"every_steps": 20, "storage": "runs"},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    return spec


@pytest.mark.slow
def test_rerun_after_driver_crash_resumes_the_same_run(tmp_path, tiny_model_dir):
    """SIGKILL the `raypeft train` driver (and its local cluster); re-running the job resumes it.

    The job is a user's project, run from its folder with an override on the command line: paths relative
    to the folder, a ``file://`` eval set, checkpoints kept in the folder. They resolve in the project, the
    resolved paths are what MLflow records, and the spec file is left as it was."""
    root = tmp_path / "project"
    spec = _project(root, tiny_model_dir)
    run_dir = root / "runs" / "crashy"  # checkpoint.storage, resolved in the project
    env = {**os.environ, "RAYPEFT_HOME": str(tmp_path / "home")}
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    cmd = [str(Path(sys.executable).parent / "raypeft"), "train", "spec.yaml", "scaling.cpus_per_worker=1"]
    # the driver's output goes to a file, not a pipe nobody reads: a full pipe would block the driver
    log = tmp_path / "first.log"
    with open(log, "wb") as out:
        first = subprocess.Popen(cmd, env=env, cwd=root, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:  # a driver that exits first fails the test at once
        _wait_for(lambda: _registered_checkpoint(run_dir) or first.poll() is not None, 300, "a registered checkpoint")
        assert first.poll() is None, f"the driver exited with {first.returncode} before a checkpoint"
    except AssertionError as e:
        raise AssertionError(f"{e}; the driver's output ends:\n{log.read_text(errors='replace')[-3000:]}") from None
    finally:
        _kill_tree(first)  # the driver and the local Ray cluster it started
    state = json.loads((run_dir / "raypeft_job.json").read_text())
    assert state["status"] == "running"

    second = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    result = json.loads([line for line in second.stdout.splitlines() if line.startswith('{"run_id"')][-1])
    assert result["job"] == "crashy" and result["run_id"] == state["mlflow_run_id"]
    assert Path(result["adapter_dir"]) == run_dir / "adapter"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    assert "eval_loss" in result["metrics"]  # the file:// eval set was read
    c = _client(result["tracking_uri"])
    run = c.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    resumed = c.get_metric_history(result["run_id"], "resumed_from_step")
    assert len(resumed) == 1 and resumed[0].value > 0
    assert max(h.step for h in c.get_metric_history(result["run_id"], "train_loss")) == 200
    assert len(c.search_runs([run.info.experiment_id])) == 1
    params = run.data.params
    assert params["data.train"] == str(root / "data" / "chat.jsonl")  # the resolved paths are recorded
    assert params["model.base"] == str((root / "models" / "tiny").resolve())
    assert params["data.eval"] == spec["data"]["eval"] and params["scaling.cpus_per_worker"] == "1.0"
    assert yaml.safe_load((root / "spec.yaml").read_text()) == spec  # the spec file is unchanged


def test_when_restarts_run_out_the_run_fails_and_a_rerun_resumes_it_exactly(
    local_ray, raypeft_home, tiny_model_dir, chat_data
):
    """QLoRA on a 4-bit base, ``checkpoint.max_failures: 0``, a worker SIGKILLed after a checkpoint: the job
    fails and its MLflow run ends FAILED with the error; running the job again resumes that run from the
    checkpoint and ends exactly where an uninterrupted run does."""
    from pipelines.train import run

    steps, every = 60, 20
    spec = _kill_spec(tiny_model_dir, chat_data, "exhausted", "ddp", "qlora", steps, every, max_failures=0)
    wait = _in_background(spec)
    run_dir = raypeft_home / "runs" / "exhausted"
    _wait_for(lambda: _registered_checkpoint(run_dir), 300, "a registered checkpoint")
    os.kill(_wait_for(_train_worker_pids, 10, "Ray Train worker processes")[-1], signal.SIGKILL)
    assert "error" in wait(), "the job did not fail although no restart was allowed"
    state = json.loads((run_dir / "raypeft_job.json").read_text())
    assert state["status"] == "failed"
    c = _client(state["tracking_uri"])
    failed = c.get_run(state["mlflow_run_id"])
    assert failed.info.status == "FAILED" and failed.data.tags["raypeft.error"]

    result = run(spec)  # the same job again
    assert result["run_id"] == state["mlflow_run_id"] and result["job"] == "exhausted"
    assert c.get_run(result["run_id"]).info.status == "FINISHED"
    _assert_resumed_exactly(result, spec, every)


# ZeRO-2's steps are the fastest: 240 steps keep the run going past the checkpoint that is killed into
# even with Ray Train's default 2 s poll
ZERO2_STEPS, ZERO2_EVERY = 240, 40


def test_a_worker_killed_while_a_checkpoint_is_written_resumes_from_the_last_complete_one(
    local_ray, raypeft_home, tiny_model_dir, chat_data, monkeypatch
):
    """SIGKILL both ZeRO-2 workers (each rank writes its own optimizer partition) the moment a new checkpoint
    directory appears in storage, before Ray Train has registered it: Ray Train restarts the group, the
    resume uses the last registered checkpoint, never the partial one, and the run completes exactly."""
    # Ray Train's default: the controller registers a checkpoint when it next polls the workers, so a
    # directory that has just appeared is (almost always) not registered yet when the workers die
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "2.0")
    steps, every = ZERO2_STEPS, ZERO2_EVERY
    spec = _kill_spec(tiny_model_dir, chat_data, "torn", "zero2", "lora", steps, every)
    wait = _in_background(spec)
    run_dir = raypeft_home / "runs" / "torn"
    registered = _wait_for(lambda: _registered_checkpoint(run_dir), 300, "a registered checkpoint")
    pids = _wait_for(_train_worker_pids, 10, "Ray Train worker processes")

    def being_written():
        newer = [int(p.name[5:]) for p in run_dir.glob("step_*") if int(p.name[5:]) > registered]
        return min(newer) if newer else None

    torn = _wait_for(being_written, 120, "the next checkpoint's directory")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    registered_at_kill = _registered_checkpoint(run_dir)
    box = wait()
    assert "result" in box, f"the run did not complete after its workers were killed: {box.get('error')!r}"
    result = box["result"]
    resumed = int(_client(result["tracking_uri"]).get_metric_history(result["run_id"], "resumed_from_step")[0].value)
    # the one the controller had registered when the workers died (the torn one only if it was complete and
    # registered in the instant between its directory appearing and the kill)
    assert resumed == registered_at_kill and resumed in (registered, torn), (registered, torn, resumed)
    print(f"\nkilled while step {torn} was written; resumed from step {resumed}")
    _assert_resumed_exactly(result, spec, every)

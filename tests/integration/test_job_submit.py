"""`ray job submit` of a training spec against a real `ray start --head` on loopback (token auth on)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cluster.local import BIN, head_env, ray_start_head
from tests.conftest import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = secrets.token_hex(32)  # this cluster's own token: nothing is written to ~/.ray


def _env(**extra) -> dict[str, str]:
    return head_env(TOKEN, **extra)


@pytest.fixture(scope="module")
def ray_head():
    """Its own `ray start --head` (cluster/local.py): no other Ray cluster on the machine is touched."""
    import ray

    ray.shutdown()  # this process's own local cluster, if an earlier test started one
    with ray_start_head(TOKEN, num_cpus=2) as url:
        _wait_for_job_agent(url)
        yield url


def _wait_for_job_agent(url: str, timeout: float = 120) -> None:
    """A fresh head answers on its dashboard before its job agent has registered, and a `ray job submit` in
    between fails with "No available agent" (HTTP 500): seen under load. A no-op job until one is taken, so
    the tests' own submissions meet a head that is ready, as a user's would a minute later."""
    deadline = time.monotonic() + timeout
    while True:
        proc = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", url, "--", "true"],
            env=_env(), capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if proc.returncode == 0:
            return
        if "No available agent" not in proc.stdout + proc.stderr or time.monotonic() > deadline:
            raise AssertionError(proc.stdout[-2000:] + proc.stderr[-2000:])
        time.sleep(2)


@pytest.fixture(scope="module")
def unactivated_head(tmp_path_factory):
    """A head started as `.venv/bin/ray start --head` without activating the venv: the `python` on its PATH
    is another one, without raypeft (a bare venv here, standing in for the system's)."""
    import venv

    bare = tmp_path_factory.mktemp("bare-python")
    venv.create(bare, with_pip=False, symlinks=True)
    path = os.pathsep.join([str(bare / "bin"), *(d for d in os.environ["PATH"].split(os.pathsep) if d != str(BIN))])
    with ray_start_head(TOKEN, num_cpus=2, PATH=path) as url:
        yield url, str(bare / "bin" / "python")


def _last_json(text: str) -> dict:
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"run_id"' in line:
            return json.loads(line)
    raise AssertionError(f"no result JSON in job output:\n{text[-3000:]}")


def test_ray_job_submit_trains_and_registers(ray_head, tmp_path, tiny_model_dir):
    """A 2-worker DeepSpeed ZeRO-2 job submitted to a real head with `ray job submit --working-dir PROJECT`
    trains, checkpoints and registers. Its data path is relative to the project: it resolves inside the
    shipped copy, on the driver, and the workers read it from there."""
    from mlflow import MlflowClient

    from tests.conftest import write_chat_data

    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    write_chat_data(root / "data" / "chat.jsonl")
    home = tmp_path / "home"
    spec = {
        "name": "submitted",
        "model": {"base": str(tiny_model_dir)},
        "method": {"name": "lora", "r": 4},
        "data": {"train": "data/chat.jsonl", "format": "chat", "max_length": 64, "eval_fraction": 0.2},
        "train": {
            "max_steps": 4,
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "lr": 0.01,
            "warmup_steps": 1,
            "eval_every": 0,
            "eval_base": False,
        },
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "strategy": "zero2"},
        "checkpoint": {"every_steps": 2},
        "tracking": {"registered_model": "submitted-adapter"},
    }
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    runtime_env = {"env_vars": {"RAYPEFT_HOME": str(home), "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}}
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--working-dir", str(root),
         "--runtime-env-json", json.dumps(runtime_env), "--", "python", "-m", "pipelines.train", "spec.yaml"],
        env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = _last_json(proc.stdout)

    assert Path(result["adapter_dir"]).is_relative_to(home)
    assert (Path(result["adapter_dir"]) / "adapter_model.safetensors").is_file()
    uri = f"sqlite:///{home / 'mlflow.db'}"
    assert result["tracking_uri"] == uri
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    run = c.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.max_steps"] == "4"
    assert run.data.params["scaling.strategy"] == "zero2" and run.data.params["scaling.num_workers"] == "2"
    train = run.data.params["data.train"]  # resolved in the shipped copy, not in the project folder
    assert os.path.isabs(train) and train.endswith("data/chat.jsonl") and not train.startswith(str(root))
    last = home / "runs" / "submitted" / "step_0000004"
    assert sorted(p.name for p in (last / "deepspeed" / "state").glob("*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert len(c.get_metric_history(result["run_id"], "train_loss")) == 4
    v = c.get_model_version("submitted-adapter", str(result["version"]))
    assert v.tags["raypeft.run_id"] == result["run_id"]


def test_submit_without_token_is_refused(ray_head):
    """Token auth stays on: a client without RAY_AUTH_MODE=token cannot submit."""
    env = _env()
    env.pop("RAY_AUTH_MODE")
    env.pop("RAY_AUTH_TOKEN")
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", ray_head, "--no-wait", "--", "echo", "hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "token" in (proc.stdout + proc.stderr).lower()


def _rmdir_if_empty(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass


def test_raypeft_submit_follows_to_success_and_status_lists_it(unactivated_head, tmp_path, tiny_model_dir, chat_data):
    """`raypeft submit --follow` against the real head: validated locally, shipped, run in the Python Ray runs
    its workers with although `python` on the head's PATH lacks raypeft, followed to SUCCEEDED."""
    ray_head, _ = unactivated_head
    spec = {
        "name": "via-raypeft-submit",
        "model": {"base": str(tiny_model_dir)},
        "method": {"name": "lora", "r": 4},
        "data": {"train": str(chat_data), "format": "chat", "max_length": 64, "eval_fraction": 0.2},
        "train": {
            "max_steps": 3,
            "micro_batch_size": 2,
            "lr": 0.01,
            "warmup_steps": 1,
            "eval_every": 0,
            "eval_base": False,
        },
    }
    spec_dir = REPO / ".pytest-specs"  # the spec must travel with the working dir
    spec_dir.mkdir(exist_ok=True)
    path = spec_dir / f"{tmp_path.name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = _env(RAYPEFT_HOME=str(tmp_path / "home"))
    env.pop("RAY_AUTH_MODE")  # raypeft turns token auth on by itself when a token exists
    try:
        proc = subprocess.run(
            [
                str(BIN / "raypeft"),
                "submit",
                str(path.relative_to(REPO)),
                "train.max_steps=4",
                "--address",
                ray_head,
                "--follow",
                "--job-id",
                "raypeft-submit-test",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            cwd=REPO,
        )
    finally:
        path.unlink()
        _rmdir_if_empty(spec_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"job_id": "raypeft-submit-test", "status": "SUCCEEDED"}
    assert "step 4/4" in proc.stdout  # the followed logs, with the override applied
    st = subprocess.run(
        [str(BIN / "raypeft"), "status", "--address", ray_head, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert any(j["id"] == "raypeft-submit-test" and j["status"] == "SUCCEEDED" for j in status["jobs"])
    assert status["resources"]["CPU"]["total"] == 2


def test_raypeft_submit_to_an_interpreter_without_raypeft_fails_at_once_naming_it(unactivated_head, tmp_path):
    """`--python` naming a Python that lacks raypeft's dependencies: the job ends before any import of
    raypeft, with one message that names the interpreter, what it lacks and the fix."""
    ray_head, bare = unactivated_head
    env = _env(RAYPEFT_HOME=str(tmp_path / "home"))
    proc = subprocess.run(
        [str(BIN / "raypeft"), "submit", "pipelines/configs/demo.yaml", "--address", ray_head, "--follow",
         "--python", bare],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["status"] == "FAILED"
    assert f"the job's interpreter {bare} (Python " in proc.stdout
    assert "lacks ray, torch, transformers, peft, mlflow" in proc.stdout and "--python PATH" in proc.stdout
    assert "Traceback" not in proc.stdout
    assert not (tmp_path / "home").exists()  # nothing of a run was started


def test_raypeft_submit_rejects_a_bad_spec_before_the_cluster(tmp_path):
    bad = REPO / ".pytest-specs" / "bad.yaml"
    bad.parent.mkdir(exist_ok=True)
    bad.write_text("train:\n  lr: fast\n")
    try:
        proc = subprocess.run(
            [str(BIN / "raypeft"), "submit", str(bad.relative_to(REPO)), "--address", "http://127.0.0.1:9"],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
    finally:
        bad.unlink()
        _rmdir_if_empty(bad.parent)
    assert proc.returncode == 2 and "train.lr" in proc.stderr and "'fast'" in proc.stderr

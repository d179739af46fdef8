"""The shell entrypoint `raypeft submit` gives a Ray job: it finds the Python that Ray runs its workers with
(the raylet's --python_worker_command, an ancestor of the job's shell), checks that it has what the job
imports, and runs pipelines.train there. Here a small Python process stands in for the raylet: it carries
that flag in its command line and runs the entrypoint with /bin/sh, as Ray's JobSupervisor does."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from cluster import jobs
from tests.conftest import REPO

# the stand-in raylet: argv[1] is its --python_worker_command, argv[2] the entrypoint it runs with /bin/sh
RAYLET = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[2], shell=True))"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> str:
    """A Python without raypeft's dependencies: a fresh venv, no pip, no system site-packages."""
    d = tmp_path_factory.mktemp("bare")
    venv.create(d, with_pip=False, symlinks=True)
    return str(d / "bin" / "python")


def _run_job(worker_python: str, entry: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    flag = f"--python_worker_command={worker_python} /somewhere/setup_worker.py --node-ip-address=127.0.0.1"
    clean = {k: v for k, v in os.environ.items() if k != "RAYPEFT_JOB_PYTHON"}
    return subprocess.run(
        [sys.executable, "-c", RAYLET, flag, entry],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_cluster_python_without_raypeft_is_named_with_what_it_lacks_and_the_fix(bare_python, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\n")
    proc = _run_job(bare_python, jobs.entrypoint(str(spec), [], str(tmp_path)), tmp_path)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert f"interpreter {bare_python} (Python " in err
    assert "lacks ray, torch, transformers, peft, mlflow, pipelines" in err
    assert "raypeft submit --python PATH" in err and "Traceback" not in err


def test_the_workers_python_runs_pipelines_train_with_the_spec_and_overrides(bare_python):
    """`python` on PATH is the bare one, as on a head started from an unactivated venv; the job still runs in
    the raylet's Python: pipelines.train parses the spec and the override (and refuses the bad value)."""
    spec = REPO / "pipelines" / "configs" / "demo.yaml"
    entry = jobs.entrypoint(str(spec), ["train.lr=fast"], str(REPO))
    path = f"{Path(bare_python).parent}{os.pathsep}{os.environ['PATH']}"
    proc = _run_job(sys.executable, entry, REPO, PATH=path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train.lr" in proc.stderr and "'fast'" in proc.stderr and "lacks" not in proc.stderr


def test_raypeft_job_python_overrides_the_workers_python(bare_python, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\n")
    proc = _run_job(
        sys.executable, jobs.entrypoint(str(spec), [], str(tmp_path)), tmp_path, RAYPEFT_JOB_PYTHON=bare_python
    )
    assert proc.returncode == 2 and f"interpreter {bare_python} " in proc.stderr


def test_a_spec_outside_the_working_dir_is_refused():
    with pytest.raises(ValueError, match="inside the working dir"):
        jobs.command("/etc/spec.yaml", [], str(REPO))


class _AgentComesUp:
    """A JobSubmissionClient whose head's job agent answers on the third try (as Ray's does just after
    `ray start`), or never."""

    def __init__(self, refusals: int):
        self.refusals, self.calls = refusals, 0

    def submit_job(self, **kw):
        self.calls += 1
        if self.calls <= self.refusals:
            raise RuntimeError(
                "Request failed with status code 503: No available agent to submit job, please try again later."
            )
        return "raysubmit_1"


def test_a_head_without_its_job_agent_yet_is_retried_saying_so_once(monkeypatch, tmp_path):
    fake = _AgentComesUp(refusals=2)
    monkeypatch.setattr(jobs, "client", lambda addr: fake)
    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)
    (tmp_path / "spec.yaml").write_text("name: x\n")
    said = []
    job = jobs.submit(str(tmp_path / "spec.yaml"), [], "http://127.0.0.1:1", str(tmp_path), say=said.append)
    assert job == "raysubmit_1" and fake.calls == 3
    assert len(said) == 1 and "no job agent up yet" in said[0] and f"{jobs.AGENT_WAIT_S} s" in said[0]


def test_a_job_agent_that_never_comes_up_gives_up_after_the_wait(monkeypatch, tmp_path):
    fake = _AgentComesUp(refusals=10**6)
    clock = iter(range(0, 10**6, 7))
    monkeypatch.setattr(jobs, "client", lambda addr: fake)
    monkeypatch.setattr(jobs.time, "sleep", lambda s: None)
    monkeypatch.setattr(jobs.time, "monotonic", lambda: next(clock))
    (tmp_path / "spec.yaml").write_text("name: x\n")
    with pytest.raises(RuntimeError, match="No available agent"):
        jobs.submit(str(tmp_path / "spec.yaml"), [], "http://127.0.0.1:1", str(tmp_path), say=lambda m: None)
    assert fake.calls == jobs.AGENT_WAIT_S // 7 + 1

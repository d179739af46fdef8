"""Job submission and cluster status over the Ray dashboard's HTTP API (``JobSubmissionClient``).

    raypeft submit pipelines/configs/demo.yaml train.lr=1e-4 --address http://127.0.0.1:8265 --follow
    raypeft status

Token authentication (Ray 2.60's default) is handled: when a token is available
(``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``) and ``RAY_AUTH_MODE`` is unset, the client
runs with ``RAY_AUTH_MODE=token``. No import of the other raypeft packages: the caller
validates the spec before anything here is called.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from pathlib import Path
from typing import Any

from cluster.connect import MLFLOW_CLIENT_ENV, token_auth_env

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


def address(explicit: str | None = None) -> str:
    addr = explicit or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if addr.startswith("ray://") or "://" not in addr:
        host = addr.split("://")[-1].split(":")[0]
        addr = f"http://{host}:8265"
    return addr


def client(addr: str | None = None):
    token_auth_env()  # before ray is imported: it reads RAY_AUTH_MODE once
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address(addr))


# The job's interpreter. Ray runs an entrypoint with /bin/sh and the head's PATH, so `python` there may be a
# system one without raypeft (a head started as `.venv/bin/ray start` without activating the venv). The
# Python that Ray runs its own workers with is the one that has Ray, and raypeft beside it: the raylet names
# it in its `--python_worker_command`, and the raylet is an ancestor of the job's shell (shell → JobSupervisor
# → raylet). RAYPEFT_JOB_PYTHON (`raypeft submit --python`) overrides it; `python` on PATH is the fallback
# where /proc can't be read.
_FIND_PYTHON = (
    "p=$PPID; py=; "
    'while [ -z "$py" ] && [ "${p:-0}" -gt 1 ]; do '
    "py=$(tr '\\0' '\\n' </proc/$p/cmdline 2>/dev/null | sed -n 's/^--python_worker_command=\\([^ ]*\\).*/\\1/p'); "
    "p=$(cut -d' ' -f4 /proc/$p/stat 2>/dev/null); done; "
)

# Run by that interpreter before anything of raypeft's is imported, so it must be plain Python 3: checks
# that what the job needs imports there, then runs the module as `python -m` would.
NEEDS = ("ray", "torch", "transformers", "peft", "mlflow", "pipelines")
_CHECK = (
    "import importlib.util as u, runpy, sys\n"
    f"lack = [n for n in {NEEDS!r} if u.find_spec(n) is None]\n"
    "if lack:\n"
    "    sys.stderr.write('raypeft: the job\\'s interpreter %s (Python %s) lacks %s, so it cannot run the job. '\n"
    "        'Fix: start the Ray head from the environment raypeft is installed in (activate it, or run its '\n"
    "        'bin/ray start), or name that Python with raypeft submit --python PATH (RAYPEFT_JOB_PYTHON)\\n'\n"
    "        % (sys.executable, sys.version.split()[0], ', '.join(lack)))\n"
    "    sys.exit(2)\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def command(spec_path: str, overrides: list[str], working_dir: str) -> list[str]:
    """``pipelines.train SPEC k=v ...``, with SPEC relative to the working dir it ships with."""
    rel = os.path.relpath(Path(spec_path).resolve(), Path(working_dir).resolve())
    if rel.startswith(".."):
        raise ValueError(
            f"the spec must be inside the working dir that is shipped to the cluster ({working_dir}); got {spec_path!r}"
        )
    return ["pipelines.train", rel, *overrides]


def entrypoint(spec_path: str, overrides: list[str], working_dir: str) -> str:
    """A shell command that runs ``python -m pipelines.train SPEC k=v ...`` with the cluster's own Python
    (see ``_FIND_PYTHON``), after checking that it has what the job imports."""
    args = " ".join(shlex.quote(a) for a in ["-c", _CHECK, *command(spec_path, overrides, working_dir)])
    return _FIND_PYTHON + f'exec "${{RAYPEFT_JOB_PYTHON:-${{py:-python}}}}" {args}'


AGENT_WAIT_S = 60  # how long a submit waits for a just-started head's job agent


def submit(
    spec_path: str,
    overrides: list[str],
    addr: str | None = None,
    working_dir: str = ".",
    env: dict[str, str] | None = None,
    job_id: str | None = None,
    python: str | None = None,
    say=print,
) -> str:
    """Submit a training job; returns the submission id. ``python`` names the job's interpreter on the
    cluster (default: the one Ray runs its workers with). A head started seconds ago answers "No available
    agent to submit job" until its job agent is up: that is retried for ``AGENT_WAIT_S``, saying so once."""
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **(env or {})}
    for key in ("MLFLOW_TRACKING_URI", *MLFLOW_CLIENT_ENV, "RAYPEFT_HOME"):
        if key in os.environ and key not in env_vars:
            env_vars[key] = os.environ[key]
    if python:
        env_vars["RAYPEFT_JOB_PYTHON"] = python
    runtime_env = {
        "working_dir": str(Path(working_dir).resolve()),
        "excludes": [".venv", ".git", "**/__pycache__", "mlruns", "*.db", "methods-compare"],
        "env_vars": env_vars,
    }
    c = client(addr)
    deadline, said = time.monotonic() + AGENT_WAIT_S, False
    while True:
        try:
            return c.submit_job(
                entrypoint=entrypoint(spec_path, overrides, working_dir), runtime_env=runtime_env, submission_id=job_id
            )
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.monotonic() > deadline:
                raise
            if not said:
                say(
                    f"[raypeft] {address(addr)}: no job agent up yet (a head just started?); retrying for {AGENT_WAIT_S} s"
                )
                said = True
            time.sleep(1)


def follow(job_id: str, addr: str | None = None, out=print) -> str:
    """Stream the job's logs until it ends; returns its final status (SUCCEEDED, FAILED, STOPPED)."""
    c = client(addr)

    async def tail():
        async for lines in c.tail_job_logs(job_id):
            out(lines.rstrip("\n"))

    asyncio.run(tail())
    return str(c.get_job_status(job_id).value)


def status(addr: str | None = None) -> dict[str, Any]:
    """Jobs, Serve applications and the cluster's resources, from the dashboard."""
    import requests

    c = client(addr)
    jobs = [
        {
            "id": j.submission_id,
            "status": str(j.status.value),
            "entrypoint": j.entrypoint[:100],
            "start": j.start_time,
            "end": j.end_time,
        }
        for j in c.list_jobs()
    ]
    headers = dict(getattr(c, "_headers", None) or {})
    base = address(addr)
    out: dict[str, Any] = {"address": base, "jobs": jobs}
    try:
        r = requests.get(f"{base}/api/serve/applications/", headers=headers, timeout=10)
        apps = r.json().get("applications", {}) if r.ok else {}
        out["serve"] = {name: a.get("status") for name, a in apps.items()}
    except requests.RequestException as e:
        out["serve"] = {"error": str(e)}
    try:
        r = requests.get(f"{base}/api/cluster_status", headers=headers, timeout=10)
        data = r.json().get("data", {}) if r.ok else {}
        usage = (data.get("clusterStatus") or {}).get("loadMetricsReport", {}).get("usage", {})
        out["resources"] = {k: {"used": v[0], "total": v[1]} for k, v in usage.items() if not k.startswith("node:")}
    except (requests.RequestException, ValueError) as e:
        out["resources"] = {"error": str(e)}
    return out


def status_command(args) -> int:
    """``raypeft status``: jobs, Serve applications and resources, as a table or JSON."""
    import json

    st = status(args.address)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"cluster {st['address']}")
    for k, v in sorted(st.get("resources", {}).items()):
        print(f"  {k:14} {v}" if k == "error" else f"  {k:14} {v['used']:g} / {v['total']:g} used")
    print(f"jobs ({len(st['jobs'])}):")
    for j in sorted(st["jobs"], key=lambda j: j["start"] or 0):
        print(f"  {j['id']:32} {j['status']:10} {j['entrypoint']}")
    print("serve applications:" + ("" if st["serve"] else " none"))
    for name, app_status in st["serve"].items():
        print(f"  {name:32} {app_status}")
    return 0

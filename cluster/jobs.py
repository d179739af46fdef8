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


def entrypoint(spec_path: str, overrides: list[str], working_dir: str) -> str:
    """``python -m pipelines.train SPEC k=v ...`` with SPEC relative to the working dir it ships with."""
    rel = os.path.relpath(Path(spec_path).resolve(), Path(working_dir).resolve())
    if rel.startswith(".."):
        raise ValueError(
            f"the spec must be inside the working dir that is shipped to the cluster ({working_dir}); got {spec_path!r}"
        )
    return " ".join(shlex.quote(a) for a in ["python", "-m", "pipelines.train", rel, *overrides])


def submit(
    spec_path: str,
    overrides: list[str],
    addr: str | None = None,
    working_dir: str = ".",
    env: dict[str, str] | None = None,
    job_id: str | None = None,
) -> str:
    """Submit a training job; returns the submission id."""
    env_vars = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **(env or {})}
    for key in ("MLFLOW_TRACKING_URI", *MLFLOW_CLIENT_ENV, "RAYPEFT_HOME"):
        if key in os.environ and key not in env_vars:
            env_vars[key] = os.environ[key]
    runtime_env = {
        "working_dir": str(Path(working_dir).resolve()),
        "excludes": [".venv", ".git", "**/__pycache__", "mlruns", "*.db", "methods-compare"],
        "env_vars": env_vars,
    }
    return client(addr).submit_job(
        entrypoint=entrypoint(spec_path, overrides, working_dir), runtime_env=runtime_env, submission_id=job_id
    )


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

"""A user's own Ray cluster and `raypeft serve`, started before the test suite and checked after it.

    python .ci/sentinels.py start DIR    # both up, healthy; their state in DIR
    python .ci/sentinels.py check DIR    # exit 1 unless both are still healthy; then stop them

The tests must touch only what they started (no `ray stop --force`, no process killed by name, free ports),
so both sentinels must survive `make test`. Each runs in its own process group on free ports with its
own temp dir, and is stopped by signalling that group.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, headers: dict | None = None) -> int:
    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except Exception as e:  # noqa: BLE001 - any failure is "not healthy"
        return getattr(e, "code", 0) or 0


def _wait(url: str, what: str, proc: subprocess.Popen, log: Path, timeout: float = 300, headers=None) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if _get(url, headers) == 200:
            return
        if proc.poll() is not None:
            sys.exit(f"sentinel {what} exited:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(2)
    sys.exit(f"sentinel {what} not healthy after {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


def start(state: Path) -> None:
    state.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    dashboard, temp = _port(), Path("/tmp") / f"rps-{os.getpid()}"
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={_port()}",
           "--num-cpus=1", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--ray-client-server-port={_port()}", f"--dashboard-agent-listen-port={_port()}", f"--temp-dir={temp}",
           "--disable-usage-stats"]  # fmt: skip
    ray_log = state / "ray.log"
    ray = subprocess.Popen(cmd, env=env, stdout=open(ray_log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)  # noqa: SIM115
    auth = {"Authorization": f"Bearer {token}"}
    _wait(f"http://127.0.0.1:{dashboard}/api/version", "ray cluster", ray, ray_log, headers=auth)

    port = _port()
    spec = state / "serve.yaml"
    spec.write_text(json.dumps({"name": "sentinel", "model": {"base": "smollm2-135m"},
                                "deployment": {"port": port, "cpus_per_replica": 0.5}}))  # fmt: skip
    serve_env = {**os.environ, "RAYPEFT_HOME": str(state / "home")}
    serve_env.pop("RAY_ADDRESS", None)
    serve_log = state / "serve.log"
    serve = subprocess.Popen([str(BIN / "raypeft"), "serve", str(spec)], env=serve_env, stdout=open(serve_log, "wb"),  # noqa: SIM115
                             stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    _wait(f"http://127.0.0.1:{port}/health", "raypeft serve", serve, serve_log)
    (state / "state.json").write_text(json.dumps({"ray": ray.pid, "dashboard": dashboard, "token": token,
                                                  "serve": serve.pid, "port": port, "temp": str(temp)}))  # fmt: skip
    print(f"[sentinels] ray head on dashboard :{dashboard}, raypeft serve on :{port}: both healthy")


def check(state: Path) -> int:
    s = json.loads((state / "state.json").read_text())
    ray_ok = _get(f"http://127.0.0.1:{s['dashboard']}/api/version", {"Authorization": f"Bearer {s['token']}"}) == 200
    serve_ok = _get(f"http://127.0.0.1:{s['port']}/health") == 200
    for pid in (s["serve"], s["ray"]):  # stop both: their own process groups only
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    time.sleep(5)
    for pid in (s["serve"], s["ray"]):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(f"[sentinels] after the tests: ray cluster {'healthy' if ray_ok else 'DEAD'}, "
          f"raypeft serve {'healthy' if serve_ok else 'DEAD'}")  # fmt: skip
    return 0 if ray_ok and serve_ok else 1


if __name__ == "__main__":
    action, where = sys.argv[1], Path(sys.argv[2])
    if action == "start":
        start(where)
    else:
        sys.exit(check(where))

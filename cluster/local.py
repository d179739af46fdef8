"""A Ray head or node of one's own on this machine (``ray start --block``): free ports, its own temp dir and
token, its own process group. For tests and benchmarks that need a cluster of their own beside any other.

Stopped by signalling that group, so no other Ray cluster on the machine (a user's, CI's sentinel) is
touched, and nothing is written to ~/.ray.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cluster.connect import free_port, set_for_local_cluster

BIN = Path(sys.executable).parent
STOP_GRACE_S = 5  # after SIGTERM, before SIGKILL of what is left of the group


def head_env(token: str, **extra) -> dict[str, str]:
    """This process's environment for a client (or the head) of a token-auth cluster, without what was set
    for this process's own local cluster (RAY_ADDRESS, its dashboard, ``connect.set_for_local_cluster``);
    ``extra`` last."""
    own = {"RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", *set_for_local_cluster()}
    env = {k: v for k, v in os.environ.items() if k not in own}
    return {
        **env,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": token,
        **extra,
    }


@contextlib.contextmanager
def _own_group(cmd: list[str], token: str, temp: str, **env) -> Iterator[tuple[subprocess.Popen, Path]]:
    """Run ``cmd`` (a ``ray start --block``) in a process group of its own, logging to ``temp``; on exit
    signal that group only (TERM, then KILL for anything left) and remove ``temp``."""
    log_path = Path(temp) / "ray-start.log"
    log = open(log_path, "wb")  # noqa: SIM115 - open for the process's lifetime
    proc = subprocess.Popen(
        cmd, env=head_env(token, **env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        yield proc, log_path
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        # the GCS and raylet exit within a second of SIGTERM; `ray start --block` itself then takes 4-9 s
        # to exit and sometimes a full minute, which a cluster of one's own need not wait for
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError):  # anything of the group still alive
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@contextlib.contextmanager
def ray_start_head(token: str, num_cpus: int, dashboard: bool = True, **env) -> Iterator[str]:
    """Yields the dashboard URL once the job server answers (or the GCS address without a dashboard). ``env``
    adds to or replaces the head's environment (e.g. a ``PATH``)."""
    with ray_head(token, num_cpus, dashboard, **env) as (gcs, url):
        yield url if dashboard else gcs


@contextlib.contextmanager
def ray_head(token: str, num_cpus: int, dashboard: bool = True, **env) -> Iterator[tuple[str, str | None]]:
    """``ray_start_head``, yielding both the GCS address (what a driver's ``RAY_ADDRESS`` names) and the
    dashboard URL (None without one)."""
    import requests

    temp = tempfile.mkdtemp(prefix="rpt-", dir="/tmp")  # short: Ray's socket paths live under it
    gcs, port = free_port(), free_port()
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        f"--num-cpus={num_cpus}", f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={port}", f"--ray-client-server-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp}", "--disable-usage-stats",
    ]  # fmt: skip
    with _own_group(cmd, token, temp, **env) as (head, log_path):
        url = f"http://127.0.0.1:{port}" if dashboard else f"127.0.0.1:{gcs}"
        for _ in range(120):  # the job server comes up a little after the head
            assert head.poll() is None, log_path.read_text(errors="replace")[-3000:]
            if not dashboard:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", gcs), timeout=2):
                    time.sleep(3)  # the GCS listens first; the raylet registers right after
                    break
            else:
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"{url}/api/version", timeout=2).status_code in (200, 401, 403):
                        break
            time.sleep(1)
        else:
            raise AssertionError(
                f"ray start --head not up after 120 s:\n{log_path.read_text(errors='replace')[-3000:]}"
            )
        yield f"127.0.0.1:{gcs}", (url if dashboard else None)


@contextlib.contextmanager
def ray_start_node(gcs: str, token: str, num_cpus: int) -> Iterator[subprocess.Popen]:
    """A second Ray node (``ray start --address``) on this machine, on free ports, in its own process group.
    Yields its ``ray start --block`` process; the node's raylet runs in that group."""
    temp = tempfile.mkdtemp(prefix="rpn-", dir="/tmp")
    cmd = [
        str(BIN / "ray"), "start", f"--address={gcs}", "--block", "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}", f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}", "--disable-usage-stats",
    ]  # fmt: skip
    with _own_group(cmd, token, temp) as (node, _):
        yield node


def wait_for_nodes(n: int, timeout: float = 120) -> None:
    """Until this driver's cluster has ``n`` alive nodes."""
    import ray

    deadline = time.time() + timeout
    while sum(1 for x in ray.nodes() if x["Alive"]) < n:
        assert time.time() < deadline, f"{n} Ray nodes not up after {timeout} s: {ray.nodes()}"
        time.sleep(1)

"""Connect to a Ray cluster, or start a local one: the one place Ray starts for every command."""

from __future__ import annotations

import os
import socket
from pathlib import Path

# The RAY_API_SERVER_ADDRESS we set for a local cluster, so that a later connection to another cluster drops it.
_published: str | None = None


def free_port() -> int:
    """A TCP port nothing listens on now (never a fixed port next to a user's own servers)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# How an MLflow client reaches a tracking server (besides the URI, which raypeft passes explicitly).
MLFLOW_CLIENT_ENV = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
    "MLFLOW_TRACKING_AUTH",
    "MLFLOW_TRACKING_AWS_SIGV4",
)


def mlflow_runtime_env() -> dict | None:
    """A Ray ``runtime_env`` carrying this process's MLflow client credentials to the actors that talk to
    the tracking server (Train workers, Serve replicas), wherever they run: on a remote cluster's nodes
    they would not inherit this process's environment. None when there is nothing to carry. Ray merges
    ``env_vars`` with the job's own runtime env (``ray job submit``'s working_dir stays)."""
    env = {k: os.environ[k] for k in MLFLOW_CLIENT_ENV if os.environ.get(k)}
    return {"env_vars": env} if env else None


def token_auth_env() -> bool:
    """Turn token authentication on for this process (and its children) when a Ray token is available
    (``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``/``~/.ray/auth_token``) and ``RAY_AUTH_MODE`` is unset,
    as ``ray start`` does for a new cluster. Returns whether it changed the environment."""
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if "RAY_AUTH_MODE" in os.environ or not (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        return False
    os.environ["RAY_AUTH_MODE"] = "token"
    return True


PREEMPTION_WATCHER = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
SERVE_PROXY_READY = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
SERVE_PROXY_READY_S = "30"
# What a local cluster (one node this process starts and stops) runs with unless the user set it:
# * no Train V2 preemption watcher: an actor per worker group polling for node drains, which cannot happen to
#   this node; it cost a process start per run and watched for nothing;
# * Serve's HTTP proxy gets 30 s a try (Ray's 5 s, three tries) to answer its controller's ready check: on a
#   busy machine (2 cores, a job beside it) it took longer, the controller killed it as unhealthy and
#   ``serve.start`` failed with ActorDiedError.
LOCAL_DEFAULTS = {PREEMPTION_WATCHER: "0", SERVE_PROXY_READY: SERVE_PROXY_READY_S}
_set_for_local: dict[str, str] = {}  # what init_ray put into this process's environment for a local cluster


def set_for_local_cluster() -> list[str]:
    """The variables ``init_ray`` set in this process's environment for a local cluster (and that still hold
    its value): a ``ray start`` cluster this process launches (``cluster.local``) must not inherit them."""
    return [k for k, v in _set_for_local.items() if os.environ.get(k) == v]


def init_ray(**kwargs) -> None:
    """``ray.init`` for every raypeft command: ``RAY_ADDRESS`` (set by ``ray job submit``) connects to that
    cluster; otherwise a local one starts ("local", explicitly: with no address Ray would attach to the
    last ``ray start`` cluster on this machine, even a dead one).

    A local cluster's dashboard gets a free port, published as ``RAY_API_SERVER_ADDRESS`` before Ray's
    processes start so that every worker inherits it. Ray's state API (which Train V2's placement-group
    cleaner and Tune's Train integration call with no address) otherwise finds the cluster by listing the
    machine's GCS processes, and fails with "Found multiple active Ray instances" when a user runs another
    Ray cluster beside ours; the cleaner's thread then dies and every finished trial's placement group
    leaks, so a sweep stalls waiting for CPUs nobody holds.
    """
    import ray

    global _published
    if ray.is_initialized():
        return
    # Train V2 echoes worker prints twice (stdout + its log redirection); a local
    # cluster inherits this process's environment, so turn the echo off there.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if _published is not None and os.environ.get("RAY_API_SERVER_ADDRESS") == _published:
        del os.environ["RAY_API_SERVER_ADDRESS"]  # set for an earlier local cluster of this process
    _published = None
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        for name, value in LOCAL_DEFAULTS.items():
            if name not in os.environ:  # a user's own setting wins
                os.environ[name] = _set_for_local[name] = value
    if address != "local" and token_auth_env():
        # A client of a token-auth cluster (``RAY_ADDRESS=... raypeft train`` from a laptop) with a token
        # at hand; Ray's config cached the mode when ray was imported, so refresh it as Ray itself does.
        from ray._raylet import Config

        Config.initialize("")
    kwargs = {"log_to_driver": True, "configure_logging": False, **kwargs}
    if (
        address == "local"
        and kwargs.get("include_dashboard") is not False
        and "RAY_API_SERVER_ADDRESS" not in os.environ
    ):
        host = kwargs.setdefault("dashboard_host", "127.0.0.1")
        port = kwargs.setdefault("dashboard_port", free_port())
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        os.environ["RAY_API_SERVER_ADDRESS"] = _published = url
    ray.init(address=address, **kwargs)

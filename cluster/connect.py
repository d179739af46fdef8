"""Connect to a Ray cluster, or start a local one: the one place Ray starts for every command."""

from __future__ import annotations

import os


def init_ray(**kwargs) -> None:
    import ray

    if not ray.is_initialized():
        # Train V2 echoes worker prints twice (stdout + its log redirection); a local
        # cluster inherits this process's environment, so turn the echo off there.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
        # RAY_ADDRESS (set by `ray job submit`) connects to that cluster; otherwise a local one starts.
        # "local" says so explicitly: with no address, Ray would attach to the last `ray start` cluster
        # on this machine (/tmp/ray/ray_current_cluster), even a dead one.
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or "local",
            **{"log_to_driver": True, "configure_logging": False, **kwargs},
        )

"""Work that waits for the cluster, said out loud.

A Ray Train worker group or a Tune trial starts once its placement group is placed. Until then the job
prints nothing: Ray warns once, in its own logs, and a run that waits for CPUs nobody frees (a leaked
placement group, a lost node not yet replaced, a GPU the cluster lacks) looks hung. ``watch_pending``
runs beside a blocking ``fit()`` and logs, every ``RAYPEFT_WAIT_REPORT_S`` seconds (default 60), each
placement group still pending after that long: what it asks, why Ray says it waits, and what the cluster
has free. ``describe_wait`` is the pure part."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

WAIT_REPORT_ENV = "RAYPEFT_WAIT_REPORT_S"


def _amounts(resources: dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU") if k in resources] + sorted(
        k for k in resources if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith("node:")
    )
    return ", ".join(f"{k} {resources[k]:g}" for k in keys) or "nothing"


def describe_wait(group: dict, waited_s: float, available: dict[str, float], total: dict[str, float]) -> str:
    """One log line for a placement group (an entry of ``ray.util.placement_group_table()``) pending for
    ``waited_s``."""
    bundles = list((group.get("bundles") or {}).values())
    asks = "; ".join(
        f"{_amounts(b)} ×{bundles.count(b)}" for b in [b for i, b in enumerate(bundles) if b not in bundles[:i]]
    )
    state = (group.get("stats") or {}).get("scheduling_state") or group.get("state", "PENDING")
    free = ", ".join(f"{k} {available.get(k, 0.0):g} of {total[k]:g}" for k in ("CPU", "GPU") if k in total)
    why = " (no node could ever hold a bundle)" if state == "INFEASIBLE" else ""
    return (
        f"[raypeft] waiting {waited_s:.0f}s for the cluster: a placement group asks {asks or 'nothing'} "
        f"({group.get('strategy', 'PACK')}), Ray says {state}{why}; free now: {free or 'nothing'}"
    )


def report_interval() -> float:
    return float(os.environ.get(WAIT_REPORT_ENV) or 60)


@contextlib.contextmanager
def watch_pending(log: Callable[[str], None] = print, every_s: float | None = None) -> Iterator[None]:
    """While the block runs, log every placement group pending for ``every_s`` (``report_interval()``) and
    again each ``every_s`` it goes on waiting. Reads Ray's tables only; changes nothing."""
    import ray

    every = every_s if every_s is not None else report_interval()
    stop = threading.Event()

    def watch() -> None:
        first_seen: dict[str, float] = {}
        told: dict[str, float] = {}
        while not stop.wait(min(every, 5.0)):
            try:
                table = ray.util.placement_group_table()
                now = time.monotonic()
                pending = {k: g for k, g in table.items() if g.get("state") in ("PENDING", "RESCHEDULING")}
                first_seen = {k: first_seen.get(k, now) for k in pending}
                due = [k for k in pending if now - first_seen[k] >= every and now - told.get(k, 0.0) >= every]
                if due:
                    available, total = ray.available_resources(), ray.cluster_resources()
                    for k in due:
                        told[k] = now
                        log(describe_wait(pending[k], now - first_seen[k], available, total))
            except Exception:  # noqa: BLE001 - a watcher never takes the job down (Ray shutting down, say)
                if not ray.is_initialized():
                    return

    thread = threading.Thread(target=watch, name="raypeft-wait-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)

"""A serving replica's metrics.

* ``prometheus_text``: the replica's own ``/metrics`` page, Prometheus text with ``# HELP`` and
  ``# TYPE`` lines and a ``replica`` label, for a quick look at one replica.
* ``ServeMetrics``: the figures an operator scrapes, as Ray metrics (``ray.util.metrics``) tagged
  like ``ray.serve.metrics`` with the replica's ``deployment``, ``replica`` and ``application``.
  Ray's metrics agent exports them on every node (``ray_raypeft_*``), one series per replica. The
  tags are set once from the replica's context, so a background thread records them too (Serve's
  own wrappers read the context at each record, which a thread does not have).
  Per adapter and tenant: requests by HTTP status, generated tokens, and histograms of request
  seconds, time to first token and time between tokens. Per replica: every engine figure of
  ``Backend.metrics()`` (queue depth, cache hits, loads, evictions, load time, …), copied every
  few seconds by a background thread.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("ray.serve")

HELP = {
    "requests_total": "Requests submitted to the engine.",
    "generated_tokens_total": "Tokens generated.",
    "engine_steps_total": "Engine iterations.",
    "engine_failed_steps_total": "Engine iterations that raised; their requests got 500.",
    "engine_compiled_steps_total": "Engine iterations run by the compiled decode step (limits.compile_decode).",
    "batch_rows_total": "Rows decoded, summed over steps (divided by steps: the mean batch).",
    "prefill_tokens_total": "Prompt tokens prefilled.",
    "queue_waiting": "Requests waiting for a row.",
    "running_rows": "Rows decoding.",
    "prefilling_rows": "Rows whose prompt is being prefilled.",
    "kv_cache_bytes": "Bytes held by the KV cache.",
    "adapter_cpu_hits_total": "Adapter lookups answered by the CPU tier.",
    "adapter_cpu_loads_total": "Adapters read into the CPU tier.",
    "adapter_cpu_evictions_total": "Adapters dropped from the CPU tier.",
    "adapter_cpu_bytes": "Bytes held by the CPU tier.",
    "adapter_slot_hits_total": "Requests whose adapter was already in a slot.",
    "adapter_slot_loads_total": "Adapters copied into a slot.",
    "adapter_slot_evictions_total": "Adapters replaced in a slot.",
    "adapter_load_seconds_p50": "Median seconds to read an adapter (the latest 1,024 reads).",
}
SECONDS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
GAPS = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]


def prometheus_text(values: dict[str, float], replica: str) -> str:
    """Prometheus exposition text for ``values`` (``name`` → value; ``*_total`` are counters)."""
    lines = []
    for name, value in values.items():
        metric = f"raypeft_{name}"
        lines.append(f"# HELP {metric} {HELP.get(name, name.replace('_', ' '))}")
        lines.append(f"# TYPE {metric} {'counter' if name.endswith('_total') else 'gauge'}")
        lines.append(
            f'{metric}{{replica="{replica}"}} {value:.6g}'
            if isinstance(value, float)
            else f'{metric}{{replica="{replica}"}} {value}'
        )
    return "\n".join(lines) + "\n"


class ServeMetrics:
    """See the module docstring. Made inside a Serve replica; elsewhere the tags say ``local``."""

    def __init__(self, backend, interval_s: float = 2.0):
        from ray import serve
        from ray.util import metrics

        try:
            ctx = serve.get_replica_context()
            self.replica = ctx.replica_id.unique_id
            self._tags = {"deployment": ctx.deployment, "replica": self.replica, "application": ctx.app_name or ""}
        except Exception:  # noqa: BLE001 - outside a replica (a unit test)
            self.replica = "local"
            self._tags = {"deployment": "local", "replica": "local", "application": ""}
        self._metrics = metrics
        by = ("adapter", "tenant")
        self.requests = self._make(
            metrics.Counter,
            "raypeft_adapter_requests",
            "Requests answered, by adapter, tenant and HTTP status (499: the client left mid-stream).",
            (*by, "status"),
        )
        self.tokens = self._make(metrics.Counter, "raypeft_adapter_generated_tokens", "Tokens generated.", by)
        self.seconds = self._make(
            metrics.Histogram,
            "raypeft_adapter_request_seconds",
            "Seconds from a request's arrival to its answer's end.",
            by,
            boundaries=SECONDS,
        )
        self.ttft = self._make(
            metrics.Histogram,
            "raypeft_adapter_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first streamed text.",
            by,
            boundaries=SECONDS,
        )
        self.itl = self._make(
            metrics.Histogram,
            "raypeft_adapter_inter_token_seconds",
            "Seconds between a request's successive pieces of text.",
            by,
            boundaries=GAPS,
        )
        self._backend, self._last = backend, {}
        self._engine: dict[str, object] = {}
        self.export_engine()
        threading.Thread(target=self._copy_engine, args=(interval_s,), name="raypeft-metrics", daemon=True).start()

    def _make(self, kind, name: str, description: str, keys: tuple[str, ...] = (), **kw):
        metric = kind(name, description=description, tag_keys=(*self._tags, *keys), **kw)
        return metric.set_default_tags(self._tags)

    def answered(self, labels: dict[str, str], status: int, started: float, tokens: int) -> None:
        """One answer: ``labels`` are its ``adapter`` and ``tenant``."""
        self.requests.inc(1, {**labels, "status": str(status)})
        if tokens:
            self.tokens.inc(tokens, labels)
        self.seconds.observe(time.time() - started, labels)

    def token_time(self, labels: dict[str, str], seconds: float, first: bool) -> None:
        (self.ttft if first else self.itl).observe(seconds, labels)

    def _copy_engine(self, interval_s: float) -> None:
        while True:
            try:
                self.export_engine()
            except Exception as e:  # noqa: BLE001 - metrics must never take the replica down
                log.warning("raypeft: engine metrics not exported: %s", e)
            time.sleep(interval_s)

    def export_engine(self) -> None:
        """The backend's figures into Ray metrics: counters by their increase, gauges as they are."""
        for name, value in self._backend.metrics().items():
            if name.endswith("_total"):
                base = f"raypeft_engine_{name[: -len('_total')]}"
                metric = self._engine.get(name) or self._make(self._metrics.Counter, base, HELP.get(name, ""))
                grew = value - self._last.get(name, 0)
                if grew > 0:
                    metric.inc(grew)
            else:
                metric = self._engine.get(name) or self._make(
                    self._metrics.Gauge, f"raypeft_engine_{name}", HELP.get(name, "")
                )
                metric.set(value)
            self._engine[name], self._last[name] = metric, value

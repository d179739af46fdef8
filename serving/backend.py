"""The seam between the HTTP layer and a generation engine.

``serving.app`` talks to its engine only through ``Backend``: it starts and stops it, asks
whether an adapter is one the backend can serve, adds (resolves and reads) adapters, submits
``Request``s whose events it streams, cancels them, and reads metrics. Today's batched
multi-adapter engine (``serving.engine.Engine``) is one backend; docs/serving.md says how a
vLLM backend would fit behind the same seam.

A request's events, in order, through ``Request.push``:

* ``("delta", text)``: more completion text (never splits a character or a possible stop string);
* ``("logprobs", [(token_id, logprob, [(token_id, logprob), …]), …])`` just before the delta those
  tokens produced (or before the final event), when the request asked for ``logprobs``;
* then exactly one of ``("done", finish_reason)``, ``("error", message)`` (the engine failed
  the request: HTTP 500) or ``("adapter_error", message)`` (its adapter could not be loaded:
  HTTP 424).

Pure Python: no torch, no Ray.
"""

from __future__ import annotations

import itertools
import json
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

FINAL = ("done", "error", "adapter_error")


class Overloaded(RuntimeError):
    """The waiting queue is full (HTTP 503 with Retry-After)."""


class TooLarge(ValueError):
    """The request can never fit this backend (HTTP 400, naming the limit)."""


_ids = itertools.count(1)


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str | None = None  # None: the bare base
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks; vLLM's sampling flag)
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely alternatives
    id: int = field(default_factory=lambda: next(_ids))
    out_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the completion already sent
    finish_reason: str | None = None
    events: queue.Queue[tuple[str, str]] = field(default_factory=queue.Queue)
    created: float = field(default_factory=time.time)
    sink: Callable[[tuple[str, str]], None] | None = None  # e.g. hand events to an asyncio loop
    state: Any = None  # the backend's own per-request state (the engine keeps its slot and RNG here)

    def push(self, event: tuple[str, str]) -> None:
        (self.sink or self.events.put)(event)


@runtime_checkable
class Backend(Protocol):
    """What the HTTP layer needs from an engine, and nothing more."""

    def start(self) -> None:
        """Start generating (e.g. the loop thread); returns at once."""

    def stop(self) -> None:
        """Stop generating; requests still running get no further events."""

    def alive(self) -> bool:
        """False once the backend can no longer answer (``/health`` turns 503)."""

    def supports(self, adapter_dir: str | Path) -> str | None:
        """None when this backend can serve the adapter in ``adapter_dir``; else the reason it cannot."""

    def add_adapter(self, name: str) -> None:
        """Resolve ``name`` and read it into the backend's memory ahead of use (blocking; thread-safe)."""

    def submit(self, req: Request) -> Request:
        """Queue ``req``; its events go through ``req.push``. Raises ``Overloaded`` when full and
        ``TooLarge`` for a request that could never run."""

    def cancel(self, req: Request) -> None:
        """Forget ``req`` (its client left or timed out); a no-op once it is finished."""

    def metrics(self) -> dict[str, float]:
        """Counters and gauges, by name (see ``serving.engine.Engine.metrics``)."""


def adapter_support(adapter_dir: str | Path, *, max_rank: int, kinds: tuple[str, ...] = ("LORA",)) -> str | None:
    """The reason a PEFT adapter directory cannot be served by a backend that takes ``kinds`` up to
    ``max_rank`` (None when it can). Reads only ``adapter_config.json`` and the file list."""
    path = Path(adapter_dir)
    try:
        cfg = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        return f"no readable adapter_config.json in {path}: {e}"
    kind = cfg.get("peft_type")
    if kind not in kinds:
        return f"peft_type {kind!r} is not served (this backend serves {', '.join(kinds)})"
    if not (path / "adapter_model.safetensors").is_file():
        return "no adapter_model.safetensors (pickled .bin adapters are refused)"
    ranks = [cfg.get("r") or 0, *(cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > max_rank:
        return f"rank {max(ranks)} exceeds the served maximum rank {max_rank} (cache.max_rank)"
    return None

"""Iteration-level batched generation over one shared base with per-row adapters.

One ``Engine`` runs one loop (``step``) over a running batch. Every step it

1. admits waiting requests (up to ``max_batch`` rows) whose adapter is at hand: an adapter
   already in a slot is shared; one in the CPU tier is copied into the least recently used
   unpinned slot; one on disk (or in the registry) is read into the CPU tier by a
   background thread, and only the requests for that adapter wait for it;
2. prefills the admitted prompts together (left-padded) and merges their KV cache into
   the running batch's cache, so a new request joins without waiting for others to end;
3. decodes one token for every running row in one forward pass, each row through its
   own adapter (``serving.lora_batch``);
4. retires rows that hit EOS, a stop string or ``max_tokens``.

Device discipline: every tensor the engine makes for the model (ids, masks, positions,
slot indices, sampled tokens, RNGs) is made on the model's device, and the step reads
device values back in one place (``_host``, once per step). A step that raises fails
the requests it touched with an ``("error", …)`` event, and the loop carries on.

``Engine`` is the ``serving.backend.Backend`` the HTTP layer uses. No Ray here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from serving.backend import Overloaded, Request, adapter_support
from serving.cache import LRU, SlotTable
from serving.lora_batch import AdapterWeights, MultiLoraModel

__all__ = ["Engine", "Overloaded", "Request"]

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """The engine's state of one request (``Request.state``)."""

    slot: int = 0
    generator: torch.Generator | None = None


class Engine:
    """See the module docstring. ``resolve(name) -> adapter directory`` raises KeyError for an unknown adapter."""

    def __init__(
        self,
        multi: MultiLoraModel,
        tokenizer,
        resolve: Callable[[str], str],
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        cpu_cache_items: int = 64,
        cpu_cache_bytes: int = 2 << 30,
        load_threads: int = 2,
    ):
        self.multi, self.tok, self.resolve = multi, tokenizer, resolve
        self.model = multi.model
        self.device = multi.device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.cpu = LRU(cpu_cache_items, cpu_cache_bytes)
        self.slots = SlotTable(multi.slots)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.row_slots: list[int] = []
        self.lengths: list[int] = []  # real tokens in each running row's cache (host-side)
        self.cache = None  # the running batch's KV cache (transformers DynamicCache), on the device
        self.mask: torch.Tensor | None = None  # [rows, cache length] 1 = real token
        self.positions: torch.Tensor | None = None  # [rows] position of the next token
        self.last: torch.Tensor | None = None  # [rows] last sampled token
        self.lock = threading.Condition()
        self.cache_lock = threading.Lock()
        self._loads = ThreadPoolExecutor(load_threads, thread_name_prefix="raypeft-adapter-read")
        self._loading: dict[str, Future] = {}
        self._joining: list[Request] = []  # admitted this step, not yet merged into ``running``
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        self.eos = {
            t for t in [tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])] if t is not None
        }
        self.stats = {
            "requests": 0,
            "tokens": 0,
            "steps": 0,
            "batch_rows": 0,
            "failed_steps": 0,
            "adapter_load_s": deque(maxlen=1024),  # the latest reads, for a p50
        }
        self._stop = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ the Backend seam

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="raypeft-engine", daemon=True)
        self._thread.start()

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def supports(self, adapter_dir: str | Path) -> str | None:
        return adapter_support(adapter_dir, max_rank=self.multi.r_max)

    def submit(self, req: Request) -> Request:
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise Overloaded(f"{len(self.waiting)} requests are waiting (max_queue {self.max_queue})")
            gen = None
            if req.seed is not None:
                gen = torch.Generator(device=self.device).manual_seed(req.seed)
            req.state = _Row(generator=gen)
            self.waiting.append(req)
            self.stats["requests"] += 1
            self.lock.notify()
        return req

    def cancel(self, req: Request) -> None:
        """Forget a request whose client went away (or timed out): it frees its row at the next step."""
        self._remove_waiting(req)
        if req.finish_reason is None:
            req.finish_reason = "cancelled"

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify_all()
        self._loads.shutdown(wait=False, cancel_futures=True)

    def add_adapter(self, name: str) -> AdapterWeights:
        """The adapter's tensors from the CPU tier, or read from its source into it (blocking, thread-safe;
        a read already under way for ``name`` is shared)."""
        with self.cache_lock:
            weights = self.cpu.get(name)
            if weights is not None:
                return weights
            fut = self._loading.get(name)
            if fut is None or fut.done():
                fut = self._loads_submit(name)
        return fut.result()

    def metrics(self) -> dict[str, float]:
        st = self.stats
        loads = sorted(st["adapter_load_s"])
        return {
            "requests_total": st["requests"],
            "generated_tokens_total": st["tokens"],
            "engine_steps_total": st["steps"],
            "engine_failed_steps_total": st["failed_steps"],
            "batch_rows_total": st["batch_rows"],
            "queue_waiting": len(self.waiting),
            "running_rows": len(self.running),
            "adapter_cpu_hits_total": self.cpu.stats.hits,
            "adapter_cpu_loads_total": self.cpu.stats.loads,
            "adapter_cpu_evictions_total": self.cpu.stats.evictions,
            "adapter_cpu_bytes": self.cpu.bytes,
            "adapter_slot_hits_total": self.slots.stats.hits,
            "adapter_slot_loads_total": self.slots.stats.loads,
            "adapter_slot_evictions_total": self.slots.stats.evictions,
            "adapter_load_seconds_p50": loads[len(loads) // 2] if loads else 0.0,
        }

    def run_forever(self) -> None:
        while not self._stop:
            with self.lock:
                while not self.waiting and not self.running and not self._stop:
                    self.lock.wait(timeout=0.5)
            if self._stop:
                break
            if not self.step():
                with self.lock:  # every waiting request waits for its adapter's read: sleep until one ends
                    self.lock.wait(timeout=0.05)

    # ------------------------------------------------------------------ adapter reads (off the loop)

    def _loads_submit(self, name: str) -> Future:
        """Start reading ``name`` into the CPU tier (caller holds ``cache_lock``)."""
        fut = self._loads.submit(self._read, name)
        self._loading[name] = fut
        fut.add_done_callback(lambda _: self._wake())
        return fut

    def _read(self, name: str) -> AdapterWeights:
        t0 = time.perf_counter()
        path = self.resolve(name)
        reason = self.supports(path)
        if reason is not None:
            raise ValueError(f"adapter {name!r}: {reason}")
        weights = AdapterWeights.from_dir(name, path)
        with self.cache_lock:
            self.cpu.put(name, weights, weights.nbytes)
        self.stats["adapter_load_s"].append(time.perf_counter() - t0)
        return weights

    def _wake(self) -> None:
        with self.lock:
            self.lock.notify_all()

    def _at_hand(self, name: str) -> AdapterWeights | None:
        """``name``'s tensors if they are in memory; else start (or keep waiting for) their read and return
        None. Raises the read's error once it failed."""
        with self.cache_lock:
            weights = self.cpu.get(name)
            if weights is not None:
                return weights
            fut = self._loading.get(name)
            if fut is None:
                self._loads_submit(name)
                return None
            if not fut.done():
                return None
            del self._loading[name]
        return fut.result()  # the tensors even if the CPU tier has dropped them since

    # ------------------------------------------------------------------ one iteration

    def step(self) -> bool:
        """One iteration; False when nothing could run (every waiting request waits for its adapter).
        An exception fails the requests this step touched and leaves the engine ready for new ones."""
        try:
            with torch.no_grad():
                return self._step()
        except Exception as e:  # noqa: BLE001 - one bad step must not end the loop or other requests
            log.exception("raypeft: a generation step failed; failing its %d requests", len(self.running))
            self.stats["failed_steps"] += 1
            self._fail_all(f"generation failed: {type(e).__name__}: {e}")
            return True

    def _step(self) -> bool:
        admitted = self._admit()
        if admitted:
            self._joining = admitted
            self._prefill(admitted)
            self._joining = []
        if self.running:
            self._decode()
        self.stats["steps"] += 1
        return bool(admitted or self.running)

    def _fail_all(self, message: str) -> None:
        for req in {id(r): r for r in [*self.running, *self._joining]}.values():
            if req.finish_reason is None:
                req.finish_reason = "error"
                req.push(("error", message))
        self.slots.pins.clear()  # no row runs any more, so no slot is in use
        self._joining = []
        self._select([])

    def _admit(self) -> list[Request]:
        with self.lock:
            candidates = list(self.waiting)
        admitted = []
        for req in candidates:
            if len(self.running) + len(admitted) >= self.max_batch:
                break
            if req.adapter is not None:
                if not self._into_slot(req):
                    continue
            self._remove_waiting(req)
            admitted.append(req)
        return admitted

    def _into_slot(self, req: Request) -> bool:
        """Pin a slot holding ``req``'s adapter; False while the request must wait (its adapter is being
        read, or every slot is pinned). A failed read fails the request."""
        name = req.adapter
        weights = None
        if name not in self.slots.slot_of:
            try:
                weights = self._at_hand(name)
            except Exception as e:  # noqa: BLE001 - a bad adapter fails only its own requests
                self._remove_waiting(req)
                req.finish_reason = "error"
                req.push(("adapter_error", f"adapter {name!r} could not be loaded: {e}"))
                return False
            if weights is None:
                return False
        got = self.slots.acquire(name)
        if got is None:
            return False  # every slot pinned by running rows: wait for one to finish
        slot, _, needs_load = got
        if needs_load:
            try:
                self.multi.load(slot, weights)
            except Exception as e:  # noqa: BLE001 - e.g. it targets modules this server does not wrap
                self.slots.forget(name)
                self.multi.evict(slot)
                self._remove_waiting(req)
                req.finish_reason = "error"
                req.push(("adapter_error", f"adapter {name!r} could not be loaded: {e}"))
                return False
        req.state.slot = slot
        return True

    def _remove_waiting(self, req: Request) -> None:
        with self.lock:
            if req in self.waiting:
                self.waiting.remove(req)

    def _prefill(self, reqs: list[Request]) -> None:
        from transformers import DynamicCache

        longest = max(len(r.prompt_ids) for r in reqs)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(reqs), longest), pad, dtype=torch.long)  # built on the host, copied once
        mask = torch.zeros((len(reqs), longest), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding
            ids[i, longest - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, longest - len(r.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = (t.to(self.device, non_blocking=True) for t in (ids, mask, positions))
        slots = [r.state.slot for r in reqs]
        self.multi.rows(slots)
        out = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=DynamicCache(), use_cache=True
        )
        first = self._sample(out.logits[:, -1, :].float(), reqs)
        self._merge(reqs, slots, out.past_key_values, mask, positions[:, -1] + 1, first)
        self._emit(reqs, first)

    def _merge(self, reqs, slots, cache, mask, positions, first) -> None:
        lengths = [len(r.prompt_ids) for r in reqs]
        if not self.running:
            self.cache, self.mask, self.positions, self.last = cache, mask, positions, first
            self.running, self.row_slots, self.lengths = list(reqs), slots, lengths
            return
        t_old, t_new = self.mask.shape[1], mask.shape[1]
        width = max(t_old, t_new)
        for old_layer, new_layer in zip(self.cache.layers, cache.layers):
            old_layer.keys = torch.cat([_left_pad(old_layer.keys, width), _left_pad(new_layer.keys, width)], dim=0)
            old_layer.values = torch.cat(
                [_left_pad(old_layer.values, width), _left_pad(new_layer.values, width)], dim=0
            )
        self.mask = torch.cat([_left_pad_mask(self.mask, width), _left_pad_mask(mask, width)], dim=0)
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, first])
        self.running += reqs
        self.row_slots += slots
        self.lengths += lengths

    def _decode(self) -> None:
        rows = len(self.running)
        self.mask = torch.cat([self.mask, torch.ones((rows, 1), dtype=torch.long, device=self.device)], dim=1)
        self.lengths = [n + 1 for n in self.lengths]
        self.multi.rows(self.row_slots)
        out = self.model(
            input_ids=self.last.view(-1, 1),
            attention_mask=self.mask,
            position_ids=self.positions.view(-1, 1),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        self.positions = self.positions + 1
        nxt = self._sample(out.logits[:, -1, :].float(), self.running)
        self.last = nxt
        self.stats["batch_rows"] += rows
        self._emit(self.running, nxt)

    @staticmethod
    def _host(tokens: torch.Tensor) -> list[int]:
        """The step's one device-to-host read: the sampled token of every row."""
        return tokens.tolist()

    def _emit(self, reqs: list[Request], tokens: torch.Tensor) -> None:
        """Append each row's token, stream the new text, and retire finished rows."""
        done = []
        for req, tok in zip(reqs, self._host(tokens)):
            if req.finish_reason is not None:
                continue
            self.stats["tokens"] += 1
            if tok in self.eos and not req.ignore_eos:
                req.finish_reason = "stop"
            else:
                req.out_ids.append(tok)
            text = self.tok.decode(req.out_ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in req.stop if s and s in text), default=-1)
            if cut >= 0:
                text, req.finish_reason = text[:cut], "stop"
            elif req.finish_reason is None and len(req.out_ids) >= req.max_tokens:
                req.finish_reason = "length"
            # hold back a tail that could still become a stop string
            hold = 0 if req.finish_reason else max((len(s) - 1 for s in req.stop), default=0)
            safe = len(text) - hold
            if text.endswith("\ufffd") and not req.finish_reason:  # an unfinished multi-byte character
                safe = min(safe, len(text) - 1)
            if safe > req.emitted:
                req.push(("delta", text[req.emitted : safe]))
                req.emitted = safe
            if req.finish_reason:
                done.append(req)
        for req in done:
            req.push(("done", req.finish_reason))
        retired = [r for r in self.running if r.finish_reason is not None]  # finished or cancelled
        for req in retired:
            if req.adapter is not None:
                self.slots.release(req.adapter)
        if retired:
            self._select([i for i, r in enumerate(self.running) if r.finish_reason is None])

    def _select(self, keep: list[int]) -> None:
        if not keep:
            self.running, self.row_slots, self.lengths = [], [], []
            self.cache = self.mask = self.positions = self.last = None
            return
        idx = torch.tensor(keep, device=self.device)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
        self.mask, self.positions, self.last = self.mask[idx], self.positions[idx], self.last[idx]
        self.running = [self.running[i] for i in keep]
        self.row_slots = [self.row_slots[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        start = self.mask.shape[1] - max(self.lengths)  # columns that are padding for every remaining row
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        out = logits.argmax(-1)
        for i, req in enumerate(reqs):
            if req.temperature <= 0:
                continue
            probs = torch.softmax(logits[i] / req.temperature, -1)
            if req.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < req.top_p  # a mask, not an index: no device sync
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p * keep)
            out[i : i + 1] = torch.multinomial(probs, 1, generator=req.state.generator)
        return out


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, heads, T, dim] → [rows, heads, width, dim], zeros on the left."""
    missing = width - t.shape[2]
    return t if missing == 0 else torch.nn.functional.pad(t, (0, 0, missing, 0))


def _left_pad_mask(m: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - m.shape[1]
    return m if missing == 0 else torch.nn.functional.pad(m, (missing, 0))

"""Iteration-level batched generation over one shared base with per-row adapters.

One ``Engine`` runs one loop (``step``) over a running batch. Every step it

1. admits waiting requests (up to ``max_batch`` rows) whose adapter can get a slot: an
   adapter already in a slot is shared; otherwise the least recently used unpinned
   slot is reloaded from the CPU tier (or from disk into the CPU tier);
2. prefills the admitted prompts together (left-padded) and merges their KV cache into
   the running batch's cache, so a new request joins without waiting for others to end;
3. decodes one token for every running row in one forward pass, each row through its
   own adapter (``serving.lora_batch``);
4. retires rows that hit EOS, a stop string or ``max_tokens``.

Requests carry a thread-safe event queue (``events``) that the HTTP layer reads:
``("delta", text)``, then ``("done", finish_reason)`` or ``("error", message)``.
No Ray here; ``serving.app`` runs the loop in a Ray Serve replica.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from serving.cache import LRU, SlotTable
from serving.lora_batch import AdapterWeights, MultiLoraModel


class Overloaded(RuntimeError):
    """The waiting queue is full (HTTP 503 with Retry-After)."""


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
    slot: int = 0
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks; vLLM's sampling flag)
    id: int = field(default_factory=lambda: next(_ids))
    out_ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the completion already sent
    finish_reason: str | None = None
    events: queue.Queue[tuple[str, str]] = field(default_factory=queue.Queue)
    generator: torch.Generator | None = None
    created: float = field(default_factory=time.time)
    sink: Callable[[tuple[str, str]], None] | None = None  # e.g. hand events to an asyncio loop

    def push(self, event: tuple[str, str]) -> None:
        (self.sink or self.events.put)(event)

    def text(self, tokenizer) -> str:
        return tokenizer.decode(self.out_ids, skip_special_tokens=True)


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
        device: str = "cpu",
    ):
        self.multi, self.tok, self.resolve = multi, tokenizer, resolve
        self.model = multi.model
        self.max_batch, self.max_queue, self.device = max_batch, max_queue, device
        self.cpu = LRU(cpu_cache_items, cpu_cache_bytes)
        self.slots = SlotTable(multi.slots)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.row_slots: list[int] = []
        self.cache = None  # the running batch's KV cache (transformers DynamicCache)
        self.mask: torch.Tensor | None = None  # [rows, cache length] 1 = real token
        self.positions: torch.Tensor | None = None  # [rows] position of the next token
        self.last: torch.Tensor | None = None  # [rows] last sampled token
        self.lock = threading.Condition()
        self.cache_lock = threading.Lock()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        self.eos = {
            t for t in [tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])] if t is not None
        }
        self.stats = {"requests": 0, "tokens": 0, "adapter_load_s": [], "steps": 0, "batch_rows": 0}
        self._stop = False

    # ------------------------------------------------------------------ public

    def submit(self, req: Request) -> Request:
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise Overloaded(f"{len(self.waiting)} requests are waiting (max_queue {self.max_queue})")
            if req.seed is not None:
                req.generator = torch.Generator().manual_seed(req.seed)
            self.waiting.append(req)
            self.stats["requests"] += 1
            self.lock.notify()
        return req

    def run_forever(self) -> None:
        while not self._stop:
            with self.lock:
                while not self.waiting and not self.running and not self._stop:
                    self.lock.wait(timeout=0.5)
            if self._stop:
                break
            self.step()

    def cancel(self, req: Request) -> None:
        """Forget a request whose client went away (or timed out): it frees its row at the next step."""
        self._remove_waiting(req)
        if req.finish_reason is None:
            req.finish_reason = "cancelled"

    def stop(self) -> None:
        with self.lock:
            self._stop = True
            self.lock.notify_all()

    def load_adapter(self, name: str) -> AdapterWeights:
        """The adapter's tensors from the CPU tier, or read from its source into it (thread-safe:
        the HTTP side prefetches while the engine loop admits)."""
        with self.cache_lock:
            weights = self.cpu.get(name)
            if weights is None:
                t0 = time.perf_counter()
                weights = AdapterWeights.from_dir(name, self.resolve(name))
                self.cpu.put(name, weights, weights.nbytes)
                self.stats["adapter_load_s"].append(time.perf_counter() - t0)
            return weights

    # ------------------------------------------------------------------ one iteration

    @torch.no_grad()
    def step(self) -> None:
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self.running:
            self._decode()
        self.stats["steps"] += 1

    def _admit(self) -> list[Request]:
        with self.lock:
            candidates = list(self.waiting)
        admitted = []
        for req in candidates:
            if len(self.running) + len(admitted) >= self.max_batch:
                break
            slot = 0
            if req.adapter is not None:
                got = self.slots.acquire(req.adapter)
                if got is None:
                    continue  # every slot pinned by running rows: wait for one to finish
                slot, _, needs_load = got
                if needs_load:
                    try:
                        self.multi.load(slot, self.load_adapter(req.adapter))
                    except Exception as e:  # noqa: BLE001 - a bad adapter fails only its own requests
                        self.slots.forget(req.adapter)
                        self.multi.evict(slot)
                        self._remove_waiting(req)
                        req.push(("error", f"adapter {req.adapter!r} could not be loaded: {e}"))
                        continue
            req.slot = slot
            self._remove_waiting(req)
            admitted.append(req)
        return admitted

    def _remove_waiting(self, req: Request) -> None:
        with self.lock:
            if req in self.waiting:
                self.waiting.remove(req)

    def _prefill(self, reqs: list[Request]) -> None:
        from transformers import DynamicCache

        longest = max(len(r.prompt_ids) for r in reqs)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(reqs), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(reqs), longest), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding
            ids[i, longest - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, longest - len(r.prompt_ids) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        self.multi.rows([r.slot for r in reqs])
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            past_key_values=cache,
            use_cache=True,
        )
        first = self._sample(out.logits[:, -1, :].float(), reqs)
        self._merge(reqs, out.past_key_values, mask, mask.sum(-1), first)
        self._emit(reqs, first)

    def _merge(self, reqs, cache, mask, positions, first) -> None:
        if not self.running:
            self.cache, self.mask, self.positions, self.last = cache, mask, positions, first
            self.running, self.row_slots = list(reqs), [r.slot for r in reqs]
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
        self.row_slots += [r.slot for r in reqs]

    def _decode(self) -> None:
        self.mask = torch.cat([self.mask, torch.ones((len(self.running), 1), dtype=torch.long)], dim=1)
        self.multi.rows(self.row_slots)
        out = self.model(
            input_ids=self.last.view(-1, 1).to(self.device),
            attention_mask=self.mask.to(self.device),
            position_ids=self.positions.view(-1, 1).to(self.device),
            past_key_values=self.cache,
            use_cache=True,
        )
        self.cache = out.past_key_values
        self.positions = self.positions + 1
        nxt = self._sample(out.logits[:, -1, :].float(), self.running)
        self.last = nxt
        self.stats["batch_rows"] += len(self.running)
        self._emit(self.running, nxt)

    def _emit(self, reqs: list[Request], tokens: torch.Tensor) -> None:
        """Append each row's token, stream the new text, and retire finished rows."""
        done = []
        for req, tok in zip(reqs, tokens.tolist()):
            if req.finish_reason is not None:
                continue
            self.stats["tokens"] += 1
            if tok in self.eos and not req.ignore_eos:
                req.finish_reason = "stop"
            else:
                req.out_ids.append(tok)
            text = req.text(self.tok)
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
            self.running, self.row_slots, self.cache, self.mask, self.positions, self.last = (
                [],
                [],
                None,
                None,
                None,
                None,
            )
            return
        idx = torch.tensor(keep)
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, idx), layer.values.index_select(0, idx)
        self.mask, self.positions, self.last = self.mask[idx], self.positions[idx], self.last[idx]
        # drop columns that are padding for every remaining row
        real = self.mask.any(0).nonzero()
        start = int(real[0]) if len(real) else 0
        if start:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
        self.running = [self.running[i] for i in keep]
        self.row_slots = [self.row_slots[i] for i in keep]

    def _sample(self, logits: torch.Tensor, reqs: list[Request]) -> torch.Tensor:
        out = torch.empty(len(reqs), dtype=torch.long)
        greedy = logits.argmax(-1)
        for i, req in enumerate(reqs):
            if req.temperature <= 0:
                out[i] = greedy[i]
                continue
            probs = torch.softmax(logits[i] / req.temperature, -1)
            if req.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(-1) - sorted_p < req.top_p
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            out[i] = torch.multinomial(probs, 1, generator=req.generator).item()
        return out


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """[rows, heads, T, dim] → [rows, heads, width, dim], zeros on the left."""
    missing = width - t.shape[2]
    return t if missing == 0 else torch.nn.functional.pad(t, (0, 0, missing, 0))


def _left_pad_mask(m: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - m.shape[1]
    return m if missing == 0 else torch.nn.functional.pad(m, (missing, 0))

"""Iteration-level batched generation over one shared base with per-row adapters.

One ``Engine`` runs one loop (``step``) over a running batch. Every step it

1. admits waiting requests (up to ``max_batch`` rows) whose adapter is at hand: an adapter
   already in a slot is shared; one in the CPU tier is copied into the least recently used
   unpinned slot; one on disk (or in the registry) is read into the CPU tier by a
   background thread, and only the requests for that adapter wait for it;
2. runs one forward pass (``serving.kv``) over one token for every decoding row and the joining
   rows' next prompt chunks, each row through its own adapter (``serving.lora_batch``). The
   chunks hold at most ``prefill_chunk_tokens`` tokens in all, and fewer while rows decode, sized
   from measured step times so that the step takes about ``prefill_slowdown`` × a decode step
   (``serving.schedule``). So running rows keep streaming while long prompts arrive;
3. samples: the decoding rows' next tokens, and the first token of each row whose prompt is now
   done, which joins the decoding rows;
4. retires rows that hit EOS, a stop string or ``max_tokens``.

Rows live in a preallocated KV cache with per-row lengths (``serving.kv.RowCache``): joining
takes a free row and leaving hands the row over, copying one row at most, never the whole
cache. Admission counts the cache's bytes against ``max_kv_bytes``.

Device discipline: every tensor the engine makes for the model (ids, masks, positions,
slot indices, sampling parameters) is made on the model's device, and a step reads device values
back once (``_host``: the sampled tokens of the decoding rows and of the rows whose prompt is done, with
the logprobs asked for, in one transfer). Sampling is batched and seeded per row
(``serving.sampling``), and the text is decoded incrementally (``serving.detokenize``). A step that raises fails
the requests it touched with an ``("error", …)`` event, and the loop carries on.

``Engine`` is the ``serving.backend.Backend`` the HTTP layer uses. No Ray here.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from serving import kv as kv_attention
from serving.backend import Overloaded, Request, TooLarge, adapter_support
from serving.cache import LRU, SlotTable
from serving.detokenize import IncrementalText
from serving.kv import RowCache
from serving.lora_batch import AdapterWeights, MultiLoraModel
from serving.sampling import sample
from serving.schedule import ChunkBudget

__all__ = ["Engine", "Overloaded", "Request", "TooLarge"]

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """The engine's state of one request (``Request.state``)."""

    text: IncrementalText
    seed: int  # the request's, or a random one: its draws depend on nothing else (serving.sampling)
    slot: int = 0
    fed: int = 0  # prompt tokens prefilled so far
    logprobs: list = field(default_factory=list)  # (token, logprob, top) not yet sent


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
        prefill_chunk_tokens: int = 256,
        prefill_slowdown: float | None = 1.8,
        max_context: int = 4096,
        max_kv_bytes: int | None = None,
        compile_decode: bool = False,
        compile_backend: str = "inductor",
    ):
        self.multi, self.tok, self.resolve = multi, tokenizer, resolve
        self.model = multi.model
        self.device = multi.device
        self.max_batch, self.max_queue = max_batch, max_queue
        self.budget = ChunkBudget(prefill_chunk_tokens, prefill_slowdown)
        self.max_kv_bytes = float("inf") if max_kv_bytes is None else max_kv_bytes
        self.dtype = multi.dtype
        self.layer_windows = _layer_windows(self.model.config)
        kv_attention.register()
        self.model.set_attn_implementation(kv_attention.ROWS_ATTENTION)  # every pass is a RowCache pass
        # decode-only passes through torch.compile (inductor), every row down one LoRA path at full width
        # (``MultiLoraLinear._uniform``): the stacks are made ``r_max`` wide now and never move
        self._compiled, self._warm = None, False
        if compile_decode:
            multi.widen(max_batch)
            self._compiled = _compile(self.model, compile_backend)
        self.kv = RowCache(max_batch, max_context, self.device, _kv_bytes_per_token(self.model.config, self.dtype))
        self.cpu = LRU(cpu_cache_items, cpu_cache_bytes)
        self.slots = SlotTable(multi.slots)
        self.waiting: list[Request] = []
        self.rows: list[Request] = []  # row i of the KV cache; decoding rows first, then prefilling ones
        self.n = 0  # decoding rows
        self.lock = threading.Condition()
        self.cache_lock = threading.Lock()
        self._loads = ThreadPoolExecutor(load_threads, thread_name_prefix="raypeft-adapter-read")
        self._loading: dict[str, Future] = {}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        self.eos = {
            t for t in [tokenizer.eos_token_id, *(gen_eos if isinstance(gen_eos, list) else [gen_eos])] if t is not None
        }
        self.stats = self._fresh_stats()
        self._stop = False
        self._thread: threading.Thread | None = None

    @staticmethod
    def _fresh_stats() -> dict:
        return {
            "requests": 0,
            "tokens": 0,
            "steps": 0,
            "batch_rows": 0,
            "prefill_tokens": 0,
            "failed_steps": 0,
            "compiled_steps": 0,
            "adapter_load_s": deque(maxlen=1024),  # the latest reads, for a p50
        }

    # ------------------------------------------------------------------ the Backend seam

    def start(self) -> None:
        self.warm()
        self._thread = threading.Thread(target=self.run_forever, name="raypeft-engine", daemon=True)
        self._thread.start()

    def warm(self) -> float:
        """With ``compile_decode``, compile the decode step before the first request: one row alone, then two
        together (one graph each: a single row is its own shape to the compiler, any larger batch shares the
        other), through bare-base rows of a one-token prompt. The adapters' mix, the rows' lengths and the KV
        cache's size are not part of the compiled structure, so later steps compile nothing. Leaves no trace
        in the metrics or the chunk budget. Returns the seconds it took (0 when there is nothing to compile)."""
        if self._compiled is None or self._warm or self.rows or self.waiting:
            return 0.0
        t0 = time.perf_counter()
        log.info("raypeft: compiling the decode step (limits.compile_decode); on a CPU this takes minutes")
        for rows in sorted({1, min(2, self.max_batch)}, reverse=True):  # the cache grows to 2 rows first
            reqs = [self.submit(Request([0], None, max_tokens=3, ignore_eos=True)) for _ in range(rows)]
            while not all(r.finish_reason for r in reqs):
                self.step()  # a step that raises fails its requests (and logs why) rather than raising
            if any(r.finish_reason == "error" for r in reqs):
                events = [reqs[0].events.get_nowait() for _ in range(reqs[0].events.qsize())]
                why = next((text for kind, text in events if kind == "error"), "see the log")
                raise RuntimeError(
                    f"limits.compile_decode: compiling the decode step failed ({why}); "
                    "serve without it (limits.compile_decode: false)"
                )
        self.stats = self._fresh_stats()
        self.budget = ChunkBudget(self.budget.cap, self.budget.slowdown)
        self._warm = True
        seconds = time.perf_counter() - t0
        log.info("raypeft: decode step compiled in %.1f s", seconds)
        return seconds

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def supports(self, adapter_dir: str | Path) -> str | None:
        return adapter_support(adapter_dir, max_rank=self.multi.r_max)

    def submit(self, req: Request) -> Request:
        if not req.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        need = self._reserve(req)
        if need > self.kv.max_tokens:
            raise TooLarge(f"prompt and max_tokens need {need} tokens; this server holds {self.kv.max_tokens} per row")
        alone = need * self.kv.bytes_per_token
        if alone > self.max_kv_bytes:
            raise TooLarge(
                f"prompt and max_tokens need {alone} bytes of KV cache; limits.max_kv_bytes is {self.max_kv_bytes}"
            )
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise Overloaded(f"{len(self.waiting)} requests are waiting (max_queue {self.max_queue})")
            seed = random.getrandbits(63) if req.seed is None else req.seed
            req.state = _Row(text=IncrementalText(self.tok, req.stop), seed=seed)
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
            "engine_compiled_steps_total": st["compiled_steps"],
            "batch_rows_total": st["batch_rows"],
            "prefill_tokens_total": st["prefill_tokens"],
            "queue_waiting": len(self.waiting),
            "running_rows": self.n,
            "prefilling_rows": len(self.rows) - self.n,
            "kv_cache_bytes": self.kv.nbytes(),
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
                while not self.waiting and not self.rows and not self._stop:  # rows: decoding or prefilling
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
        weights = self.multi.prepare(AdapterWeights.from_dir(name, path))  # DoRA's scales here, off the loop
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
            log.exception("raypeft: a generation step failed; failing its %d requests", len(self.rows))
            self.stats["failed_steps"] += 1
            self._fail_all(f"generation failed: {type(e).__name__}: {e}")
            return True

    @property
    def running(self) -> list[Request]:
        """The decoding rows (rows ``[0, n)``)."""
        return self.rows[: self.n]

    @property
    def prefilling(self) -> list[Request]:
        """Rows whose prompt is still being read, a chunk per step (rows ``[n, len(rows))``)."""
        return self.rows[self.n :]

    def _step(self) -> bool:
        t0 = time.perf_counter()
        admitted = self._admit()
        busy = bool(admitted or self.rows)
        decoding, prompt_tokens = self._pass() if self.rows else (0, 0)
        self._retire()
        self.stats["steps"] += 1
        # the step as its rows see it, admissions (slot loads, buffer growth) included: a step that admitted
        # makes the next chunks smaller for a few steps, which errs on the running rows' side
        self.budget.observe(time.perf_counter() - t0, decoding, prompt_tokens)
        return busy

    def _fail_all(self, message: str) -> None:
        for req in self.rows:
            if req.finish_reason is None:
                req.finish_reason = "error"
                req.push(("error", message))
        self.slots.pins.clear()  # no row runs any more, so no slot is in use
        for i in range(len(self.rows)):
            self.kv.clear(i)
        self.rows, self.n = [], 0

    def _admit(self) -> list[Request]:
        with self.lock:
            candidates = list(self.waiting)
        admitted = []
        for req in candidates:
            if len(self.rows) >= self.max_batch:
                break
            if not self._kv_fits(req):
                continue  # waits until rows with long reservations leave
            if req.adapter is not None and not self._into_slot(req):
                continue
            self._remove_waiting(req)
            self.rows.append(req)  # a free row at the end of the prefilling rows
            admitted.append(req)
        return admitted

    def _reserve(self, req: Request) -> int:
        return len(req.prompt_ids) + req.max_tokens

    def _kv_fits(self, req: Request) -> bool:
        """Whether the KV buffers, grown for one more row as long as ``req`` needs, stay within ``max_kv_bytes``."""
        width = max([self._reserve(req), *(self._reserve(r) for r in self.rows)])
        if self.kv.bytes_for(len(self.rows) + 1, width) <= self.max_kv_bytes:
            return True
        if not self.rows and self.kv.rows:
            self.kv.release()  # idle: start again from buffers sized for what comes
            return self._kv_fits(req)
        return False

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

    def _forward(self, feeds: list[tuple[int, list[int]]]) -> torch.Tensor:
        """One pass adding each ``(row, tokens)`` of ``feeds`` to its row, the rows' tokens end to end in one
        sequence (``serving.kv``); returns each feed's next-token logits ``[feeds, vocab]``."""
        self.kv.reserve(len(self.rows), max(self._reserve(r) for r in self.rows), self.max_kv_bytes)
        uniform = self._compiled is not None and self._decode_only(feeds)
        p = self.kv.begin([(row, len(tokens)) for row, tokens in feeds], self.layer_windows, uniform=uniform)
        ids = torch.tensor([t for _, tokens in feeds for t in tokens], dtype=torch.long)  # built on the host
        slots = [self.rows[row].state.slot for row, _ in feeds]
        segments, offset = [], p.singles
        for (_, tokens), slot in zip(feeds[p.singles :], slots[p.singles :]):
            segments.append((offset, len(tokens), slot))
            offset += len(tokens)
        ids = ids.to(self.device, non_blocking=True).view(1, -1)
        try:
            if uniform:
                self.multi.every_row(slots)
                _dynamic(ids, p, self.kv)
            else:
                self.multi.feeds(slots[: p.singles], segments)
            self.stats["compiled_steps"] += uniform
            out = (self._compiled if uniform else self.model)(
                input_ids=ids,
                position_ids=p.positions,
                past_key_values=self.kv,
                use_cache=True,
                logits_to_keep=p.last,
                rows_pass=p,
            )
        except BaseException:
            self.kv.abort()
            raise
        finally:
            self.multi.rows(None)
        self.kv.end()
        return out.logits[0].float()

    def _decode_only(self, feeds: list[tuple[int, list[int]]]) -> bool:
        """Whether a pass is one token for each of rows ``0..m-1``, every row past its first token (so the
        cache is allocated and the rows are at least two columns wide): the compiled step's one structure."""
        kv = self.kv
        return bool(kv.keys) and all(r == i and len(t) == 1 and kv.lengths[r] for i, (r, t) in enumerate(feeds))

    def _pass(self) -> tuple[int, int]:
        """One forward pass: a token for every decoding row, and the prefilling rows' next prompt chunks
        (``serving.schedule``: at most ``prefill_chunk_tokens`` in all, fewer while rows decode so that
        the step stays within ``prefill_slowdown`` × a decode step). Rows whose prompt is done sample
        their first token beside the decoding rows and join them. One host read: the sampled tokens (and
        the logprobs asked for). Returns the decoding rows and the prompt tokens fed."""
        n, pre = self.n, self.prefilling
        feeds = [(i, [r.out_ids[-1]]) for i, r in enumerate(self.running)]
        if pre:
            per_row = max(1, self.budget.tokens(n) // len(pre))
            feeds += [(n + i, r.prompt_ids[r.state.fed : r.state.fed + per_row]) for i, r in enumerate(pre)]
        logits = self._forward(feeds)
        done = self._fed(pre, feeds[n:])
        reqs = self.running + [pre[i] for i in done]
        if reqs:
            if len(reqs) < len(feeds):  # only the rows that sample (an index list: no device sync)
                logits = logits[torch.tensor([*range(n), *(n + i for i in done)], device=logits.device)]
            tokens, lps = self._pick(logits, reqs)
            for i in done:  # move each finished prompt's row to the end of the decoding rows
                self._swap(n + i, self.n)
                self.n += 1
            self.stats["batch_rows"] += n
            self._emit(reqs, tokens, lps)
        return n, sum(len(c) for _, c in feeds[n:])

    def _fed(self, pre: list[Request], feeds: list[tuple[int, list[int]]]) -> list[int]:
        """Advance the prefilling rows by their chunks; returns those whose prompt is now done."""
        done = []
        for i, (r, (_, chunk)) in enumerate(zip(pre, feeds)):
            r.state.fed += len(chunk)
            self.stats["prefill_tokens"] += len(chunk)
            if r.state.fed == len(r.prompt_ids):
                done.append(i)
        return done

    def _swap(self, a: int, b: int) -> None:
        if a != b:
            self.kv.swap(a, b)
            self.rows[a], self.rows[b] = self.rows[b], self.rows[a]

    def _retire(self) -> None:
        """Free the rows of finished or cancelled requests, keeping the decoding rows first and every
        row contiguous; only the rows that move are copied."""
        for i in reversed(range(len(self.rows))):
            req = self.rows[i]
            if req.finish_reason is None:
                continue
            if req.adapter is not None:
                self.slots.release(req.adapter)
            last = len(self.rows) - 1
            if i < self.n:  # a decoding row: the last decoding row takes its place, the last row the gap
                self._swap(i, self.n - 1)
                self._swap(self.n - 1, last)
                self.n -= 1
            else:
                self._swap(i, last)
            self.kv.clear(last)
            self.rows.pop()

    @staticmethod
    def _host(values: torch.Tensor) -> list:
        """The step's one device-to-host read (``_pick``)."""
        return values.tolist()

    def _pick(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], dict[int, tuple]]:
        """Each row's next token and, for the rows that asked, ``(the token's log-probability, the k most
        likely tokens and theirs)`` from the model's distribution before temperature and top-p: sampled on
        the device (``serving.sampling``) and read back in one transfer."""
        if any(r.temperature > 0 for r in reqs):
            on = {"device": logits.device}
            tokens = sample(
                logits,
                torch.tensor([r.temperature for r in reqs], dtype=torch.float32, **on),
                torch.tensor([r.top_p for r in reqs], dtype=torch.float32, **on),
                torch.tensor([r.state.seed for r in reqs], dtype=torch.int64, **on),
                torch.tensor([len(r.out_ids) for r in reqs], dtype=torch.int64, **on),
                nucleus=any(r.top_p < 1.0 for r in reqs),
            )
        else:
            tokens = logits.argmax(-1)
        rows = len(reqs)
        want = [i for i, r in enumerate(reqs) if r.logprobs is not None]
        k = max((reqs[i].logprobs for i in want), default=0)
        if not want:
            return [int(t) for t in self._host(tokens)], {}
        # token ids ride in float64 beside the logprobs (exact below 2**53): one read, not three
        rows_asking = torch.tensor(want, device=logits.device)
        lp = torch.log_softmax(logits[rows_asking], -1)
        chosen = lp.gather(1, tokens[rows_asking].view(-1, 1)).view(-1)
        parts = [tokens.to(torch.float64), chosen.to(torch.float64)]
        if k:
            values, ids = lp.topk(k, -1)
            parts += [values.to(torch.float64).flatten(), ids.to(torch.float64).flatten()]
        flat = self._host(torch.cat(parts))
        picked = [int(t) for t in flat[:rows]]
        lp_chosen = flat[rows : rows + len(want)]
        top = flat[rows + len(want) :]
        out = {}
        for j, i in enumerate(want):
            vals = top[j * k : (j + 1) * k]
            ids = top[len(want) * k + j * k : len(want) * k + (j + 1) * k]
            out[i] = (lp_chosen[j], [(int(t), v) for t, v in zip(ids, vals)][: reqs[i].logprobs])
        return picked, out

    def _emit(self, reqs: list[Request], tokens: list[int], lps: dict[int, tuple]) -> None:
        """Append each row's token, stream the new text (and, when asked, its tokens' logprobs), and mark
        finished rows. The text is decoded incrementally and only new text is searched for stop strings
        (``serving.detokenize``)."""
        done = []
        for i, (req, tok) in enumerate(zip(reqs, tokens)):
            if req.finish_reason is not None:
                continue
            st = req.state
            self.stats["tokens"] += 1
            if tok in self.eos and not req.ignore_eos:
                req.finish_reason = "stop"
            else:
                req.out_ids.append(tok)
                if i in lps:
                    st.logprobs.append((tok, *lps[i]))
            ending = req.finish_reason is not None or len(req.out_ids) >= req.max_tokens
            st.text.add(req.out_ids, final=ending)
            text = st.text.text
            cut = st.text.find_stop()
            if cut >= 0:
                text, req.finish_reason = text[:cut], "stop"
            elif req.finish_reason is None and len(req.out_ids) >= req.max_tokens:
                req.finish_reason = "length"
            # hold back a tail that could still become a stop string
            hold = 0 if req.finish_reason else max(st.text.longest - 1, 0)
            safe = len(text) - hold
            if st.logprobs and (safe > req.emitted or req.finish_reason):
                req.push(("logprobs", st.logprobs))  # the tokens behind the text that follows
                st.logprobs = []
            if safe > req.emitted:
                req.push(("delta", text[req.emitted : safe]))
                req.emitted = safe
            if req.finish_reason:
                done.append(req)
        for req in done:
            req.push(("done", req.finish_reason))


def _compile(model, backend: str):
    """``model`` through ``torch.compile`` (``backend``: inductor unless a test asks for ``aot_eager``, which
    traces the same graphs without generating kernels), dynamic sizes, compiled without duck sizing: sizes
    that happen to be equal when it compiles (the rows and the columns read, say) stay separate sizes, not
    one that the next step would break."""
    from torch.fx.experimental import _config as shape_config

    compiled = torch.compile(model, dynamic=True, backend=backend)

    def call(**kw):
        with shape_config.patch(use_duck_shape=False):
            return compiled(**kw)

    return call


def _dynamic(ids: torch.Tensor, p, kv: RowCache) -> None:
    """Tell the compiler which sizes of a decode step change from step to step (the rows, the columns read,
    the cache's rows and capacity), so it compiles them as sizes, not constants: one graph serves every
    batch of two or more rows (one row is a shape of its own)."""
    mark = torch._dynamo.maybe_mark_dynamic
    for t, dim in ((ids, 1), (p.positions, 1), (p.token_rows, 0), (p.last, 0)):
        mark(t, dim)
    for mask in p.decode_masks.values():
        mark(mask, 0)
        mark(mask, 3)
    for t in (*kv.keys, *kv.values):
        mark(t, 0)
        mark(t, 2)


def _attention_windows(config) -> dict[str, int | None] | int | None:
    """None when every layer attends causally over everything; the window when every layer slides
    (Mistral); each layer type's window for models that take one mask per type (``layer_types``)."""
    types = set(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    unknown = types - {"full_attention", "sliding_attention"}
    if unknown:
        raise ValueError(f"layer types {sorted(unknown)} are not served by this engine")
    if "sliding_attention" in types:
        return {"full_attention": None, "sliding_attention": window}
    if not types and window and getattr(config, "use_sliding_window", True):
        return window
    return None


def _layer_windows(config) -> list[int | None]:
    """Each layer's sliding window (None: the layer attends to everything)."""
    windows = _attention_windows(config)
    if isinstance(windows, dict):
        return [windows[kind] for kind in config.layer_types]
    return [windows] * config.num_hidden_layers


def _kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    """Bytes one token takes in the KV cache over every layer (keys and values)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * dim * torch.empty((), dtype=dtype).element_size()

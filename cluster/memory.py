"""The memory model: bytes per GPU of a fine-tuning job, by component. Pure: no torch, no Ray, no I/O.

    shape = Shape.from_config(json.load(open("config.json")))      # or KNOWN["llama-2-7b"]
    plan = Plan(method="qlora", rank=128, micro_batch=1, seq_len=1024)
    estimate(shape, plan).total                                      # bytes
    fixes(shape, plan, budget_bytes)                                 # the cheapest changes that fit

Components (``Breakdown``):

* weights: linear layers at the plan's bit width (NF4 = 4 bits + 0.127 bits of double-quantized
  constants per weight, as in the QLoRA paper; int8 = 8 bits + one fp32 scale per row), everything
  else (embeddings, norms, lm_head) at the parameter dtype;
* adapter: LoRA A and B, r·(in + out) per target linear (+ one magnitude per output for DoRA);
* gradients: one per trainable parameter (GaLore layerwise: only the largest tensor at a time);
* optimizer: AdamW keeps two fp32 states per trainable parameter, 8-bit AdamW two bytes; GaLore
  keeps its states on the projected r × max(m, n) gradient plus the r × min(m, n) projection,
  and plain states for the rest; mixed precision adds an fp32 master copy;
* activations: what autograd saves for backward, counted tensor by tensor on the transformers Llama
  path with SDPA attention and a PEFT LoRA on every target (``saved_per_token``): per token and
  layer, 4 intermediate-sized tensors (gate, up, SiLU, product), 6 hidden-sized (the RMSNorms'
  inputs and outputs, the query side of attention, the attention output), 2 key/value-sized, one
  logsumexp per head, the two RMSNorm scales and each LoRA's r-sized A output. With gradient
  checkpointing, each layer's input plus one layer being recomputed. Then the loss's peak: the
  fp32 log-softmax it saves, the gradient flowing into it and the one flowing out (three
  vocab-sized fp32 tensors per token), plus the logits themselves in a 16-bit compute dtype; with
  the chunked loss (``train.loss_chunk_tokens``), those for one chunk of rows only, plus the copy
  of the counted tokens' hidden states it keeps;
* ZeRO divides optimizer states (stage ≥ 1), gradients (≥ 2) and parameters (3) by the GPU count;
  offload moves optimizer states (and, for stage 3, parameters) to CPU memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Literal

GiB = 1024**3
NF4_BITS = 4.127  # 4-bit codes + double-quantized blockwise constants (QLoRA, §3)


def parse_bytes(value: int | float | str) -> int:
    """``60000000``, ``80GB``, ``24GiB``, ``40 G`` → bytes. Units are binary (GB and G are read as GiB, as
    nvidia-smi reports). Raises ValueError naming the expected form."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"must be > 0 (got {value!r})")
        return int(value)
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", str(value), re.I)
    if not m or m.group(1).count(".") > 1 or float(m.group(1)) <= 0:
        raise ValueError(f"expected a size like 80GB, 24GiB, 60MB or a byte count (got {value!r})")
    return int(float(m.group(1)) * 1024 ** "BKMGT".index((m.group(2) or "B").upper()))


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer's shape (Llama family naming)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None

    @classmethod
    def from_config(cls, cfg: dict) -> Shape:
        """From an HF ``config.json`` mapping (Llama, Mistral, Qwen2, SmolLM, ... field names)."""
        return cls(
            layers=cfg["num_hidden_layers"],
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            heads=cfg["num_attention_heads"],
            kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            vocab=cfg["vocab_size"],
            tied=bool(cfg.get("tie_word_embeddings", False)),
            head_dim=cfg.get("head_dim"),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear layer of one decoder layer."""
        h, i = self.hidden, self.intermediate
        kv = self.kv_heads * (self.head_dim or h // self.heads)
        return {
            "q_proj": (h, self.heads * (self.head_dim or h // self.heads)),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (self.heads * (self.head_dim or h // self.heads), h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linears().values())

    def other_params(self) -> int:
        """Embeddings, lm_head (unless tied) and norms: never quantized."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    def params(self) -> int:
        return self.linear_params() + self.other_params()


KNOWN: dict[str, Shape] = {
    "llama-2-7b": Shape(32, 4096, 11008, 32, 32, 32000),
    "llama-2-13b": Shape(40, 5120, 13824, 40, 40, 32000),
    "llama-3-8b": Shape(32, 4096, 14336, 32, 8, 128256),
    "mistral-7b": Shape(32, 4096, 14336, 32, 8, 32000),
    "smollm2-135m": Shape(30, 576, 1536, 9, 3, 49152, tied=True),
}


@dataclass(frozen=True)
class Plan:
    """What the job does, as far as memory is concerned."""

    method: Literal["full", "lora", "dora", "qlora", "galore"] = "lora"
    rank: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    weight_bits: int | None = None  # linear layers; None: 4 for qlora, else param_bytes·8
    int8: bool = False  # weight_bits 8 means LLM.int8
    param_bytes: int = 2  # dtype of unquantized weights (2 bf16, 4 fp32)
    trainable_bytes: int | None = None  # dtype of trainable tensors (default param_bytes)
    master_weights: bool = False  # mixed precision keeps an fp32 copy of trainables
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    galore_rank: int = 128
    galore_layerwise: bool = True
    micro_batch: int = 1
    seq_len: int = 1024
    gradient_checkpointing: bool = True
    logits_bytes: int = 4  # the loss upcasts logits to fp32
    loss_chunk: int = 0  # the chunked loss's rows per chunk (0: the full logits)
    gpus: int = 1
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    overhead_bytes: int = 0  # CUDA context, allocator slack: add ~1 GiB on a real GPU

    def bits(self) -> float:
        if self.weight_bits is not None:
            return NF4_BITS if self.weight_bits == 4 else float(self.weight_bits)
        return NF4_BITS if self.method == "qlora" else 8.0 * self.param_bytes


@dataclass
class Breakdown:
    weights: float = 0
    adapter: float = 0
    gradients: float = 0
    optimizer: float = 0
    activations: float = 0
    overhead: float = 0
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.adapter + self.gradients + self.optimizer + self.activations + self.overhead

    def rows(self) -> list[tuple[str, float]]:
        return [
            (k, getattr(self, k)) for k in ("weights", "adapter", "gradients", "optimizer", "activations", "overhead")
        ]


def adapter_params(shape: Shape, plan: Plan) -> int:
    per_layer = 0
    for name, (i, o) in shape.linears().items():
        if name in plan.targets:
            per_layer += plan.rank * (i + o) + (o if plan.method == "dora" else 0)
    return shape.layers * per_layer


def saved_per_token(shape: Shape, plan: Plan) -> int:
    """Elements autograd saves per token in one decoder layer (no checkpointing): counted with
    ``torch.autograd.graph.saved_tensors_hooks`` on transformers' Llama with SDPA attention (which
    keeps a logsumexp per head, never the s × s scores) and a PEFT adapter on ``plan.targets``.
    ``tests/unit/test_memory.py`` re-counts it on real models of several shapes."""
    h, i = shape.hidden, shape.intermediate
    kv = shape.linears()["k_proj"][1]
    adapters = (
        sum(plan.rank for name in shape.linears() if name in plan.targets)
        if plan.method in ("lora", "dora", "qlora")
        else 0
    )
    return 4 * i + 6 * h + 2 * kv + shape.heads + 2 + adapters


def frozen_per_token(shape: Shape, int8: bool = False) -> int:
    """Elements autograd saves per token in a decoder layer without an adapter that a gradient still
    crosses (an adapted layer lies below it): only what its input's gradient needs, so none of the
    linears' inputs and no LoRA outputs. 3·intermediate + 4·hidden + 2·kv + heads + 2 (measured like
    ``saved_per_token``). bitsandbytes' int8 matmul on CPU keeps its input whatever needs a gradient,
    which adds the linears' inputs back: intermediate + 2·hidden more. A layer below every adapted one
    saves nothing: no gradient reaches it."""
    kv = shape.linears()["k_proj"][1]
    return (
        3 * shape.intermediate
        + 4 * shape.hidden
        + 2 * kv
        + shape.heads
        + 2
        + (shape.intermediate + 2 * shape.hidden if int8 else 0)
    )


def activation_bytes(
    shape: Shape,
    saved: list[int],
    tokens: int,
    act: int,
    logits_bytes: int = 4,
    checkpointing: bool = False,
    loss_chunk: int = 0,
) -> float:
    """Peak bytes of activations: ``saved[i]`` elements per token kept by layer ``i`` (or, checkpointed,
    each layer's input plus the largest layer being recomputed), then the loss's vocab-sized peak: over
    every token, or (``loss_chunk`` > 0, the chunked loss) over one chunk of rows, plus the copy of the
    counted tokens' hidden states it keeps (at most every token's)."""
    if checkpointing:
        out = shape.layers * tokens * shape.hidden * act + max(saved, default=0) * tokens * act
    else:
        out = sum(saved) * tokens * act
    rows = min(tokens, loss_chunk) if loss_chunk else tokens
    if loss_chunk:
        out += tokens * shape.hidden * act
    return out + rows * shape.vocab * (3 * logits_bytes + (act if act != logits_bytes else 0))


def _opt_bytes_per_param(plan: Plan) -> float:
    states = 2.0 if plan.optimizer == "adamw8bit" else 8.0
    return states + (4.0 if plan.master_weights else 0.0)


def estimate(shape: Shape, plan: Plan) -> Breakdown:
    """Bytes per GPU, by component (see the module docstring)."""
    b = Breakdown()
    tb = plan.trainable_bytes or plan.param_bytes
    lin = shape.linear_params()
    int8_scales = (
        shape.layers * sum(o for _, o in shape.linears().values()) * 4 if plan.bits() == 8 and plan.int8 else 0
    )
    b.weights = lin * plan.bits() / 8 + int8_scales + shape.other_params() * plan.param_bytes

    if plan.method == "full":
        trainable = shape.params()
        b.gradients = trainable * tb
        b.optimizer = trainable * _opt_bytes_per_param(plan)
    elif plan.method == "galore":
        trainable = shape.params()
        largest = max(max(a * o for a, o in shape.linears().values()), shape.vocab * shape.hidden)
        b.gradients = largest * tb if plan.galore_layerwise else trainable * tb
        state = 1.0 if plan.optimizer == "adamw8bit" else 4.0
        projected = proj = 0
        for i, o in shape.linears().values():
            projected += plan.galore_rank * max(i, o)
            proj += plan.galore_rank * min(i, o)
        b.optimizer = shape.layers * (2 * projected * state + proj * tb) + shape.other_params() * _opt_bytes_per_param(
            plan
        )
        b.notes.append(
            f"GaLore rank {plan.galore_rank}: Adam states on the projected gradients"
            + (", one gradient tensor at a time (layerwise)" if plan.galore_layerwise else "")
        )
    else:
        trainable = adapter_params(shape, plan)
        b.adapter = trainable * tb
        b.gradients = trainable * tb
        b.optimizer = trainable * _opt_bytes_per_param(plan)

    # activations (in the compute dtype): checkpointed layer inputs + one layer recomputed, or every layer's saved tensors
    b.activations = activation_bytes(
        shape,
        [saved_per_token(shape, plan)] * shape.layers,
        plan.micro_batch * plan.seq_len,
        plan.param_bytes,
        plan.logits_bytes,
        plan.gradient_checkpointing,
        plan.loss_chunk,
    )

    shard(b, plan)
    b.overhead = plan.overhead_bytes
    return b


def shard(b: Breakdown, plan: Plan) -> Breakdown:
    """ZeRO sharding and offload applied to ``b`` in place: optimizer states (stage ≥ 1), gradients (≥ 2)
    and parameters (3) divided by the GPU count; offloaded parts moved to CPU memory (noted)."""
    n = max(1, plan.gpus)
    if plan.zero_stage >= 1:
        b.optimizer /= n
    if plan.zero_stage >= 2:
        b.gradients /= n
    if plan.zero_stage >= 3:
        b.weights /= n
        b.adapter /= n
    if plan.offload_optimizer and plan.zero_stage >= 1:
        b.notes.append(f"optimizer states offloaded to CPU memory ({b.optimizer / GiB:.2f} GiB per GPU moved)")
        b.optimizer = 0
    if plan.offload_params and plan.zero_stage >= 3:
        b.notes.append(f"parameters offloaded to CPU memory ({(b.weights + b.adapter) / GiB:.2f} GiB per GPU moved)")
        b.weights = b.adapter = 0
    return b


def fixes(shape: Shape, plan: Plan, budget: float, max_gpus: int = 64) -> list[tuple[str, Plan, float]]:
    """Changes that make the job fit ``budget`` bytes per GPU, cheapest first: (what, plan, total bytes).

    Order of preference: gradient checkpointing, 8-bit AdamW, QLoRA (for LoRA jobs), a higher ZeRO
    stage, CPU offload, then more GPUs (the first count that fits)."""
    out = []
    candidates: list[tuple[str, Plan]] = []
    if not plan.gradient_checkpointing:
        candidates.append(
            (
                "turn on gradient checkpointing (model.gradient_checkpointing=true)",
                replace(plan, gradient_checkpointing=True),
            )
        )
    if plan.optimizer == "adamw" and plan.method in ("full", "galore"):
        candidates.append(
            ("use 8-bit AdamW states (galore_8bit / an 8-bit optimizer)", replace(plan, optimizer="adamw8bit"))
        )
    if plan.method in ("lora", "dora", "full"):
        # as raypeft trains it: PEFT's k-bit preparation casts the unquantized parameters to fp32, and the activations follow
        candidates.append(
            (
                "train QLoRA on a 4-bit base (method.name=qlora)",
                replace(plan, method="qlora", weight_bits=None, param_bytes=4),
            )
        )
    if plan.gpus > 1:
        for stage in range(plan.zero_stage + 1, 4):
            candidates.append(
                (f"shard with ZeRO-{stage} (scaling.strategy=zero{stage})", replace(plan, zero_stage=stage))
            )
    if plan.gpus > 1 or plan.zero_stage:
        stage = max(plan.zero_stage, 2)
        candidates.append(
            (
                f"offload optimizer states to CPU (scaling.strategy=zero{stage}_offload)",
                replace(plan, zero_stage=stage, offload_optimizer=True),
            )
        )
        candidates.append(
            (
                "offload parameters too (scaling.strategy=zero3_offload)",
                replace(plan, zero_stage=3, offload_optimizer=True, offload_params=True),
            )
        )
    for what, p in candidates:
        total = estimate(shape, p).total
        if total <= budget:
            out.append((what, p, total))
    if not out:  # no single change is enough: apply them one after another until it fits
        acc, done = plan, []
        for what, p in candidates:
            changed = {k: v for k, v in vars(p).items() if v != getattr(plan, k)}
            acc, done = replace(acc, **changed), done + [what]
            total = estimate(shape, acc).total
            if total <= budget:
                out.append((" + ".join(done), acc, total))
                break
    for n in range(max(2, plan.gpus * 2), max_gpus + 1):
        p = replace(plan, gpus=n, zero_stage=max(plan.zero_stage, 3))
        total = estimate(shape, p).total
        if total <= budget:
            out.append((f"use {n} GPUs with ZeRO-3 (scaling.num_workers={n} scaling.strategy=zero3)", p, total))
            break
    return out


# --------------------------------------------------------------------------- layerwise (mixed bit-width) plans

NF4_BLOCK = 64  # bnb 4-bit blocksize: one absmax per 64 weights
NESTED_BLOCK = 256  # double quantization: one fp32 absmax per 256 uint8 absmaxes


def linear_bytes(n_in: int, n_out: int, bits: int, param_bytes: int = 4, double_quant: bool = True) -> float:
    """Bytes bitsandbytes holds for one ``n_in × n_out`` linear weight at ``bits`` (16: unquantized at
    ``param_bytes``): NF4 packs two codes per byte plus one absmax per 64 weights (uint8 and one fp32 per
    256 of them with double quantization, else fp32) and its quantization codes; LLM.int8 keeps int8 codes plus one fp32 scale per row."""
    n = n_in * n_out
    if bits == 16:
        return n * param_bytes
    if bits == 8:
        return n + 4 * n_out
    blocks = -(-n // NF4_BLOCK)
    # + each tensor's own copy of the 16-entry NF4 code (and, double-quantized, the 256-entry uint8 code + offset)
    absmax = blocks + 4 * -(-blocks // NESTED_BLOCK) + 4 * (256 + 1) if double_quant else 4 * blocks
    return n / 2 + absmax + 4 * 16


def layerwise_estimate(
    shape: Shape,
    layers: list[tuple[int, int]],
    targets: tuple[str, ...] = Plan.targets,
    param_bytes: int = 4,
    trainable_bytes: int = 4,
    double_quant: bool = True,
    optimizer_bytes: float = 8.0,
    tokens: int = 0,
    checkpointing: bool = False,
    loss_chunk: int = 0,
) -> Breakdown:
    """Bytes of a base whose decoder layer ``i`` is quantized to ``layers[i][0]`` bits (4, 8, 16) and carries
    LoRA rank ``layers[i][1]`` (0: no adapter) on ``targets``: weights, adapter, its gradients and its AdamW
    states; with ``tokens`` (micro batch × sequence length) > 0, also the training step's activations, which
    depend on the plan: an adapted layer keeps ``saved_per_token`` at its rank, a layer without an adapter
    ``frozen_per_token`` if an adapted layer lies below it and nothing otherwise (with checkpointing, where
    the inputs are made to require gradients, every layer keeps its input)."""
    if len(layers) != shape.layers:
        raise ValueError(f"plan has {len(layers)} layers, the model {shape.layers}")
    b = Breakdown()
    b.weights = shape.other_params() * param_bytes
    trainable = 0
    for bits, rank in layers:
        for name, (i, o) in shape.linears().items():
            b.weights += linear_bytes(i, o, bits, param_bytes, double_quant)
            if name in targets:
                trainable += rank * (i + o)
    b.adapter = trainable * trainable_bytes
    b.gradients = trainable * trainable_bytes
    b.optimizer = trainable * optimizer_bytes
    if tokens:
        first = 0 if checkpointing else next((k for k, (_, r) in enumerate(layers) if r), len(layers))
        saved = [
            0
            if k < first
            else saved_per_token(shape, Plan(rank=r, targets=targets))
            if r
            else frozen_per_token(shape, bits == 8)
            for k, (bits, r) in enumerate(layers)
        ]
        b.activations = activation_bytes(
            shape, saved, tokens, param_bytes, checkpointing=checkpointing, loss_chunk=loss_chunk
        )
    return b


Layers = list[tuple[int, int]]  # (bits, rank) per decoder layer: a per-layer plan


def describe(layers: Layers) -> str:
    """``4b×r8 ×20, 8b×r16 ×10``: a plan in one line."""
    counts: dict[tuple[int, int], int] = {}
    for lr in layers:
        counts[lr] = counts.get(lr, 0) + 1
    return ", ".join(f"{b}b×r{r} ×{c}" for (b, r), c in sorted(counts.items()))

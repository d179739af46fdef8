"""Mixed-adapter batches: one forward pass where every row uses its own LoRA / DoRA adapter.

Each adapted linear layer of the shared base is wrapped by ``MultiLoraLinear``. It holds
the *active tier*: ``slots`` adapters stacked as ``A [slots, r_max, in]``,
``B [slots, out, r_max]``, a per-slot scale and a per-slot DoRA output scale
``g [slots, out]``. Slot 0 is the bare base (all zeros, g = 1). A forward pass
gathers each row's slot and applies the deltas with two batched matmuls, whatever
the mix of adapters in the batch: no Python loop over adapters (PEFT's
``adapter_names`` loops per adapter per layer).

    y = g[slot] ⊙ (W x + s[slot] · B[slot] A[slot] x) + bias

For LoRA g = 1. For DoRA, ``g = m / ||W + s·B·A||`` (row norms) is a constant of the
adapter and the base, so it is computed once when the adapter is loaded into a slot;
at inference DoRA costs what LoRA costs. The stacked tensors live beside the base
weights, in the serving dtype (the input embeddings': bf16 on GPUs, the spec's dtype on
CPU). A batch multiplies only up to the largest rank among its rows' adapters (a batch of
rank-8 adapters on a server with ``r_max`` 64 does rank-8 work); smaller ranks in the same
batch are zero-padded,
which changes nothing. Works over bitsandbytes 4-/8-bit base layers too (the base
layer computes ``W x``; DoRA norms use the dequantized weight).

Pure torch: no Ray, no I/O. ``AdapterWeights.from_dir`` reads a standard PEFT directory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipelines.targets import is_target, pattern_value


class BatchContext:
    """Shared by every wrapped layer of one model: the slot of each row of the current batch, as one
    index tensor on the model's device (made once per forward pass, not once per layer)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.rows: torch.Tensor | None = None  # [batch] long, on ``device``
        self.rank = 0  # the largest rank among the rows' adapters: the stacks are sliced to it
        self.any_adapter = False
        self.any_dora = False

    def set(self, rows: list[int] | None, dora_slots: set[int] = frozenset(), ranks: dict[int, int] | None = None):
        if rows is None:
            self.rows, self.rank, self.any_adapter, self.any_dora = None, 0, False, False
            return
        slots = set(rows)
        self.rows = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)
        self.rank = max((ranks or {}).get(s, 0) for s in slots) if ranks is not None else -1
        self.any_adapter = bool(slots - {0}) and self.rank != 0
        self.any_dora = bool(slots & set(dora_slots))


class MultiLoraLinear(nn.Module):
    """A base linear layer plus the stacked adapters of the active tier (see the module docstring)."""

    def __init__(self, base: nn.Module, ctx: BatchContext, slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        self.base_layer = base
        self.ctx = ctx
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r_max = r_max
        at = {"dtype": dtype, "device": base.weight.device}  # beside the base weight, in the serving dtype
        self.register_buffer("A", torch.zeros(slots, r_max, self.in_features, **at), persistent=False)
        self.register_buffer("B", torch.zeros(slots, self.out_features, r_max, **at), persistent=False)
        self.register_buffer("scale", torch.zeros(slots, **at), persistent=False)
        self.register_buffer("g", torch.ones(slots, self.out_features, **at), persistent=False)

    def base_weight(self) -> torch.Tensor:
        """The base weight in float (dequantized for bitsandbytes layers)."""
        w = self.base_layer.weight
        if type(w).__name__ in ("Params4bit", "Int8Params"):
            from peft.utils.integrations import dequantize_module_weight

            return dequantize_module_weight(self.base_layer).float()
        return w.detach().float()

    def load_slot(
        self, slot: int, A: torch.Tensor | None, B: torch.Tensor | None, scale: float, magnitude: torch.Tensor | None
    ) -> None:
        """Put one adapter's tensors for this layer into ``slot`` (None: the adapter does not touch this layer)."""
        with torch.no_grad():
            self.A[slot].zero_()
            self.B[slot].zero_()
            self.scale[slot] = 0.0
            self.g[slot].fill_(1.0)
            if A is None:
                return
            r = A.shape[0]
            if r > self.r_max:
                raise ValueError(f"rank {r} exceeds the served maximum rank {self.r_max}")
            A, B = A.to(self.A.device), B.to(self.B.device)  # from the CPU tier: one copy each
            self.A[slot, :r] = A.to(self.A.dtype)
            self.B[slot, :, :r] = B.to(self.B.dtype)
            self.scale[slot] = scale
            if magnitude is not None:  # DoRA: g = m / ||W + s·B·A|| per output row, in float
                w = self.base_weight() + scale * (B.float() @ A.float())
                self.g[slot] = (magnitude.to(w.device).float() / w.norm(p=2, dim=1)).to(self.g.dtype)

    def clear_slot(self, slot: int) -> None:
        self.load_slot(slot, None, None, 0.0, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        ctx = self.ctx
        if not ctx.any_adapter:
            return y
        rows, r = ctx.rows, (ctx.rank if ctx.rank > 0 else self.r_max)
        shape = x.shape
        x3 = x.reshape(shape[0], -1, shape[-1]).to(self.A.dtype)  # [batch, tokens, in]
        a = self.A[:, :r].index_select(0, rows)  # [batch, r, in]: only the ranks this batch's adapters use
        b = self.B[:, :, :r].index_select(0, rows)  # [batch, out, r]
        delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b.transpose(1, 2))  # [batch, tokens, out]
        delta = delta * self.scale.index_select(0, rows).view(-1, 1, 1)
        bias = getattr(self.base_layer, "bias", None)
        out = y.reshape(shape[0], -1, self.out_features).to(delta.dtype)
        if ctx.any_dora:
            g = self.g.index_select(0, rows).unsqueeze(1)  # [batch, 1, out]
            if bias is not None:
                out = g * (out - bias + delta) + bias
            else:
                out = g * (out + delta)
        else:
            out = out + delta
        return out.to(y.dtype).reshape(*shape[:-1], self.out_features)


# --------------------------------------------------------------------------- adapters


@dataclass
class AdapterWeights:
    """One adapter's tensors, keyed by the base module name (``model.layers.0.self_attn.q_proj``)."""

    name: str
    rank: int
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]] = field(default_factory=dict)
    dora: bool = False
    nbytes: int = 0

    @classmethod
    def from_dir(cls, name: str, path: str | Path) -> AdapterWeights:
        """Read a standard PEFT LoRA / DoRA directory (safetensors only)."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg = json.loads((path / "adapter_config.json").read_text())
        if cfg.get("peft_type") != "LORA":
            raise ValueError(
                f"adapter {name!r}: only LoRA-family adapters are served in mixed batches (got {cfg.get('peft_type')})"
            )
        st = path / "adapter_model.safetensors"
        if not st.is_file():
            raise ValueError(f"adapter {name!r}: no adapter_model.safetensors (pickled .bin adapters are refused)")
        tensors = load_file(st)
        r, alpha = cfg["r"], cfg["lora_alpha"]
        rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        rs = cfg.get("use_rslora", False)
        out = cls(name=name, rank=0, dora=bool(cfg.get("use_dora")))
        for key, a in tensors.items():
            if not key.endswith("lora_A.weight"):
                continue
            prefix = key[: -len(".lora_A.weight")]
            module = _module_name(prefix)
            b = tensors[f"{prefix}.lora_B.weight"]
            mr = pattern_value(rank_pattern, module, r)
            ma = pattern_value(alpha_pattern, module, alpha)
            scale = ma / math.sqrt(mr) if rs else ma / mr
            mag = tensors.get(f"{prefix}.lora_magnitude_vector")
            if mag is None:
                mag = tensors.get(f"{prefix}.lora_magnitude_vector.weight")
            out.layers[module] = (a, b, scale, mag)
            out.rank = max(out.rank, a.shape[0])
        if not out.layers:
            raise ValueError(f"adapter {name!r}: no LoRA tensors in {st}")
        out.nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return out


def _module_name(prefix: str) -> str:
    """``base_model.model.model.layers.0.self_attn.q_proj`` → ``model.layers.0.self_attn.q_proj``."""
    return prefix[len("base_model.model.") :] if prefix.startswith("base_model.model.") else prefix


# --------------------------------------------------------------------------- the model


class MultiLoraModel:
    """A causal LM whose linear layers are ``MultiLoraLinear``; adapters live in numbered slots."""

    def __init__(self, model: nn.Module, slots: int, r_max: int, target: str | list[str] = "all-linear"):
        self.model, self.slots, self.r_max = model, slots, r_max
        # the serving dtype and device: the input embeddings', which stay unquantized under bitsandbytes
        emb = model.get_input_embeddings().weight
        self.device, self.dtype = emb.device, emb.dtype
        self.ctx = BatchContext(self.device)
        self.layers: dict[str, MultiLoraLinear] = {}
        self.slot_of: dict[str, int] = {}  # adapter name → slot
        self.dora_slots: set[int] = set()
        self.slot_rank: dict[int, int] = {}  # slot → its adapter's largest rank
        for name, mod in list(model.named_modules()):
            if not _is_linear(mod) or "lm_head" in name or not is_target(target, name):
                continue
            wrapped = MultiLoraLinear(mod, self.ctx, slots, r_max, dtype=self.dtype)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, wrapped)
            self.layers[name] = wrapped

    def load(self, slot: int, adapter: AdapterWeights) -> None:
        """Load ``adapter`` into ``slot`` (1..slots-1), replacing what was there."""
        if not 0 < slot < self.slots:
            raise ValueError(f"slot {slot} out of range 1..{self.slots - 1}")
        unknown = sorted(set(adapter.layers) - set(self.layers))
        if unknown:
            raise ValueError(f"adapter {adapter.name!r} targets modules this server does not wrap: {unknown[:3]}")
        if adapter.rank > self.r_max:
            raise ValueError(f"adapter {adapter.name!r} has rank {adapter.rank} > the served maximum {self.r_max}")
        for name, layer in self.layers.items():
            a, b, s, m = adapter.layers.get(name, (None, None, 0.0, None))
            layer.load_slot(slot, a, b, s, m)
        for old, sl in list(self.slot_of.items()):
            if sl == slot:
                del self.slot_of[old]
        self.slot_of[adapter.name] = slot
        self.slot_rank[slot] = adapter.rank
        (self.dora_slots.add if adapter.dora else self.dora_slots.discard)(slot)

    def evict(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self.slot_of = {k: v for k, v in self.slot_of.items() if v != slot}
        self.slot_rank.pop(slot, None)
        self.dora_slots.discard(slot)

    def rows(self, slots: list[int]) -> None:
        """Set the slot of each row for the next forward passes."""
        self.ctx.set(slots, self.dora_slots, self.slot_rank)


def _is_linear(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    return type(mod).__name__ in ("Linear4bit", "Linear8bitLt") and hasattr(mod, "in_features")

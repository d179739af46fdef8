"""Mixed-adapter batches: one forward pass where every row uses its own LoRA / DoRA adapter.

Each adapted linear layer of the shared base is wrapped by ``MultiLoraLinear``. It holds
the *active tier*: ``slots`` adapters stacked as ``A [slots, r, in]`` and ``B [out, slots, r]``
(laid out so that a range of slots reads as one ``[slots·r, in]`` and one ``[out, slots·r]``
matrix, with no copy; ``B`` already multiplied by the adapter's scale ``s``), and a per-slot DoRA
output scale ``g [slots, out]``. Slot 0 is the bare base (all zeros, g = 1). Whatever the mix of
adapters in a batch, there is no Python loop over adapters (PEFT's ``adapter_names`` loops per
adapter per layer):

* a pass whose tokens all take one row each (decoding rows, and short prompts, as long as tokens ×
  the slot range stays small) and whose slots lie in a range no wider than its tokens (and, on a CPU,
  than 8 slots: ``IN_PLACE_MAX_SPAN``, measured) multiplies
  the range's stacks in place: two matmuls over every slot of the range, each token keeping its
  own slot's product (``_in_place``). At decode the stacks' bytes are the cost, and this reads
  each slot of the range once;
* other batches gather each row's slot and apply the deltas with two batched matmuls;
* a long prompt chunk (one adapter) multiplies its slot's matrices directly.

    y = g[slot] ⊙ (W x + B[slot] A[slot] x) + bias        (B[slot] already holds s · B)

For LoRA g = 1. For DoRA, ``g = m / ||W + s·B·A||`` (row norms) is a constant of the
adapter and the base, so it is computed once per adapter: by ``MultiLoraModel.prepare``,
which the engine calls on its adapter-read thread, else when the adapter enters a slot. At
inference DoRA costs what LoRA costs. The stacked tensors live beside the base
weights, in the serving dtype (the input embeddings': bf16 on GPUs, the spec's dtype on
CPU). **Ranks**: the stacks are as wide as the largest rank loaded so far (they grow when a
larger adapter arrives, up to ``r_max``, and do not shrink), not ``r_max``: rank-16 adapters on
a server allowed rank 64 take rank-16 memory and work. The in-place path reads the stacks' full
width; the gather path multiplies only up to the largest rank among its rows' adapters. Smaller
ranks are zero-padded, which changes nothing. Works over bitsandbytes 4-/8-bit base layers too
(the base layer computes ``W x``; DoRA norms use the dequantized weight, computed at slot load).

Pure torch: no Ray, no I/O. ``AdapterWeights.from_dir`` reads a standard PEFT directory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pipelines.spec import is_target, pattern_value

IN_PLACE_TOKEN_SLOTS = 4096  # a pass's tokens × its slot range, up to which every token is read in place
# The widest slot range read in place, per device type: beyond it every row multiplies span× the FLOPs of its own
# adapter, and gathering each row's slot is faster. CPU (2 cores, SmolLM2-135M's linears, rank 16, fp32;
# ``python -m benchmarks.lora_product``, docs/benchmarks.md): in place 1.0-2.0x the gather's speed at a span of 8,
# 0.8x at 16 and 0.6x at 32. Devices not listed (CUDA: not measured yet) keep only the token-slot bound.
IN_PLACE_MAX_SPAN = {"cpu": 8}


def in_place_span(device: torch.device) -> int:
    """The widest slot range a pass on ``device`` reads in place (``IN_PLACE_MAX_SPAN``)."""
    return IN_PLACE_MAX_SPAN.get(device.type, IN_PLACE_TOKEN_SLOTS)


class BatchContext:
    """Shared by every wrapped layer of one model: which adapter slot each token of the current pass
    uses, made once per forward pass (not once per layer). Two layouts:

    * rows (``set``): ``x`` is ``[batch, tokens, in]`` and row ``i`` uses slot ``rows[i]``;
    * one sequence (``set_flat``, the engine's passes): ``x`` is ``[1, T, in]``; its first ``m`` tokens
      use slots ``rows[0..m-1]``, one each (the decoding rows), and each later ``segment``
      ``(offset, count, slot, rank, dora)`` is one prompt chunk through one slot.
    """

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = torch.device(device), dtype
        self.rows: torch.Tensor | None = None  # [batch] (or [m]) long, on ``device``
        self.rank = 0  # the largest rank among the rows' adapters: the stacks are sliced to it
        self.any_adapter = False  # any adapter anywhere in the pass
        self.rows_adapter = False  # any adapter among ``rows``
        self.any_dora = False  # any DoRA adapter among ``rows``
        self.segments: list[tuple[int, int, int, int, bool]] | None = None  # None: the rows layout
        self.lo, self.span, self.onehot = 0, 0, None
        self.uniform = False  # one path for every row of a decode-only pass (``set_uniform``: the compiled step)
        self.row_slots: torch.Tensor | None = None  # [max rows] the uniform path's slot per row, at a fixed address

    def _rows(self, rows: list[int], dora_slots, ranks: dict[int, int] | None) -> None:
        slots = set(rows)
        self.rows = torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True) if rows else None
        self.rank = max((ranks or {}).get(s, 0) for s in slots) if ranks is not None and slots else -1
        self.rows_adapter = bool(slots - {0}) and self.rank != 0
        self.any_dora = bool(slots & set(dora_slots))
        # the slot range [lo, lo + span) the rows' adapters lie in, and which row uses which slot of it
        used = slots - {0}
        self.lo, self.span, self.onehot = 0, 0, None
        if used and self.rows is not None:
            self.lo, self.span = min(used), max(used) - min(used) + 1
            wide = self.span > min(len(rows), in_place_span(self.device))
            if not wide and len(rows) * self.span <= IN_PLACE_TOKEN_SLOTS:  # read in place
                cand = torch.arange(self.lo, self.lo + self.span, device=self.device)[None, :]
                self.onehot = (self.rows[:, None] == cand).to(self.dtype)[:, :, None]  # [rows, span, 1]

    def set(self, rows: list[int] | None, dora_slots: set[int] = frozenset(), ranks: dict[int, int] | None = None):
        self.segments, self.uniform = None, False
        if rows is None:
            self.rows, self.rank, self.any_adapter, self.rows_adapter, self.any_dora = None, 0, False, False, False
            self.lo, self.span, self.onehot = 0, 0, None
            return
        self._rows(rows, dora_slots, ranks)
        self.any_adapter = self.rows_adapter

    def set_flat(
        self,
        rows: list[int],
        segments: list[tuple[int, int, int]],
        dora_slots: set[int] = frozenset(),
        ranks: dict[int, int] | None = None,
    ):
        """``rows``: the slot of each of the first ``len(rows)`` tokens; ``segments``: ``(offset, count, slot)``.
        When every token times the slot range is small (``IN_PLACE_TOKEN_SLOTS``) and the range is narrow
        (``in_place_span``), the whole pass is taken
        as one-token rows read in place: one pair of matmuls per layer whatever the number of prompts,
        where a chunk per segment would cost a few operations each."""
        ranks, self.uniform = ranks or {}, False
        tokens = rows + [slot for _, count, slot in segments for _ in range(count)]
        used = set(tokens) - {0}
        span = max(used) - min(used) + 1 if used else 0
        if used and span <= in_place_span(self.device) and len(tokens) * span <= IN_PLACE_TOKEN_SLOTS:
            rows, segments = tokens, []
        self._rows(rows, dora_slots, ranks)
        self.segments = [(o, c, s, ranks.get(s, 0), s in dora_slots) for o, c, s in segments]
        self.any_adapter = self.rows_adapter or any(s and r for _, _, s, r, _ in self.segments)

    def set_uniform(self, rows: list[int]) -> None:
        """One token per row, row ``i`` through slot ``rows[i]`` (slot 0, the bare base, included), every row
        down one path whatever the mix (``MultiLoraLinear._uniform``). The slots go into ``row_slots``, a
        buffer made once (``MultiLoraModel.widen``) that the layers read and slice to their input's rows, so a
        compiled decode step sees the same tensors, and nothing else of this context, every step."""
        self.set(None)
        if self.row_slots is None or len(rows) > self.row_slots.shape[0]:
            raise ValueError(f"{len(rows)} rows: MultiLoraModel.widen(max_rows) makes room for the uniform path first")
        padded = rows + [0] * (self.row_slots.shape[0] - len(rows))
        self.row_slots.copy_(torch.tensor(padded, dtype=torch.long), non_blocking=True)
        self.uniform = self.any_adapter = True


class MultiLoraLinear(nn.Module):
    """A base linear layer plus the stacked adapters of the active tier (see the module docstring)."""

    def __init__(self, base: nn.Module, ctx: BatchContext, slots: int, r_max: int, dtype: torch.dtype):
        super().__init__()
        self.base_layer = base
        self.ctx = ctx
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r_max = r_max
        at = {"dtype": dtype, "device": base.weight.device}  # beside the base weight, in the serving dtype
        self.register_buffer("A", torch.zeros(slots, 0, self.in_features, **at), persistent=False)
        self.register_buffer("B", torch.zeros(self.out_features, slots, 0, **at), persistent=False)  # out-major
        self.register_buffer("g", torch.ones(slots, self.out_features, **at), persistent=False)
        self._range: tuple[int, ...] | None = None  # the slot range and stacks ``_views`` show (``_in_place``)
        self._views: tuple[torch.Tensor, torch.Tensor] | None = None
        self._w_sq: torch.Tensor | None = None  # the base's squared row norms, for DoRA (made at first use)

    @property
    def quantized(self) -> bool:
        return type(self.base_layer.weight).__name__ in ("Params4bit", "Int8Params")

    def base_weight(self) -> torch.Tensor:
        """The base weight in float (dequantized for bitsandbytes layers)."""
        w = self.base_layer.weight
        if type(w).__name__ in ("Params4bit", "Int8Params"):
            from peft.utils.integrations import dequantize_module_weight

            return dequantize_module_weight(self.base_layer).float()
        return w.detach().float()

    @property
    def rank(self) -> int:
        """The stacks' width: the largest rank loaded so far."""
        return self.A.shape[1]

    def grow(self, rank: int) -> None:
        """Widen the stacks to ``rank`` (their contents kept, the new ranks zero)."""
        if rank <= self.rank:
            return
        if rank > self.r_max:
            raise ValueError(f"rank {rank} exceeds the served maximum rank {self.r_max}")
        A = self.A.new_zeros((self.A.shape[0], rank, self.in_features))
        A[:, : self.rank] = self.A
        B = self.B.new_zeros((self.out_features, self.B.shape[1], rank))
        B[:, :, : self.rank] = self.B
        self.A, self.B = A, B
        self._views = self._range = None  # the old stacks go now, not at the next in-place pass

    def load_slot(
        self,
        slot: int,
        A: torch.Tensor | None,
        B: torch.Tensor | None,
        scale: float,
        magnitude: torch.Tensor | None,
        g: torch.Tensor | None = None,
    ) -> None:
        """Put one adapter's tensors for this layer into ``slot`` (None: the adapter does not touch this layer).
        A DoRA adapter's output scale ``g`` is computed here unless given (``MultiLoraModel.prepare``)."""
        with torch.no_grad():
            self.A[slot].zero_()
            self.B[:, slot].zero_()
            self.g[slot].fill_(1.0)
            if A is None:
                return
            r = A.shape[0]
            self.grow(r)
            A, B = A.to(self.A.device), B.to(self.B.device)  # from the CPU tier: one copy each
            self.A[slot, :r] = A.to(self.A.dtype)
            self.B[:, slot, :r] = (scale * B.float()).to(self.B.dtype)  # s folded in: nothing to scale per pass
            if magnitude is not None:
                self.g[slot] = (self.dora_scale(A, B, scale, magnitude) if g is None else g.to(self.g.device)).to(
                    self.g.dtype
                )

    def dora_scale(self, A: torch.Tensor, B: torch.Tensor, scale: float, magnitude: torch.Tensor) -> torch.Tensor:
        """DoRA's output scale ``g = m / ||W + s·B·A||`` per output row, in float, on the base's device."""
        dev = self.A.device
        norm = self._dora_norm(A.to(dev).float(), B.to(dev).float(), scale)
        return magnitude.to(dev).float() / norm

    def _dora_norm(self, A: torch.Tensor, B: torch.Tensor, s: float) -> torch.Tensor:
        """``||W + s·B·A||`` per output row without making ``W + s·B·A``: expanded as
        ``||w_i||² + 2s·(B ⊙ W Aᵀ)_i· + s²·(B AAᵀ ⊙ B)_i·``. The base's ``||w_i||²`` is kept (the base is
        frozen), so a load reads the base weight once, for ``W Aᵀ`` (``[out, r]``, in the weight's dtype,
        summed in float), and allocates nothing the weight's size (except a quantized base's dequantized
        copy)."""
        w = self.base_weight() if self.quantized else self.base_layer.weight.detach()
        if self._w_sq is None:
            self._w_sq = torch.linalg.vector_norm(w, dim=1, dtype=torch.float32) ** 2
        cross = (B * (w @ A.to(w.dtype).T).float()).sum(1)
        delta = ((B @ (A @ A.T)) * B).sum(1)
        return (self._w_sq + 2 * s * cross + s * s * delta).clamp_min(0).sqrt()

    def clear_slot(self, slot: int) -> None:
        self.load_slot(slot, None, None, 0.0, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        ctx = self.ctx
        if ctx.uniform:
            return self._uniform(x, y)
        if not ctx.any_adapter or not self.rank:  # no adapter in the pass, or none loaded touches this layer
            return y
        if ctx.segments is None:  # the rows layout
            shape = x.shape
            x3, y3 = x.reshape(shape[0], -1, shape[-1]), y.reshape(shape[0], -1, self.out_features)
            return self._per_row(x3, y3).reshape(*shape[:-1], self.out_features)
        xf, yf = x.reshape(-1, self.in_features), y.reshape(-1, self.out_features)  # one sequence
        m = 0 if ctx.rows is None else ctx.rows.shape[0]
        if not ctx.rows_adapter:
            head = yf[:m]
        elif ctx.onehot is not None:
            head = self._in_place(xf[:m], yf[:m])
        else:
            head = self._per_row(xf[:m, None], yf[:m, None]).reshape(m, -1)
        if not ctx.segments:  # decoding rows only
            return head.view(y.shape)
        parts = [head]
        for offset, count, slot, rank, dora in ctx.segments:  # a prompt chunk: one adapter, no gather
            ys = yf[offset : offset + count]
            if not slot or not rank:
                parts.append(ys)
                continue
            xs = xf[offset : offset + count].to(self.A.dtype)
            delta = (xs @ self.A[slot, :rank].T) @ self.B[:, slot, :rank].T
            parts.append(self._combine(ys, delta, self.g[slot] if dora else None).to(ys.dtype))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.to(y.dtype).reshape(y.shape)

    def _per_row(self, x3: torch.Tensor, y3: torch.Tensor) -> torch.Tensor:
        """``[batch, tokens, ·]``, row ``i`` through slot ``ctx.rows[i]``: read in place for one token per row
        when the slots lie in a range no wider than the rows (``_in_place``), else the stacks gathered per row."""
        ctx = self.ctx
        rows, r = ctx.rows, (ctx.rank if ctx.rank > 0 else self.rank)
        x3 = x3.to(self.A.dtype)
        if x3.shape[1] == 1 and ctx.onehot is not None:
            return self._in_place(x3[:, 0], y3[:, 0])[:, None]
        a = self.A[:, :r].index_select(0, rows)  # [batch, r, in]: only the ranks this batch's adapters use
        b = self.B[:, :, :r].index_select(1, rows).permute(1, 2, 0)  # [batch, r, out]
        delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b)  # [batch, tokens, out]
        g = self.g.index_select(0, rows).unsqueeze(1) if ctx.any_dora else None  # [batch, 1, out]
        return self._combine(y3, delta, g).to(y3.dtype)

    def _uniform(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One token per row, row ``i`` through slot ``ctx.row_slots[i]``, down one path whatever the rows' adapters:
        each row's stacks gathered at their full width (zero past an adapter's rank, and zero for slot 0) and
        its DoRA scale applied (one for LoRA and the base). No branch on the pass's mix, so a compiled step
        never sees another structure (``Engine(compile_decode=True)``)."""
        x3 = x.reshape(-1, 1, self.in_features).to(self.A.dtype)  # [rows, 1, in]
        rows = self.ctx.row_slots[: x3.shape[0]]
        a = self.A.index_select(0, rows)  # [rows, r, in]
        b = self.B.index_select(1, rows).permute(1, 2, 0)  # [rows, r, out]
        delta = torch.bmm(torch.bmm(x3, a.transpose(1, 2)), b)
        g = self.g.index_select(0, rows).unsqueeze(1)  # [rows, 1, out]
        out = self._combine(y.reshape(-1, 1, self.out_features), delta, g)
        return out.to(y.dtype).reshape(y.shape)

    def _in_place(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``x [rows, in]``, ``y [rows, out]``: one token per row, the rows' slots within ``[lo, lo + span)`` (span ≤ rows): every slot of the range
        multiplies every row's token, straight from the stacks (views, no copy), and a mask keeps each row's
        own slot between the two matmuls. At decode the stacks' bytes, not the FLOPs,
        are the cost: this reads each slot of the range once, where a per-row gather reads, writes and
        reads again a copy of every row's adapter."""
        ctx = self.ctx
        # the range's stacks as two matrices: views, remade only when the range or the stacks change (the
        # views keep the stacks they show alive, so their ids are not reused while cached)
        key = (ctx.lo, ctx.span, id(self.A), id(self.B))
        if self._range != key:
            lo, span, r = ctx.lo, ctx.span, self.rank
            a = self.A[lo : lo + span].reshape(span * r, self.in_features)  # [span·r, in]
            self._views = (a, self.B[:, lo : lo + span].reshape(self.out_features, span * r))  # [out, span·r]
            self._range = key
        a, b = self._views
        h = F.linear(x if x.dtype == a.dtype else x.to(a.dtype), a)  # [rows, span·r]
        h.view(x.shape[0], ctx.span, self.rank).mul_(ctx.onehot)  # each row keeps its own slot's ranks
        if not ctx.any_dora and y.dtype == b.dtype:
            return torch.addmm(y, h, b.T)  # y + h·Bᵀ in one op
        g = self.g.index_select(0, ctx.rows) if ctx.any_dora else None
        return self._combine(y, F.linear(h, b), g).to(y.dtype)

    def _combine(self, y: torch.Tensor, delta: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """``g ⊙ (W x + delta) + bias`` (DoRA), or ``y + delta`` (LoRA), where ``y = W x + bias``."""
        out = y.to(delta.dtype)
        if g is None:
            return out + delta
        bias = getattr(self.base_layer, "bias", None)
        if bias is None:
            return g * (out + delta)
        return g * (out - bias + delta) + bias


# --------------------------------------------------------------------------- adapters


@dataclass
class AdapterWeights:
    """One adapter's tensors, keyed by the base module name (``model.layers.0.self_attn.q_proj``)."""

    name: str
    rank: int
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]] = field(default_factory=dict)
    dora: bool = False
    nbytes: int = 0
    g: dict[str, torch.Tensor] = field(default_factory=dict)  # DoRA output scales, once prepared for a base

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
        self.ctx = BatchContext(self.device, self.dtype)
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
            layer.load_slot(slot, a, b, s, m, adapter.g.get(name))
        for old, sl in list(self.slot_of.items()):
            if sl == slot:
                del self.slot_of[old]
        self.slot_of[adapter.name] = slot
        self.slot_rank[slot] = adapter.rank
        (self.dora_slots.add if adapter.dora else self.dora_slots.discard)(slot)

    def prepare(self, adapter: AdapterWeights) -> AdapterWeights:
        """Compute what loading ``adapter`` into a slot would otherwise compute on the decode loop: a DoRA
        adapter's output scales, which depend only on it and this base (kept with it in host memory: one
        float per output row per layer). Thread-safe beside forward passes: it only reads the base
        weights. Layers over a quantized base are left to the slot load, since dequantizing one
        touches the layer's state. On a GPU its kernels share the decode loop's stream. Returns
        ``adapter``."""
        if adapter.dora and not adapter.g:
            with torch.no_grad():
                for name, (a, b, s, m) in adapter.layers.items():
                    layer = self.layers.get(name)
                    if layer is not None and m is not None and not layer.quantized:
                        g = layer.dora_scale(a, b, s, m)
                        adapter.g[name] = g if g.is_meta else g.cpu()  # meta tensors hold no data to copy
            adapter.nbytes += sum(t.numel() * t.element_size() for t in adapter.g.values())
        return adapter

    def widen(self, max_rows: int) -> None:
        """Ready the uniform path (``every_row``) for up to ``max_rows`` rows: every layer's stacks made ``r_max``
        wide now (they never grow again, so they keep their addresses: what a compiled or captured step needs;
        it costs what ``slots`` adapters of rank ``r_max`` take), and the rows' slot buffer made."""
        for layer in self.layers.values():
            layer.grow(self.r_max)
        self.ctx.row_slots = torch.zeros(max_rows, dtype=torch.long, device=self.device)

    def evict(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.clear_slot(slot)
        self.slot_of = {k: v for k, v in self.slot_of.items() if v != slot}
        self.slot_rank.pop(slot, None)
        self.dora_slots.discard(slot)

    def rows(self, slots: list[int]) -> None:
        """Set the slot of each row for the next forward passes (``x`` is ``[batch, tokens, in]``)."""
        self.ctx.set(slots, self.dora_slots, self.slot_rank)

    def every_row(self, slots: list[int]) -> None:
        """Set one token per row, each through its slot, all down one path (``BatchContext.set_uniform``)."""
        self.ctx.set_uniform(slots)

    def feeds(self, slots: list[int], segments: list[tuple[int, int, int]]) -> None:
        """Set the slots of one sequence: its first ``len(slots)`` tokens one each, then ``segments``
        ``(offset, count, slot)`` (``BatchContext.set_flat``)."""
        self.ctx.set_flat(slots, segments, self.dora_slots, self.slot_rank)


def _is_linear(mod: nn.Module) -> bool:
    if isinstance(mod, nn.Linear):
        return True
    return type(mod).__name__ in ("Linear4bit", "Linear8bitLt") and hasattr(mod, "in_features")

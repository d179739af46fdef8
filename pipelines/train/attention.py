"""Padding-free attention: one SDPA call per example, so no compute is spent on pad tokens or on the
masked-out blocks between examples.

A padding-free micro-batch (``data.collate``, packed or not) is a single row of every example's tokens,
with ``position_ids`` that restart at 0 at each example. transformers' stock SDPA path then builds a
dense ``[tokens, tokens]`` block-diagonal mask and attends over all of it: its cost grows with the square
of the *micro-batch's* tokens. ``VARLEN`` is SDPA applied per example instead (``is_causal`` on each
example's slice), so attention costs the sum of the squares of the *examples'* lengths, like
flash-attention's varlen path on a GPU.

A row may also start with a **shared prefix** (``data.collate(share_prefix=True)``): the leading tokens
all its examples share, once. The first example continues it; every later one's positions start at the
prefix's length, and it attends to the prefix's keys and values and then its own (``segments``). Only
``VARLEN`` reads that layout: transformers' masks and flash-attention would cut the prefix off.

Everything that is not a padding-free row (a padded batch with an ``attention_mask``, generation with a
KV cache, a query shorter than its keys) goes to transformers' own ``sdpa_attention_forward`` with the
mask transformers' ``sdpa_mask`` builds, unchanged. ``enable`` switches a model that runs on ``sdpa`` only;
flash-attention already has a varlen path, and eager attention may carry soft-capping SDPA would drop.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import JobSpec

VARLEN = "raypeft_sdpa_varlen"


def segment_bounds(positions: list[int]) -> list[tuple[int, int]]:
    """``(start, end)`` of every example in one padding-free row: a new example starts wherever the
    position does not continue the previous one (as transformers' ``find_packed_sequence_indices``)."""
    bounds, start = [], 0
    for i in range(1, len(positions)):
        if positions[i] != positions[i - 1] + 1:
            bounds.append((start, i))
            start = i
    if positions:
        bounds.append((start, len(positions)))
    return bounds


def segments(positions: list[int]) -> list[tuple[int, int, int]]:
    """``(start, end, prefix)`` of every example in one padding-free row (``segment_bounds``): ``prefix`` is
    the position the example's tokens start at, 0 for a whole example; above 0, the example continues the
    row's first ``prefix`` tokens (``data.collate``'s shared prefix), which must then be one example from
    position 0."""
    out = []
    for s, e in segment_bounds(positions):
        p = positions[s]
        if p and not (out and out[0][2] == 0 and out[0][1] >= p):
            raise ValueError(
                f"a padding-free example starts at position {p}, but the row does not begin with a {p}-token "
                "prefix from position 0 (data.collate's shared-prefix layout)"
            )
        out.append((s, e, p))
    return out


_known: dict[int, tuple[int, list[tuple[int, int, int]]]] = {}  # id(position_ids) -> (version, segments)


def remember_layout(position_ids, host_position_ids) -> None:
    """Hand the attention the row layout of ``position_ids`` (the device tensor a forward will get), read
    off ``host_position_ids`` (the same values on the host): then no layer reads it off the device. Kept
    while that tensor lives."""
    if host_position_ids.shape[0] != 1:
        return
    key = id(position_ids)
    _known[key] = (position_ids._version, segments(host_position_ids[0].tolist()))
    weakref.finalize(position_ids, _known.pop, key, None)


def packed_mark(device):
    """The attention mask a padding-free row under ``VARLEN`` is given (``device_batch``): an
    empty 4-D mask. transformers returns a 4-D mask as it is, so it does not read the position ids back
    from the device to look for packed sequences (a host sync every forward); ``varlen_sdpa`` reads it as
    "no padding: split the row by its layout"."""
    import torch

    return torch.empty(1, 1, 0, 0, dtype=torch.bool, device=device)


def _is_mark(mask) -> bool:
    return mask is not None and mask.ndim == 4 and mask.numel() == 0


def to_device(tensor, device):
    """A host tensor on ``device``: to a GPU from pinned memory without blocking the host (the caching host
    allocator keeps each pinned block until its copy is done)."""
    import torch

    if torch.device(device).type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def model_inputs(batch: dict, device) -> dict:
    """``collate``'s tensors on ``device`` (``to_device``), plus ``use_cache=False`` for packed rows
    (transformers only reads packed position ids when no cache is built; training never uses one)."""
    out = {k: to_device(v, device) for k, v in batch.items()}
    if "position_ids" in out:
        out["use_cache"] = False
    return out


def device_batch(batch: dict, device, varlen: bool = False, flex: bool = False) -> dict:
    """A host batch (``collate``'s) as a training micro-step takes it: ``model_inputs``, plus what is read
    off the host batch so that the device never has to be. The flat positions whose label counts
    (``counted_index``, for the loss's gather: ``train.loss``); for a padding-free row on a model that
    runs ``VARLEN`` (``varlen``), the row's example layout (``remember_layout``) and ``packed_mark``; on one
    that runs ``FLEX`` (``flex``), the row padded to its bucket (``flex_batch``) and its ``flex_mask``."""
    from pipelines.train.loss import IGNORE

    row = "position_ids" in batch and "attention_mask" not in batch and batch["position_ids"].shape[0] == 1
    mask = flex_mask(batch["position_ids"], device) if flex and row else None
    if mask is not None:
        batch = flex_batch(batch)
    out = model_inputs(batch, device)
    out["counted_index"] = to_device((batch["labels"][:, 1:] != IGNORE).reshape(-1).nonzero().view(-1), device)
    if mask is not None:
        out["attention_mask"] = mask
    elif varlen and row:
        remember_layout(out["position_ids"], batch["position_ids"])
        out["attention_mask"] = packed_mark(device)
    return out


def _segments_of(position_ids) -> list[tuple[int, int, int]]:
    """The row's ``segments``: as ``remember_layout`` handed them, else read off the device once per forward
    (every layer gets the same ``position_ids`` tensor). Keyed by that tensor's identity (while it lives)
    and version, never by its address alone, which the allocator hands to the next batch's tensor once this
    one is freed."""
    known = _known.get(id(position_ids))
    if known is None or known[0] != position_ids._version:
        remember_layout(position_ids, position_ids)  # the one read, then every later layer finds it
        known = _known[id(position_ids)]
    return known[1]


def varlen_sdpa(module, query, key, value, attention_mask, position_ids=None, **kwargs):
    """An ``AttentionInterface`` function: per-example causal SDPA on a padding-free row, else stock SDPA.
    An example that continues the row's shared prefix attends to the prefix's keys and to its own,
    causally (its queries sit after the prefix)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len = query.shape[2]
    if _is_mark(attention_mask):
        attention_mask = None  # a padding-free row (packed_mark)
    if attention_mask is not None or position_ids is None or q_len != key.shape[2] or q_len < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1 or position_ids.shape[0] != 1:
        if any(len(segment_bounds(row)) > 1 for row in position_ids.tolist()):
            raise ValueError("padding-free attention takes one packed row per micro-batch (data.collate's layout)")
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)
    segs = _segments_of(position_ids)
    if len(segs) == 1:
        return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)
    outs = []
    for s, e, p in segs:
        if not p:
            out = sdpa_attention_forward(
                module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None, is_causal=True, **kwargs
            )[0]
        else:  # queries at positions p..p+n-1 over keys 0..p-1 (the prefix) then p..p+n-1: lower-right causal
            n = e - s
            mask = torch.ones(n, p + n, dtype=torch.bool, device=query.device).tril(diagonal=p)
            k = torch.cat([key[:, :, :p], key[:, :, s:e]], dim=2)
            v = torch.cat([value[:, :, :p], value[:, :, s:e]], dim=2)
            out = sdpa_attention_forward(module, query[:, :, s:e], k, v, mask[None, None], **kwargs)[0]
        outs.append(out)
    return torch.cat(outs, dim=1), None  # [batch, tokens, heads, head_dim], as sdpa_attention_forward


# --------------------------------------------------------------------------- FlexAttention (one call per layer)

FLEX = "raypeft_flex"
FLEX_BLOCK = 128  # FlexAttention's block: a row is padded to a multiple, so compiling repeats per bucket at most


def flex_length(n: int) -> int:
    """The length a padding-free row of ``n`` tokens runs at under ``FLEX``: the next multiple of
    ``FLEX_BLOCK``. Pure."""
    return -(-n // FLEX_BLOCK) * FLEX_BLOCK


def example_ids(positions: list[int]) -> tuple[list[int], int]:
    """For one padding-free row (``collate``'s layout, ``segments``): the example each position belongs to,
    and the shared prefix's length (0 without one; the prefix belongs to the first example). Pure."""
    ids, prefix = [0] * len(positions), 0
    for i, (s, e, p) in enumerate(segments(positions)):
        ids[s:e] = [i] * (e - s)
        prefix = prefix or p
    return ids, prefix


def flex_rule(doc, prefix):
    """FlexAttention's ``mask_mod`` for a padding-free row: causal, within one example, plus the shared
    prefix's keys. ``doc``: each position's example id (below 0 for the bucket's padding, each pad its own);
    ``prefix``: a 0-dim tensor (not an int, so that a new prefix length is an input to the compiled kernel,
    not a recompile)."""

    def mask_mod(b, h, q, kv):
        return (kv <= q) & ((doc[q] == doc[kv]) | (kv < prefix))

    return mask_mod


def flex_mask(host_position_ids, device):
    """The ``BlockMask`` of one padding-free row (``host_position_ids``: ``[1, n]`` on the host), built once
    per micro-batch and shared by its layers, over ``flex_length(n)`` positions (``flex_batch``'s padding:
    each pad attends only to itself and to the prefix, and no real token attends to it)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    ids, prefix = example_ids(host_position_ids[0].tolist())
    n = flex_length(len(ids))
    doc = to_device(torch.tensor(ids + list(range(-1, len(ids) - n - 1, -1)), dtype=torch.int32), device)
    rule = flex_rule(doc, to_device(torch.tensor(prefix, dtype=torch.int32), device))
    return create_block_mask(rule, None, None, n, n, device=device)


def flex_batch(batch: dict) -> dict:
    """A padding-free host batch padded to ``flex_length``: pad tokens with ignored labels and position 0,
    so that a micro-batch's shapes fall into few buckets (compiled once each). Nothing the loss counts
    changes."""
    import torch.nn.functional as F

    from pipelines.train.loss import IGNORE

    pad = flex_length(batch["input_ids"].shape[1]) - batch["input_ids"].shape[1]
    fill = {"input_ids": 0, "labels": IGNORE, "position_ids": 0}
    return {k: F.pad(v, (0, pad), value=fill[k]) if k in fill else v for k, v in batch.items()}


def flex_sdpa(module, query, key, value, attention_mask, **kwargs):
    """An ``AttentionInterface`` function: transformers' compiled FlexAttention for a padding-free row
    (``attention_mask`` a ``BlockMask``, ``device_batch``), stock SDPA for everything else (padded
    evaluation batches, generation)."""
    from torch.nn.attention.flex_attention import BlockMask

    if isinstance(attention_mask, BlockMask):
        from transformers.integrations.flex_attention import flex_attention_forward

        return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def varlen_mask(*args, attention_mask=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0, **kwargs):
    """An ``AttentionMaskInterface`` function: no mask where ``varlen_sdpa`` splits the row itself (no
    padding, queries = keys); ``sdpa_mask`` everywhere else."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not q_offset and not kv_offset:
        return None
    return sdpa_mask(
        *args,
        attention_mask=attention_mask,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        **kwargs,
    )


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(VARLEN, varlen_sdpa)
    AttentionMaskInterface.register(VARLEN, varlen_mask)
    AttentionInterface.register(FLEX, flex_sdpa)
    AttentionMaskInterface.register(FLEX, sdpa_mask)  # a BlockMask passes through transformers unchanged


def supported(model) -> bool:
    """Whether ``enable`` would switch ``model`` (a PEFT wrapper or a transformers model): it runs on
    ``sdpa`` with no sliding window (which only a mask would apply). Others keep their implementation;
    their padding-free rows stay correct through transformers' block-diagonal mask, at its cost."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    if getattr(config, "sliding_window", None) or getattr(config, "use_sliding_window", False):
        return False
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    return hasattr(target, "set_attn_implementation")


def enable(model, implementation: str = VARLEN) -> bool:
    """Switch ``model`` from ``sdpa`` to ``implementation`` (``VARLEN`` or ``FLEX``) when ``supported``; True
    if it did."""
    if not supported(model):
        return False
    register()
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    target.set_attn_implementation(implementation)
    return getattr(target.config, "_attn_implementation", None) == implementation


# --------------------------------------------------------------------------- a run's micro-batch layout


class Layout(NamedTuple):
    """How a run's micro-batches are laid out (``batch_layout``): ``data.collate``'s switches and a line
    for the log."""

    padding_free: bool
    share_prefix: bool
    how: str
    varlen: bool = False  # the model runs ``VARLEN`` (``enable``): ``device_batch`` hands it the row layout
    flex: bool = False  # the model runs ``FLEX``: ``device_batch`` pads the row to its bucket and adds its BlockMask

    @property
    def attention(self) -> str:
        """The path a run's training attention took, in ``train.attention``'s words where it has them: ``flex``,
        ``per_example``, ``padded`` (one row per example), or ``transformers`` (its own kernel over padding-free
        rows: flash-attention's varlen, or a block-diagonal mask)."""
        if self.flex:
            return "flex"
        return "per_example" if self.varlen else "transformers" if self.padding_free else "padded"


def padding_free(spec: JobSpec, attention_ok: bool, prompt_learning: bool, launch_bound: bool = False) -> bool:
    """Whether micro-batches run padding-free (``data.collate``): ``data.padding_free`` when set, else for
    packed runs, and for unpacked ones when attention can split the row per example (``attention_ok``),
    the method adds no virtual tokens (``prompt_learning`` False), and splitting it is not slower than
    padding on this device (``launch_bound`` False; ``True`` for raypeft's per-example SDPA on a GPU, where
    one kernel launch per example per layer made the step 0.28-0.32x a padded bare loop's on an H200,
    issue 33) or ``data.share_prefix: true`` asks for it."""
    if spec.data.padding_free is not None:
        return spec.data.padding_free
    if spec.train.attention != "auto":  # an attention for padding-free rows (batch_layout checks it can run)
        return True
    if spec.data.packing:
        return True
    return attention_ok and not prompt_learning and (not launch_bound or bool(spec.data.share_prefix))


def share_prefix(spec: JobSpec, padding_free_rows: bool, varlen: bool, dropouts: list[str] = ()) -> bool:
    """Whether micro-batches compute their examples' shared prefix once (``data.collate``): ``data.share_prefix``
    when set, else whenever they can and it gives the padded batch's gradient: padding-free rows with raypeft's
    per-example SDPA (``varlen``, ``VARLEN``) and no dropout acting on the prefix's tokens (``dropouts``,
    ``active_dropouts``: computed once, the prefix would get one dropout mask for all its examples). ``true``
    where they can't is a ``ValueError`` naming the field."""
    can = padding_free_rows and varlen
    if spec.data.share_prefix and not can:
        raise ValueError(
            "data.share_prefix: true needs padding-free rows with raypeft's attention (train.attention: per_example "
            "or flex), "
            "and this model's attention is not sdpa without a sliding window: unset data.share_prefix (got true)"
        )
    if spec.data.share_prefix and dropouts:
        raise ValueError(
            f"data.share_prefix: true, and dropout acts on every token ({', '.join(dropouts)}): computed once, the "
            "prefix would share one dropout mask across its examples; set the dropout to 0 or unset "
            "data.share_prefix (got true)"
        )
    return can and spec.data.share_prefix is not False and not dropouts


def active_dropouts(model) -> list[str]:
    """The dropouts that act on every token in training, as ``'name p'``: dropout modules with ``p > 0`` (an
    adapter's ``lora_dropout``, a model's own) and the model config's dropout rates above 0."""
    import torch

    found = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            parts = [p for p in name.split(".") if not p.isdigit()]
            found.add(
                f"{next((p for p in reversed(parts) if 'dropout' in p), parts[-1] if parts else name)} {module.p:g}"
            )
    config = getattr(model, "config", None)
    for key, value in (config.to_dict() if config is not None else {}).items():
        if "dropout" in key and isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            found.add(f"{key} {value:g}")
    return sorted(found)


def batch_layout(spec: JobSpec, model, device) -> Layout:
    """Whether this run's micro-batches are padding-free (``padding_free``), switching ``model`` (the method's
    model) to per-example SDPA when they are and it can, and whether they compute a shared prefix once
    (``share_prefix``). A prompt-learning method's model prepends virtual tokens to every row: one row per
    example. ``device`` is where the model steps: on a GPU, per-example SDPA is launch-bound, so unset
    ``data.padding_free`` pads there (docs/data.md, "Defaults per device")."""
    flash = str(getattr(model.config, "_attn_implementation", "")).startswith("flash_attention")
    prompt_learning = any(getattr(c, "is_prompt_learning", False) for c in getattr(model, "peft_config", {}).values())
    chosen = spec.train.attention
    launch_bound = getattr(device, "type", str(device)) == "cuda" and not flash and chosen == "auto"
    sdpa = supported(model)
    if chosen != "auto" and (not sdpa or prompt_learning):
        why = (
            "the method prepends virtual tokens to every row (padded rows only)"
            if prompt_learning
            else f"the base runs {getattr(model.config, '_attn_implementation', None)!r} attention, or a sliding window"
        )
        raise ValueError(
            f"train.attention: {chosen} needs padding-free rows on SDPA, and {why}; use auto (got {chosen!r})"
        )
    if not padding_free(spec, sdpa or flash, prompt_learning, launch_bound):
        share_prefix(spec, False, False)  # data.share_prefix: true raises here, naming the field
        why = ""
        if launch_bound and spec.data.padding_free is None and sdpa and not prompt_learning:
            why = " (on a GPU per-example SDPA is launch-bound: data.padding_free unset pads there)"
        return Layout(False, False, "padded rows, one per example" + why)
    flex = chosen == "flex"
    ours = enable(model, FLEX if flex else VARLEN)
    dropouts = active_dropouts(model) if ours and spec.data.share_prefix is not False else []
    share = share_prefix(spec, True, ours, dropouts)
    if ours:
        how = (
            f"one FlexAttention call per layer ({FLEX}, rows padded to a multiple of {FLEX_BLOCK})"
            if flex
            else f"attention per example ({VARLEN})"
        ) + (", a shared prefix computed once" if share else "")
        if dropouts and not share:
            how += f", no shared prefix (dropout acts on its tokens: {', '.join(dropouts)})"
    elif flash:
        how = "attention per example (flash-attention varlen)"
    else:
        how = "attention through transformers' block-diagonal mask"
    return Layout(True, share, "padding-free rows; " + how, ours and not flex, ours and flex)

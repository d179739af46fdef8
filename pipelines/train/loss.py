"""The training loss: summed over the tokens whose label counts, computed only where it counts.

``token_loss_sum`` returns the *sum* of the next-token cross-entropy over a micro-batch's label tokens; the
engines divide it by the label-token count of the whole global batch (every micro-step of every worker), so
a step's gradient is the same however the global batch is split (transformers' ``num_items_in_batch``).

With ``chunk_tokens`` > 0 the LM head runs only on the positions whose label isn't ignored (on chat data,
most tokens are prompt), ``chunk_tokens`` rows at a time, each chunk's logits recomputed in backward
(``torch.utils.checkpoint``), so no ``[tokens, vocab]`` fp32 tensor ever exists: the loss's peak is one
chunk's (under ZeRO-3 the chunks' logits are kept for backward instead: see ``recompute``). The model's own
forward still runs (PEFT, DDP and DeepSpeed hooks see the usual call), asked for
the last position's logits only; the decoder's final hidden states are taken from a forward hook on it.

Pure torch: no Ray, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable

IGNORE = -100


def label_tokens(labels) -> int:
    """How many positions of a collated batch the loss counts (labels are shifted: position t predicts t+1)."""
    return int((labels[:, 1:] != IGNORE).sum())


def _inner(model):
    """The transformers model under a PEFT wrapper (adapters are injected into its modules in place)."""
    get = getattr(model, "get_base_model", None)
    return get() if get is not None else model


def _logits_fn(inner) -> Callable:
    """The LM head plus the logits transform the model's own forward applies after it (Gemma's final
    soft-capping, Cohere's logit scale), so the chunked loss computes exactly the model's logits."""
    cfg = inner.config
    cap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    head = inner.get_output_embeddings()

    def logits(h):
        out = head(h)
        if scale is not None:
            out = out * scale
        out = out.float()
        if cap:
            out = (out / cap).tanh() * cap
        return out

    return logits


def _chunk_sum(logits_of: Callable, h, y):
    import torch.nn.functional as F

    return F.cross_entropy(logits_of(h), y, reduction="sum")


def token_loss_sum(
    call: Callable, model, batch: dict, chunk_tokens: int, chunks: int | None = None, recompute: bool = True
):
    """Sum of the cross-entropy over ``batch["labels"]``'s counted tokens (a 0-dim fp32 tensor with grad).

    ``call`` runs the forward (the model itself, DDP around it, or a DeepSpeed engine); ``model`` is the
    unwrapped model, to find its decoder and head. ``chunk_tokens`` 0 computes the full logits, as the
    model's own loss does. ``chunks`` fixes the number of head calls (ZeRO-3: every rank gathers the head's
    weights the same number of times, so a rank with fewer label tokens runs empty chunks). ``recompute``
    False keeps each chunk's logits for backward instead of recomputing them: ZeRO-3 partitions the head's
    weights again after the forward, and a recomputation in backward would see them empty."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    labels = batch["labels"]
    index = batch.get("counted_index")  # flat positions whose label counts, built on the host (train.loop)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "counted_index")}
    n = labels.shape[1]
    target = labels[:, 1:]
    if chunk_tokens <= 0:
        logits = call(**inputs).logits[:, -n:]  # prompt-learning methods prepend virtual tokens
        return F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            target.reshape(-1),
            ignore_index=IGNORE,
            reduction="sum",
        )
    inner = _inner(model)
    captured: list = []

    def keep(_module, _args, out):
        captured.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)

    hook = inner.get_decoder().register_forward_hook(keep)
    try:
        call(**inputs, logits_to_keep=1)  # the model's head runs on one position per row: B × vocab, not T × vocab
    finally:
        hook.remove()
    if len(captured) != 1:
        raise RuntimeError(f"the decoder ran {len(captured)} times in one forward; set train.loss_chunk_tokens: 0")
    hidden = captured[0][:, -n:][:, :-1]
    if index is None:  # a boolean gather: its size is read off the device
        counted = target != IGNORE
        h, y = hidden[counted], target[counted]
    else:  # the same rows, gathered by an index whose size the host already knows: no sync
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index)
        y = target.reshape(-1).index_select(0, index)
    logits_of = _logits_fn(inner)
    k = chunks if chunks is not None else max(1, math.ceil(h.shape[0] / chunk_tokens))
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for i in range(k):
        s = slice(i * chunk_tokens, (i + 1) * chunk_tokens)
        if recompute:
            total = total + checkpoint(_chunk_sum, logits_of, h[s], y[s], use_reentrant=False)
        else:
            total = total + _chunk_sum(logits_of, h[s], y[s])
    return total

"""Next-token sampling for a batch of rows in one set of device ops, each row with its own temperature,
top-p and seed, and no host sync.

A row's draw depends only on its own ``(seed, step, logits)``: the uniform noise for token ``v`` at that
row's step ``step`` is a hash of ``(seed, step, v)`` (SplitMix64's finalizer), and the token is the
Gumbel-max ``argmax(log p + Gumbel(u))``, an exact draw from ``p``. So a seeded request gives the same
tokens alone or in any batch, at any row, and there is no generator object per request, no Python loop
over rows, and nothing read back to the host. Rows with ``temperature <= 0`` take the argmax.

Pure torch: no Ray, no I/O.
"""

from __future__ import annotations

import torch

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """A 64-bit constant as the int64 torch holds it."""
    x &= _MASK64
    return x - (1 << 64) if x >> 63 else x


_GOLDEN, _MIX1, _MIX2 = (_signed(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))
_STEP = _signed(0xD1B54A32D192ED03)


def _shr(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` keeps the sign)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def uniform(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[rows, vocab]`` uniforms in (0, 1), float32: SplitMix64 of ``(seed, step, token)``; ``seed`` and
    ``step`` are int64 ``[rows]`` on the logits' device. Wrapping int64 arithmetic, as on every device."""
    token = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    z = (seed * _GOLDEN + step * _STEP).view(-1, 1) + token * _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    return (_shr(z, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # the top 24 bits: exact in float32


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
    nucleus: bool = True,
) -> torch.Tensor:
    """Each row's next token ``[rows]`` (int64, on the logits' device). ``temperature``/``top_p`` are float
    ``[rows]``; a row with ``temperature <= 0`` takes the argmax. Top-p keeps the most likely tokens whose
    cumulative probability before them is under ``top_p`` (at least the most likely one). ``nucleus=False``
    (the caller knows no row has ``top_p < 1``) skips the sort, the costly part on a CPU."""
    greedy = logits.argmax(-1)
    warm = temperature > 0
    t = torch.where(warm, temperature, torch.ones_like(temperature)).to(logits.dtype)
    logp = torch.log_softmax(logits / t.view(-1, 1), -1)
    gumbel = -torch.log(-torch.log(uniform(seed, step, logits.shape[-1])))
    if nucleus:
        sorted_lp, order = logp.sort(-1, descending=True)
        sorted_p = sorted_lp.exp()
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p.to(sorted_p.dtype).view(-1, 1)  # a mask: no sync
        score = torch.where(keep, sorted_lp + gumbel.gather(1, order), torch.full_like(sorted_lp, -float("inf")))
        drawn = order.gather(1, score.argmax(-1, keepdim=True)).view(-1)
    else:
        drawn = (logp + gumbel).argmax(-1)
    return torch.where(warm, drawn, greedy)

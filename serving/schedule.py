"""How many prompt tokens a step may prefill while rows are decoding: a budget sized from measured
step times, so a step that prefills takes at most ``slowdown`` times a decode-only step.

A step is one forward pass (``serving.kv``): one token for each decoding row, plus the prefilling
rows' next chunks. On a GPU, decode is bound by reading the weights, and a few hundred prompt
tokens ride along almost free. On a CPU, every token is compute: on 2 cores a SmolLM2 step with 4
decoding rows takes about 70 ms and each prompt token adds about 1.2 ms. A fixed token budget
is therefore either too small for one device or too large for the other. Sarathi-Serve
(Agrawal et al., OSDI 2024) sizes the budget from the latency target instead, and so does this:

    budget = (slowdown - 1) × decode_step_s / prompt_token_s

where ``decode_step_s`` is the median of the latest decode-only steps' wall times (each includes
the step's one device-to-host read), and ``prompt_token_s`` the largest of what one prompt token
added to each of the latest few steps that prefilled (beyond a decode step, per token). The median,
so that a one-off slow step (the KV cache growing, a collection) does not skew the decode time; the
largest, because a token's cost grows as its prompt gets longer (its attention reads the whole
prefix) and the budget should hold for the next step, not the average one. So steps that prefill
stay at or under the target, rather than around it.
The budget is capped by ``limits.prefill_chunk_tokens`` and never below
``floor`` tokens, so a prompt always advances. With no row decoding there is no latency to
protect, and a step prefills the whole cap. Until a step with prompt tokens has been measured, the
budget is ``floor`` (one cheap step, then measured).

Pure Python: no torch, no Ray, no I/O.
"""

from __future__ import annotations

import statistics
from collections import deque


class ChunkBudget:
    def __init__(self, cap: int, slowdown: float | None = 1.8, floor: int = 16, window: int = 16, recent: int = 6):
        if slowdown is not None and slowdown <= 1:
            raise ValueError(f"slowdown must be > 1 (got {slowdown})")
        self.cap, self.slowdown, self.floor = cap, slowdown, min(floor, cap)
        self._decode: deque[float] = deque(maxlen=window)  # decode-only steps' seconds
        self._token: deque[float] = deque(maxlen=recent)  # what one prompt token added to a step

    @property
    def decode_step_s(self) -> float | None:
        return statistics.median(self._decode) if self._decode else None

    @property
    def prompt_token_s(self) -> float | None:
        return max(self._token) if self._token else None

    def tokens(self, decoding: int) -> int:
        """The prompt tokens the next step may prefill, with ``decoding`` rows decoding in it."""
        if not decoding or self.slowdown is None:
            return self.cap
        decode, token = self.decode_step_s, self.prompt_token_s
        if decode is None or token is None:
            return self.floor
        budget = (self.slowdown - 1) * decode / max(token, 1e-9)
        return max(self.floor, min(self.cap, int(budget)))

    def observe(self, seconds: float, decoding: int, prompt_tokens: int) -> None:
        """Record one step: its wall time, its decoding rows and its prompt tokens."""
        if not decoding:
            return  # no decode step to compare against
        if not prompt_tokens:
            self._decode.append(seconds)
        elif self._decode:
            self._token.append(max(seconds - self.decode_step_s, 0.0) / prompt_tokens)

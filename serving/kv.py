"""A preallocated KV cache with per-row lengths, for iteration-level batching.

Each layer has one key and one value buffer ``[rows, kv_heads, capacity + 1, head_dim]`` on the
model's device. Row ``i``'s tokens sit in columns ``[0, length_i)`` of row ``i``. A forward
pass runs over a contiguous range of rows (a view, never a copy) and writes each row's new
tokens at that row's own next columns, so rows of any lengths decode together. A request that
joins takes the next free row; one that leaves hands its row to another, whose tokens alone are
copied (``swap``). Nothing copies the whole cache on a join or a leave; the buffers grow (by
doubling, within the byte limit the engine gives) only when more rows or a longer request arrive,
and are freed when the engine is idle.

A pass's rows are left-padded to the longest chunk, so every row's newest token is the pass's last
column (``logits_to_keep=1``); padding writes go to the spare last column, which no pass reads.
The engine passes its own additive 4D attention masks (``masks``): row ``i``'s query at position
``p`` sees columns ``j ≤ p`` (and ``j > p - window`` for sliding-window layers). The object
duck-types the ``update`` method of transformers' ``Cache``, which is all attention layers call.

Pure torch: no Ray, no I/O.
"""

from __future__ import annotations

import torch


class RowCache:
    def __init__(self, max_rows: int, max_tokens: int, device: torch.device, bytes_per_token: int):
        self.max_rows, self.max_tokens, self.device = max_rows, max_tokens, torch.device(device)
        self.bytes_per_token = bytes_per_token  # one row's token over every layer (an estimate before allocation)
        self.rows = 0  # rows allocated
        self.capacity = 0  # columns per row allocated (the spare column excluded)
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.lengths = [0] * max_rows  # host-side: no device read to know a row's length
        self._lo = self._hi = self._width = 0
        self._cols: torch.Tensor | None = None  # [rows, q] the columns this pass writes, on the device

    def bytes_for(self, rows: int, tokens: int) -> int:
        """The buffers' size once they hold ``rows`` rows of ``tokens`` tokens (they never shrink while in use)."""
        return max(rows, self.rows) * (max(tokens, self.capacity) + 1) * self.bytes_per_token

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    def reserve(self, rows: int, tokens: int, limit: float = float("inf")) -> None:
        """Make room for ``rows`` rows of ``tokens`` tokens. Grows by doubling while that stays within
        ``limit`` bytes, else to exactly what is asked; copies only when it grows."""
        if rows <= self.rows and tokens <= self.capacity:
            return
        if rows > self.max_rows or tokens > self.max_tokens:
            raise ValueError(f"{rows} rows of {tokens} tokens exceed the cache's {self.max_rows} × {self.max_tokens}")
        want_rows, want_tokens = max(rows, self.rows), max(tokens, self.capacity)
        new_rows = min(max(want_rows, 2 * self.rows if rows > self.rows else 0, 1), self.max_rows)
        new_tokens = min(max(want_tokens, 2 * self.capacity if tokens > self.capacity else 0, 64), self.max_tokens)
        if new_rows * (new_tokens + 1) * self.bytes_per_token > limit:
            new_rows, new_tokens = want_rows, want_tokens
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                if old is not None:
                    grown = old.new_zeros((new_rows, old.shape[1], new_tokens + 1, old.shape[3]))
                    grown[: self.rows, :, : self.capacity] = old[:, :, : self.capacity]
                    buffers[i] = grown
        self.rows, self.capacity = new_rows, new_tokens

    def release(self) -> None:
        """Free the buffers (no row may be in use)."""
        self.keys, self.values, self.rows, self.capacity = [], [], 0, 0
        self.lengths = [0] * self.max_rows

    # ------------------------------------------------------------------ one forward pass

    def begin(self, lo: int, hi: int, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepare a pass over rows ``[lo, hi)`` adding ``counts[i]`` tokens to row ``lo + i``, left-padded to
        the largest count. Returns the position ids ``[rows, q]`` and which of them are real tokens."""
        if not 0 <= lo < hi <= self.rows or len(counts) != hi - lo:
            raise ValueError(f"rows [{lo}, {hi}) with {len(counts)} counts outside the {self.rows} reserved")
        q = max(counts)
        host = torch.tensor([self.lengths[lo:hi], counts], dtype=torch.long).to(self.device, non_blocking=True)
        start, count = host[0], host[1]
        t = torch.arange(q, device=self.device)
        positions = start[:, None] + t[None, :] - (q - count)[:, None]
        real = t[None, :] >= (q - count)[:, None]
        self._lo, self._hi = lo, hi
        self._width = max(n + c for n, c in zip(self.lengths[lo:hi], counts))
        self._cols = torch.where(real, positions, self.capacity)  # padding → the spare column
        return positions.clamp(min=0), real

    def masks(
        self, positions: torch.Tensor, real: torch.Tensor, dtype: torch.dtype, window: int | None = None
    ) -> torch.Tensor:
        """The additive 4D mask ``[rows, 1, q, width]`` of the current pass: 0 where a query may look,
        the dtype's minimum elsewhere. Padding queries see column 0 only (their output is dropped)."""
        cols = torch.arange(self._width, device=self.device)[None, None, :]
        p = torch.where(real, positions, 0)[:, :, None]
        seen = cols <= p
        if window is not None:
            seen &= cols > p - window
        mask = torch.zeros(seen.shape, dtype=dtype, device=self.device)
        return mask.masked_fill_(~seen, torch.finfo(dtype).min)[:, None]

    def end(self, counts: list[int]) -> None:
        """The pass is over: each of its rows grew by its count."""
        for i, n in zip(range(self._lo, self._hi), counts):
            self.lengths[i] += n
        self._cols = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """What an attention layer calls: store the pass's keys and values; return the rows' columns so far."""
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer_idx] is None:
            _, heads, _, dim = key_states.shape
            shape = (self.rows, heads, self.capacity + 1, dim)
            self.keys[layer_idx] = torch.zeros(shape, dtype=key_states.dtype, device=self.device)
            self.values[layer_idx] = torch.zeros(shape, dtype=value_states.dtype, device=self.device)
        k = self.keys[layer_idx][self._lo : self._hi]
        v = self.values[layer_idx][self._lo : self._hi]
        n, heads, q, dim = key_states.shape
        idx = self._cols[:, None, :, None].expand(n, heads, q, dim)
        k.scatter_(2, idx, key_states.to(k.dtype))
        v.scatter_(2, idx, value_states.to(v.dtype))
        return k[:, :, : self._width], v[:, :, : self._width]

    # ------------------------------------------------------------------ rows

    def swap(self, a: int, b: int) -> None:
        """Exchange two rows; only their tokens are copied."""
        na, nb = self.lengths[a], self.lengths[b]
        for buffers in (self.keys, self.values):
            for t in buffers:
                if t is None:
                    continue
                keep = t[a, :, :na].clone()
                t[a, :, :nb] = t[b, :, :nb]
                t[b, :, :na] = keep
        self.lengths[a], self.lengths[b] = nb, na

    def clear(self, row: int) -> None:
        self.lengths[row] = 0

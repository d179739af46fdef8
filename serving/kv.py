"""A preallocated KV cache with per-row lengths, and the one forward pass per engine step.

Each layer has one key and one value buffer ``[rows, kv_heads, capacity, head_dim]`` on the
model's device. Row ``i``'s tokens sit in columns ``[0, length_i)`` of row ``i``. A request that
joins takes the next free row; one that leaves hands its row to another, whose tokens alone are
copied (``swap``). Nothing copies the whole cache on a join or a leave; the buffers grow (by
doubling, within the byte limit the engine gives) only when more rows or a longer request arrive,
and are freed when the engine is idle.

**One pass per step, every row in it** (``begin`` → the model → ``end``). The pass's tokens are
laid end to end in one sequence ``[1, T]``: first one token for each decoding row (rows
``0..m-1``), then each prefilling row's next chunk of its prompt. So the linear layers, which are
most of the work, run once over all ``T`` tokens, with no padding, and a prompt's chunk costs its
own tokens only, not another pass over the weights. Attention is the only part that needs the rows
apart: ``rows_attention`` (registered with transformers as ``ROWS_ATTENTION``) runs the decoding
rows as one batched SDPA over their cache rows (each query sees its row's columns up to its own
position) and each chunk as its own SDPA over its row's columns, causal from the chunk's start
(lower-right). Sliding-window layers get the window in both masks. ``update`` duck-types the one
method of transformers' ``Cache`` that attention layers call: it writes the pass's keys and values
at each token's row and column.

Pure torch: no Ray, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ROWS_ATTENTION = "raypeft_rows"


@dataclass
class Pass:
    """The layout of one forward pass (``RowCache.begin``); given to every attention layer."""

    feeds: list[tuple[int, int, int]]  # (row, start column, token count), in token order
    singles: int  # the first ``singles`` feeds are rows 0..singles-1 with one token each
    positions: torch.Tensor  # [1, T] each token's position (= its column in its row)
    token_rows: torch.Tensor  # [T] each token's row
    last: torch.Tensor  # [feeds] each feed's last token: the logits the step samples from
    width: int  # the columns the single-token rows read
    windows: list[int | None]  # each layer's sliding window (None: it attends to everything)
    cache: RowCache | None = None  # whose buffers the attention layers must receive
    decode_masks: dict[int | None, torch.Tensor] | None = None  # a uniform pass's masks, made before it (``begin``)
    _masks: dict = field(default_factory=dict)

    def singles_mask(self, window: int | None) -> torch.Tensor:
        """``[m, 1, 1, width]``: row ``i``'s query at position ``p`` sees columns ``j <= p`` (``> p - window``)."""
        if window not in self._masks:
            p = self.positions[0, : self.singles]
            self._masks[window] = _visible(p, self.width, window)[:, None, None, :]
        return self._masks[window]

    def chunk_mask(self, start: int, count: int, window: int | None, device) -> torch.Tensor | None:
        """``chunk_mask``, made once per pass (every layer asks for the same ones)."""
        key = (start, count, window)
        if key not in self._masks:
            self._masks[key] = chunk_mask(start, count, window, device)
        return self._masks[key]


def chunk_mask(start: int, count: int, window: int | None, device) -> torch.Tensor | None:
    """``[1, 1, count, start + count]``: a chunk's queries at positions ``start..`` over its row's columns,
    causal (lower-right) and within the window; None where plain causal attention is the same."""
    if not start and window is None:
        return None
    return _visible(torch.arange(start, start + count, device=device), start + count, window)[None, None]


def _visible(positions: torch.Tensor, width: int, window: int | None) -> torch.Tensor:
    """``[queries, width]``: a query at position ``p`` sees columns ``j <= p`` (and ``j > p - window``)."""
    q = positions[:, None]
    cols = torch.arange(width, device=positions.device)[None, :]
    seen = cols <= q
    if window is not None:
        seen &= cols > q - window
    return seen


def rows_attention(module, query, key, value, attention_mask=None, rows_pass: Pass | None = None, **kwargs):
    """An ``AttentionInterface`` function for ``RowCache`` passes (see the module docstring). ``query`` is
    ``[1, heads, T, dim]``; ``key``/``value`` are the layer's whole cache buffers. Returns ``[1, T, heads, dim]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if rows_pass is None:
        raise ValueError("rows_attention runs only inside an engine pass (RowCache.begin)")
    p = rows_pass
    if p.cache is not None and key is not p.cache.keys[module.layer_idx]:
        raise RuntimeError("rows_attention got keys that are not the engine's RowCache (was the cache passed?)")
    kwargs.pop("is_causal", None)
    kwargs.pop("sliding_window", None)  # the pass's own per-layer windows apply
    window = p.windows[module.layer_idx]
    if p.decode_masks is not None:  # every row one token: sizes read off tensors only (one compiled structure)
        mask = p.decode_masks[window]  # [rows, 1, 1, width]
        rows, width = query.shape[2], mask.shape[-1]
        q = query[0].transpose(0, 1).unsqueeze(2)  # [rows, heads, 1, dim]
        k, v = key[:rows, :, :width], value[:rows, :, :width]
        out = sdpa_attention_forward(module, q, k, v, mask, is_causal=False, **kwargs)[0]
        return out.transpose(0, 1), None
    outs = []
    m = p.singles
    if m:
        q = query[0, :, :m].transpose(0, 1).unsqueeze(2)  # [m, heads, 1, dim]
        k, v = key[:m, :, : p.width], value[:m, :, : p.width]
        out = sdpa_attention_forward(module, q, k, v, p.singles_mask(window), is_causal=False, **kwargs)[0]
        outs.append(out.transpose(0, 1))  # [m, 1, heads, dim] → [1, m, heads, dim]
    t = m
    for row, start, count in p.feeds[m:]:
        q = query[:, :, t : t + count]
        k, v = key[row : row + 1, :, : start + count], value[row : row + 1, :, : start + count]
        mask = p.chunk_mask(start, count, window, query.device)
        outs.append(sdpa_attention_forward(module, q, k, v, mask, is_causal=mask is None, **kwargs)[0])
        t += count
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ROWS_ATTENTION, rows_attention)


class RowCache:
    def __init__(self, max_rows: int, max_tokens: int, device: torch.device, bytes_per_token: int):
        self.max_rows, self.max_tokens, self.device = max_rows, max_tokens, torch.device(device)
        self.bytes_per_token = bytes_per_token  # one row's token over every layer (an estimate before allocation)
        self.rows = 0  # rows allocated
        self.capacity = 0  # columns per row allocated
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.lengths = [0] * max_rows  # host-side: no device read to know a row's length
        self._pass: Pass | None = None

    def bytes_for(self, rows: int, tokens: int) -> int:
        """The buffers' size once they hold ``rows`` rows of ``tokens`` tokens (they never shrink while in use)."""
        return max(rows, self.rows) * max(tokens, self.capacity) * self.bytes_per_token

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
        if new_rows * new_tokens * self.bytes_per_token > limit:
            new_rows, new_tokens = want_rows, want_tokens
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):
                if old is not None:
                    grown = old.new_zeros((new_rows, old.shape[1], new_tokens, old.shape[3]))
                    grown[: self.rows, :, : self.capacity] = old[:, :, : self.capacity]
                    buffers[i] = grown
        self.rows, self.capacity = new_rows, new_tokens

    def release(self) -> None:
        """Free the buffers (no row may be in use)."""
        self.keys, self.values, self.rows, self.capacity = [], [], 0, 0
        self.lengths = [0] * self.max_rows

    # ------------------------------------------------------------------ one forward pass

    def begin(self, feeds: list[tuple[int, int]], windows: list[int | None], uniform: bool = False) -> Pass:
        """Prepare a pass that adds ``count`` tokens to each ``(row, count)`` of ``feeds``, in that token
        order (the decoding rows ``0..m-1`` with one token each first, see the module docstring).
        ``uniform``: a decode-only pass (rows ``0..m-1``, one token each) whose masks are made here, so the
        attention layers read nothing but tensors (``rows_attention``; the engine's compiled step)."""
        starts = [self.lengths[row] for row, _ in feeds]
        for (row, count), start in zip(feeds, starts):
            if not 0 <= row < self.rows or count < 1 or start + count > self.capacity:
                raise ValueError(f"row {row} + {count} tokens outside the {self.rows} × {self.capacity} reserved")
        singles = 0
        while singles < len(feeds) and feeds[singles] == (singles, 1):
            singles += 1
        positions, rows, last, t = [], [], [], 0
        for (row, count), start in zip(feeds, starts):
            positions += range(start, start + count)
            rows += [row] * count
            t += count
            last.append(t - 1)
        host = torch.tensor(positions + rows + last, dtype=torch.long)  # one copy to the device per pass
        dev = host.to(self.device, non_blocking=True)
        self._pass = Pass(
            feeds=[(row, start, count) for (row, count), start in zip(feeds, starts)],
            singles=singles,
            positions=dev[:t].view(1, t),
            token_rows=dev[t : 2 * t],
            last=dev[2 * t :],
            width=max(starts[:singles], default=-1) + 1,
            windows=windows,
            cache=self,
        )
        if uniform:
            if singles != len(feeds):
                raise ValueError("a uniform pass takes one token for each of rows 0..m-1")
            self._pass.decode_masks = {w: self._pass.singles_mask(w) for w in set(windows)}
        return self._pass

    def end(self) -> None:
        """The pass is over: each of its rows grew by its count."""
        for row, _, count in self._pass.feeds:
            self.lengths[row] += count
        self._pass = None

    def abort(self) -> None:
        """The pass failed: no row grew (what it wrote past the rows' lengths is never read)."""
        self._pass = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """What an attention layer calls: store the pass's keys and values ``[1, kv_heads, T, dim]`` at each
        token's row and column; return the layer's whole buffers (``rows_attention`` reads its rows)."""
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer_idx] is None:
            _, heads, _, dim = key_states.shape
            shape = (self.rows, heads, self.capacity, dim)
            self.keys[layer_idx] = torch.zeros(shape, dtype=key_states.dtype, device=self.device)
            self.values[layer_idx] = torch.zeros(shape, dtype=value_states.dtype, device=self.device)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        p = self._pass
        where = (p.token_rows, slice(None), p.positions[0])
        k[where] = key_states[0].transpose(0, 1).to(k.dtype)  # [T, kv_heads, dim] into [rows, heads, cols, dim]
        v[where] = value_states[0].transpose(0, 1).to(v.dtype)
        return k, v

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

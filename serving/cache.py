"""The adapter cache's two tiers, as pure bookkeeping (no torch, no I/O).

* ``LRU``: the CPU tier. Adapter tensors read from disk or the registry, bounded by a
  count and by bytes; least recently used first out.
* ``SlotTable``: the active tier. The model has ``n`` slots (slot 0 is the bare base);
  each adapter in use sits in one. A slot is pinned while requests that use it are
  running, and only unpinned slots are evicted.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0


class LRU:
    """Least-recently-used map bounded by entry count and total bytes."""

    def __init__(self, max_items: int, max_bytes: int):
        if max_items < 1 or max_bytes < 1:
            raise ValueError(f"cache bounds must be positive (got {max_items} items, {max_bytes} bytes)")
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.stats = Counters()

    def __contains__(self, key) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def keys(self) -> list:
        return list(self._items)

    def get(self, key):
        if key not in self._items:
            self.stats.misses += 1
            return None
        self._items.move_to_end(key)
        self.stats.hits += 1
        return self._items[key][0]

    def put(self, key, value, nbytes: int) -> list:
        """Insert (or refresh) ``key``; returns the keys evicted to make room. An entry larger than
        ``max_bytes`` is still kept, alone: refusing it would make that adapter unservable."""
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        self.stats.loads += 1
        evicted = []
        while len(self._items) > 1 and (len(self._items) > self.max_items or self.bytes > self.max_bytes):
            old, (_, size) = self._items.popitem(last=False)
            self.bytes -= size
            evicted.append(old)
            self.stats.evictions += 1
        return evicted

    def pop(self, key) -> None:
        if key in self._items:
            self.bytes -= self._items.pop(key)[1]


@dataclass
class SlotTable:
    """Which adapter sits in which model slot (1..n-1), with pins and LRU order."""

    n: int
    slot_of: OrderedDict[str, int] = field(default_factory=OrderedDict)
    pins: dict[str, int] = field(default_factory=dict)
    stats: Counters = field(default_factory=Counters)

    def __post_init__(self):
        if self.n < 2:
            raise ValueError(f"need at least 2 slots (slot 0 is the base) (got {self.n})")

    def acquire(self, name: str) -> tuple[int, str | None, bool] | None:
        """Pin a slot for ``name``. Returns (slot, evicted adapter or None, needs_load), or None when
        every slot is pinned by running requests (the caller waits)."""
        if name in self.slot_of:
            self.slot_of.move_to_end(name)
            self.pins[name] = self.pins.get(name, 0) + 1
            self.stats.hits += 1
            return self.slot_of[name], None, False
        used = set(self.slot_of.values())
        free = [s for s in range(1, self.n) if s not in used]
        evicted = None
        if free:
            slot = free[0]
        else:
            victim = next((a for a in self.slot_of if not self.pins.get(a)), None)
            if victim is None:
                return None
            slot = self.slot_of.pop(victim)
            self.pins.pop(victim, None)
            evicted = victim
            self.stats.evictions += 1
        self.slot_of[name] = slot
        self.pins[name] = 1
        self.stats.misses += 1
        self.stats.loads += 1
        return slot, evicted, True

    def release(self, name: str) -> None:
        if self.pins.get(name):
            self.pins[name] -= 1

    def forget(self, name: str) -> None:
        """Drop ``name`` (its load failed, or its alias moved): the slot becomes free."""
        self.slot_of.pop(name, None)
        self.pins.pop(name, None)

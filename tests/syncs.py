"""Count device-to-host syncs on a CPU, where nothing waits: every way a tensor's values reach Python.

On a GPU these calls block the host until the device catches up (``torch.cuda.set_sync_debug_mode``
reports them there). On the CPU they cost nothing, so a sync added to a hot path would go unseen; this
counts them instead, by name:

* ``Tensor.tolist``, ``item``, ``numpy``, ``__bool__``, ``__int__``, ``__float__``, ``__index__``;
* ops whose output shape depends on the values (``nonzero``, ``masked_select``, boolean indexing,
  ``unique``, ``repeat_interleave`` with a tensor of repeats), through a dispatch mode.
"""

from __future__ import annotations

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_METHODS = ("tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__")
_DATA_DEPENDENT = {"nonzero", "masked_select", "unique", "_unique2", "unique_consecutive", "repeat_interleave"}


class _Ops(TorchDispatchMode):
    supports_higher_order_operators = True  # FlexAttention is one: it runs, and the ops inside it are seen

    def __init__(self, counts: collections.Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not hasattr(func, "overloadpacket"):  # a higher-order operator
            return func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ()
        )
        if name in _DATA_DEPENDENT or bool_index:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_syncs():
    """``with count_syncs() as counts:`` … ``counts`` maps each kind of sync to how often it happened."""
    counts: collections.Counter = collections.Counter()
    saved = {m: getattr(torch.Tensor, m) for m in _METHODS}

    def counted(name):
        original = saved[name]

        def method(self, *a, **k):
            counts[name] += 1
            return original(self, *a, **k)

        return method

    try:
        for m in _METHODS:
            setattr(torch.Tensor, m, counted(m))
        with _Ops(counts):
            yield counts
    finally:
        for m, f in saved.items():
            setattr(torch.Tensor, m, f)

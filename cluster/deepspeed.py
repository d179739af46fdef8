"""DeepSpeed ZeRO presets and the config derived from a job's own settings. Pure: no Ray, no torch.

Users pick a *strategy* (``ddp``, ``zero1``, ``zero2``, ``zero2_offload``, ``zero3``,
``zero3_offload``), not a hand-written DeepSpeed JSON. Everything DeepSpeed also
needs to know about the job (micro batch, accumulation, world size, clipping,
precision) is passed in from the one place it is defined, so no value is written
twice. ``overrides`` are deep-merged last; keys that the job already defines are
refused (``override_problems``), so the spec stays the single source of truth.

    ds_config("zero2", micro_batch_size=8, grad_accum=1, world_size=2, max_grad_norm=1.0, dtype="float32")
"""

from __future__ import annotations

import copy
import functools
from typing import Any

#: ZeRO section of each named preset (``ddp`` runs without DeepSpeed).
PRESETS: dict[str, dict[str, Any] | None] = {
    "ddp": None,
    "zero1": {"stage": 1},
    "zero2": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True},
    "zero2_offload": {
        "stage": 2,
        "contiguous_gradients": True,
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
    },
    "zero3": {
        "stage": 3,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "stage3_gather_16bit_weights_on_model_save": False,
    },
    "zero3_offload": {
        "stage": 3,
        "contiguous_gradients": True,
        "offload_optimizer": {"device": "cpu", "pin_memory": False},
        "offload_param": {"device": "cpu", "pin_memory": False},
    },
}

STRATEGIES = tuple(PRESETS)

#: Keys derived from the job spec; an override may not set them (they have one home: the spec).
DERIVED_KEYS = {
    "train_batch_size": "train.global_batch_size / micro_batch_size × grad_accum × num_workers",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum (or train.global_batch_size)",
    "gradient_clipping": "train.max_grad_norm",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "optimizer": "method.name (the method builds the optimizer)",
    "scheduler": "train.scheduler",
    "zero_optimization.stage": "scaling.strategy",
}


def zero_stage(strategy: str) -> int:
    """ZeRO stage of a strategy (0 = plain DDP, no DeepSpeed)."""
    preset = PRESETS[strategy]
    return 0 if preset is None else int(preset["stage"])


def offloads(strategy: str, overrides: dict[str, Any] | None = None) -> dict[str, bool]:
    """Which states a strategy (plus overrides) keeps on the CPU: ``optimizer`` / ``params``."""
    zero = (ds_config(strategy, 1, 1, 1, 0.0, "float32", overrides) or {}).get("zero_optimization", {})
    dev = lambda k: (zero.get(k) or {}).get("device", "none") not in (None, "none")  # noqa: E731
    return {"optimizer": dev("offload_optimizer"), "params": dev("offload_param")}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Recursively merge ``extra`` into a copy of ``base`` (``extra`` wins)."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def override_problems(overrides: dict[str, Any]) -> list[tuple[str, str]]:
    """(dotted key, message) for every override key that the job spec already defines."""
    out = []
    for key, home in DERIVED_KEYS.items():
        node: Any = overrides
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            out.append((key, f"comes from {home}; set it there, not in the DeepSpeed overrides (got {node!r})"))
    return out


_ZERO_CHECK = """
import json, sys
from pydantic import ValidationError
from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
try:
    DeepSpeedZeroConfig(**json.loads(sys.stdin.read()))
    print("[]")
except ValidationError as e:
    print(json.dumps([[".".join(map(str, x["loc"])), x["msg"], repr(x.get("input"))[:80]] for x in e.errors()]))
"""


def zero_problems(zero: dict[str, Any]) -> list[tuple[str, str]]:
    """See ``_zero_problems``; asked once per distinct ``zero`` per process (a sweep validates many trials)."""
    import json

    return list(_zero_problems(json.dumps(zero, sort_keys=True, default=str)))


@functools.lru_cache(maxsize=64)
def _zero_problems(zero_json: str) -> tuple[tuple[str, str], ...]:
    """``zero_optimization`` overrides checked by DeepSpeed's own parser (``DeepSpeedZeroConfig``): unknown
    keys, wrong types, out-of-range values. It runs in a short subprocess, so the driver never imports
    DeepSpeed (~4 s, only when there are such overrides)."""
    import json
    import subprocess
    import sys

    try:
        proc = subprocess.run(
            [sys.executable, "-c", _ZERO_CHECK], input=zero_json, capture_output=True, text=True, timeout=300
        )
    except subprocess.TimeoutExpired:
        return (("zero_optimization", "DeepSpeed's config parser did not answer in 300 s (got a timeout)"),)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return (("zero_optimization", f"DeepSpeed could not check these overrides: {proc.stderr.strip()[-300:]}"),)
    return tuple((f"zero_optimization.{loc}", f"{msg} (got {got})") for loc, msg, got in json.loads(lines[-1]))


def ds_config(
    strategy: str,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    max_grad_norm: float,
    dtype: str,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The DeepSpeed config for ``strategy``, or None for ``ddp``.

    Args:
        strategy: one of ``STRATEGIES``.
        micro_batch_size: examples per worker per forward pass.
        grad_accum: micro-batches per optimizer step.
        world_size: data-parallel workers.
        max_grad_norm: gradient clipping norm (0 disables).
        dtype: ``float32``, ``bfloat16`` or ``float16``: the precision of the trained weights.
        overrides: deep-merged into the result (see ``override_problems``).

    Raises:
        KeyError: unknown strategy.
    """
    preset = PRESETS[strategy]
    if preset is None:
        return None
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": float(max_grad_norm),
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "zero_optimization": copy.deepcopy(preset),
        # the method builds the optimizer (AdamW, LoRA+ groups); DeepSpeed wraps it as is
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return deep_merge(cfg, overrides or {})

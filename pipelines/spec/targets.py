"""Which modules a spec names: PEFT's two matching rules, implemented once.

* ``target_modules`` (``is_target``): a string is a regex that must match the *whole* module name;
  a list names module-name suffixes (``q_proj`` matches ``model.layers.0.self_attn.q_proj``).
  ``all-linear`` is resolved by PEFT against the model and is not a pattern.
* ``rank_pattern`` / ``alpha_pattern`` / ``model.quantization_plan`` keys (``pattern_key``): a regex that
  must match the *end* of the module name at a dot boundary; the first key that matches wins
  (PEFT's ``get_pattern_key``; tested against it).

Pure: no torch, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TypeVar

V = TypeVar("V")
Target = str | list[str] | tuple[str, ...]
ALL_LINEAR = "all-linear"


def is_target(target: Target, name: str) -> bool:
    """PEFT's ``target_modules`` rule for one linear's name; ``all-linear`` is every linear but the output layer."""
    if target == ALL_LINEAR:
        return name.rsplit(".", 1)[-1] != "lm_head"
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def target_matches(target: Target, names: Iterable[str]) -> dict[str, int]:
    """How many of ``names`` each ``target_modules`` entry matches (empty for ``all-linear``, which PEFT
    resolves against the model's linears)."""
    names = list(names)
    if isinstance(target, str):
        return {} if target == ALL_LINEAR else {target: sum(is_target(target, n) for n in names)}
    return {t: sum(is_target([t], n) for n in names) for t in target}


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first pattern matching the end of module ``name`` (PEFT's ``rank_pattern`` rule), or None."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def pattern_value(patterns: Mapping[str, V], name: str, default: V) -> V:
    """``patterns[key]`` for the first key matching ``name`` (``pattern_key``), else ``default``."""
    key = pattern_key(patterns, name)
    return default if key is None else patterns[key]


def missing_targets_message(missing: list[str], names: list[str], what: str = "module") -> str:
    """What a pre-flight says of ``target_modules`` entries that matched none of the base's ``names``."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names if n})
    return f"{missing!r} matched no {what} of the base; its {what}s end in: {', '.join(suffixes[:40])}"

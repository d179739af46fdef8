"""Base fidelity: an adapter is served on the base it was trained on, or refused.

Every adapter raypeft writes carries ``raypeft.json``, which records how training loaded its
base: the model id, the quantization, double quantization and the per-layer plan
(``pipelines.lifecycle.adapters.adapter_meta``). The served base is described by the serving spec's
``model`` section, or taken whole from one adapter's record (``model.from_adapter``).

* ``fidelity_problems(spec)``: at start (exit 2, before Ray starts), the served base against every
  adapter configured up front as a local directory, naming the field that differs.
* ``difference(record, served)``: at request time, for adapters that arrive later (a root lookup,
  a registry alias that moved): the HTTP layer answers 409 with it, on that adapter's requests only.

Adapters without ``raypeft.json`` (trained elsewhere) carry no record and are served as they are.
dtypes are not compared: serving a float32-trained adapter in bfloat16 on a GPU is the norm.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipelines.spec import Problem, quote

FIELDS = ("base", "quantization", "double_quant", "quantization_plan")


def record_of(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """The base an adapter was trained on, from its ``raypeft.json`` ({} without one)."""
    f = Path(adapter_dir) / "raypeft.json"
    if not f.is_file():
        return {}
    meta = json.loads(f.read_text())
    return {
        "base": meta.get("base"),
        "quantization": meta.get("quantization", "none"),
        "double_quant": meta.get("double_quant", True),
        "quantization_plan": {k: int(v) for k, v in (meta.get("quantization_plan") or {}).items()},
    }


def served(model) -> dict[str, Any]:
    """The record of a serving spec's ``model`` section (without ``from_adapter``)."""
    return {
        "base": model.base,
        "quantization": model.quantization,
        "double_quant": model.double_quant,
        "quantization_plan": dict(model.quantization_plan),
    }


def served_record(spec, resolve=None) -> dict[str, Any]:
    """What the replicas load: ``model.from_adapter``'s record, or the ``model`` section itself.
    ``resolve(name) -> directory`` reads a registry source (``serving.sources``); local sources need none."""
    m = spec.model
    if m.from_adapter is None:
        return served(m)
    src = spec.adapters[m.from_adapter]
    path = src if "://" not in src and not src.startswith("models:/") else resolve(m.from_adapter)
    return record_of(os.path.expanduser(path))


def _same_base(a: str | None, b: str | None) -> bool:
    if a == b:
        return True
    pa, pb = (Path(os.path.expanduser(x)) if x else None for x in (a, b))
    return bool(pa and pb and pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def difference(record: dict[str, Any], base: dict[str, Any]) -> str | None:
    """None when the adapter's record agrees with the served base (or it has none); else what differs."""
    if not record:
        return None
    diffs = []
    for field in FIELDS:
        trained, serving = record.get(field), base.get(field)
        if field == "base" and _same_base(trained, serving):
            continue
        if field == "double_quant" and "nf4" not in (record.get("quantization"), base.get("quantization")):
            continue  # only NF4 has quantization constants to quantize
        if trained != serving:
            diffs.append(f"model.{field} was {trained!r} in training, {serving!r} here")
    return "; ".join(diffs) or None


def compile_problems(base: dict[str, Any]) -> list[Problem]:
    """``limits.compile_decode`` over a bitsandbytes base is refused (not tried under ``torch.compile``)."""
    got = base.get("quantization", "none")
    if got == "none" and base.get("quantization_plan"):
        got = "a quantization_plan"
    if got == "none":
        return []
    return [("limits.compile_decode", f"not supported over a bitsandbytes base (model quantization: {quote(got)})")]


def fidelity_problems(spec) -> list[Problem]:
    """``from_adapter`` is well formed, and every adapter configured as a local directory was trained on the
    served base (registry sources are checked when first used: 409)."""
    m, out = spec.model, []
    if m.from_adapter is not None:
        src = spec.adapters.get(m.from_adapter)
        clash = sorted(m.model_fields_set & set(FIELDS))
        if src is None:
            out.append(("model.from_adapter", f"not a name in `adapters` (got {quote(m.from_adapter)})"))
        elif src.startswith("models:/") and "@" in src:
            out.append(("model.from_adapter", f"pin a version (models:/name/N), not an alias (got {quote(src)})"))
        elif "://" in src:
            out.append(("model.from_adapter", f"needs a local directory or models:/name/N source (got {quote(src)})"))
        elif not src.startswith("models:/") and not record_of(os.path.expanduser(src)):
            out.append(("model.from_adapter", f"adapter has no raypeft.json to take the base from (got {quote(src)})"))
        if clash:
            out.append(("model.from_adapter", f"set either from_adapter or {', '.join('model.' + c for c in clash)}"))
        if m.name is None:
            out.append(("model.name", "set the name clients use for the base when it comes from model.from_adapter"))
        if out or src.startswith("models:/"):
            return out
    base = served_record(spec)
    if spec.limits.compile_decode:
        out += compile_problems(base)
    for name, src in spec.adapters.items():
        if src.startswith("models:/") or "://" in src:
            continue
        path = Path(os.path.expanduser(src))
        if (path / "adapter_config.json").is_file():
            diff = difference(record_of(path), base)
            if diff:
                out.append((f"adapters.{name}", f"trained on another base: {diff} (got {quote(src)})"))
    return out

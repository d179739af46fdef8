"""Where a job's files live: raypeft's home (``$RAYPEFT_HOME``), a job's storage root (``checkpoint.storage``,
default ``$RAYPEFT_HOME/runs``), and the names of what a checkpoint and an adapter directory hold. The driver (``pipelines.train.driver``), data preparation (``pipelines.data.prepare``),
the worker's engines and the tuner read them here, so none of them imports another for a path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec.job import JobSpec

ADAPTER_DIR = "adapter"  # the standard PEFT directory inside each checkpoint
PROBE_FILE = "probe.pt"  # a checkpoint's probe: input ids and the logits they gave at that step
META_FILE = "raypeft.json"  # in an adapter directory: how its base was loaded (``adapter_meta``)


def raypeft_home() -> Path:
    return Path(os.environ.get("RAYPEFT_HOME", Path.home() / ".raypeft")).expanduser().resolve()


def storage_dir(spec: JobSpec) -> str:
    """The root a job's runs are kept under: ``checkpoint.storage`` (a URL as it is, a local path absolute),
    else ``$RAYPEFT_HOME/runs``."""
    if spec.checkpoint.storage is None:
        return str(raypeft_home() / "runs")
    s = spec.checkpoint.storage
    return s if "://" in s else str(Path(os.path.expanduser(s)).resolve())


def adapter_meta(spec) -> dict[str, Any]:
    """What ``raypeft.json`` records for an adapter trained from ``spec``."""
    return {
        "base": spec.model.base,
        "revision": spec.model.revision,
        "quantization": spec.quantization(),
        "double_quant": spec.model.double_quant,
        "dtype": spec.model.dtype,
        "compute_dtype": spec.model.compute_dtype,
        "quantization_plan": dict(spec.model.quantization_plan),
        "method": spec.method.name,
        "job": spec.name,
    }


def read_meta(adapter_dir: Path) -> dict[str, Any]:
    f = Path(adapter_dir) / META_FILE
    return json.loads(f.read_text()) if f.is_file() else {}

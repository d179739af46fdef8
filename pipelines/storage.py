"""Where a job's files live: its storage root (``checkpoint.storage``, default ``$RAYPEFT_HOME/runs``), and the
names of what a checkpoint holds. The driver (``pipelines.train``), data preparation (``pipelines.prepare``),
the worker's engines and the tuner read them here, so none of them imports another for a path."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import JobSpec

ADAPTER_DIR = "adapter"  # the standard PEFT directory inside each checkpoint
PROBE_FILE = "probe.pt"  # a checkpoint's probe: input ids and the logits they gave at that step


def storage_dir(spec: JobSpec) -> str:
    """The root a job's runs are kept under: ``checkpoint.storage`` (a URL as it is, a local path absolute),
    else ``$RAYPEFT_HOME/runs``."""
    from pipelines.tracking import raypeft_home

    if spec.checkpoint.storage is None:
        return str(raypeft_home() / "runs")
    s = spec.checkpoint.storage
    return s if "://" in s else str(Path(os.path.expanduser(s)).resolve())

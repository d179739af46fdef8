"""Running one side of a benchmark in a fresh process, as every benchmark here does."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_child(module: str, side: str, argv: list[str], env: dict[str, str] | None = None) -> dict:
    """``python -m module --child side argv…`` in a fresh interpreter; its last stdout line, parsed as JSON.
    A child that fails stops the benchmark with the end of its stderr."""
    cmd = [sys.executable, "-m", module, "--child", side, *argv]
    environ = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    out = subprocess.run(cmd, capture_output=True, text=True, env=environ)
    if out.returncode != 0:
        raise SystemExit(f"{side} run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])

"""``raypeft serve`` with a bad serving spec or bad overrides: exit 2, every problem named, before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

RAYPEFT = str(Path(sys.executable).parent / "raypeft")
DEMO = "serving/configs/demo.yaml"


@pytest.mark.parametrize(
    ("spec", "overrides", "says"),
    [
        (DEMO, ["limits.max_batch_size=0"], ["limits.max_batch_size", "greater than 0"]),
        (DEMO, ["limits.nope=1"], ["limits.nope"]),
        (DEMO, ["deployment.port=http"], ["deployment.port", "'http'"]),
        (DEMO, ["limits.max_kv_bytes=-5", "limits.prefill_chunk_tokens=0"], ["max_kv_bytes", "prefill_chunk_tokens"]),
        (DEMO, ["model.from_adapter=nope"], ["model.from_adapter", "not a name in `adapters`"]),
        (DEMO, ["cache.max_rank=0", "tenants.acme.key_env=RAYPEFT_TEST_UNSET"], ["cache.max_rank", "tenants.acme"]),
        (
            DEMO,
            ["limits.compile_decode=true", "model.quantization=nf4"],
            ["limits.compile_decode", "bitsandbytes", "'nf4'"],
        ),
        (DEMO, ["limits.compile_decode=sometimes"], ["limits.compile_decode", "'sometimes'"]),
        ("no/such/serve.yaml", [], ["no/such/serve.yaml"]),
        ("BAD_YAML", [], ["adapters"]),
    ],
)
def test_bad_serving_input_exits_2_before_ray_starts(tmp_path, spec, overrides, says):
    if spec == "BAD_YAML":
        spec = tmp_path / "serve.yaml"
        spec.write_text("adapters: [not, a, mapping]\nunknown_section: 1\n")
    out = subprocess.run([RAYPEFT, "serve", str(spec), *overrides], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    for fragment in says:
        assert fragment in out.stderr, (fragment, out.stderr[-2000:])
    assert "Started a local Ray" not in out.stderr and "Traceback" not in out.stderr

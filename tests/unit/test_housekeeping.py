"""The suite's time budget (pure logic) and commands that print no notice they have no reason to print."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, over_budget

BIN = Path(sys.executable).parent


def test_over_budget_uses_the_tier_unless_an_exception_names_the_test():
    tiers = {"unit": 20.0, "integration": 120.0}
    exceptions = [("tests/integration/test_x.py::test_long", 300.0)]
    durations = {
        "tests/unit/test_a.py::test_quick": 19.9,
        "tests/unit/test_a.py::test_slow": 21.0,
        "tests/integration/test_x.py::test_long[zero2]": 250.0,  # within its named exception
        "tests/integration/test_x.py::test_long[zero3]": 301.0,
        "tests/integration/test_y.py::test_other": 121.0,
    }
    late = over_budget(durations, tiers, exceptions)
    assert [(n, b) for n, _, b in late] == [
        ("tests/integration/test_x.py::test_long[zero3]", 300.0),
        ("tests/integration/test_y.py::test_other", 120.0),
        ("tests/unit/test_a.py::test_slow", 20.0),
    ]


def test_the_named_exceptions_name_tests_that_exist(request):
    from tests.conftest import budgets

    tiers, exceptions = budgets(request.config)
    assert len(exceptions) <= 10, "the exceptions are a short list"
    for prefix, seconds in exceptions:
        path = REPO / prefix.split("::")[0]
        assert path.is_file(), prefix
        assert f"def {prefix.split('::')[1].split('[')[0]}(" in path.read_text(), prefix
        tier = "integration" if prefix.startswith("tests/integration/") else "unit"
        assert seconds > tiers[tier], f"{prefix}: an exception must allow more than the tier's {tiers[tier]:.0f} s"


@pytest.mark.parametrize("args", [("--help",), ("plan", "--help"), ("validate", "pipelines/configs/demo.yaml")])
def test_a_command_that_quantizes_nothing_prints_no_kernel_or_deprecation_notice(args):
    proc = subprocess.run([str(BIN / "raypeft"), *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "kernels-community" not in proc.stdout + proc.stderr
    assert "gemm_4bit" not in proc.stdout + proc.stderr
    assert "Warning" not in proc.stdout + proc.stderr  # nor a library's deprecation notice

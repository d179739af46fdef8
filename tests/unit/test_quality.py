"""The codebase keeps its shape: import layering, lint and format, a thin CLI, no private cross-package imports."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

BIN = Path(sys.executable).parent
PACKAGES = ("pipelines", "cluster", "tuning", "serving", "raypeft")


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "cmd",
    [("lint-imports",), ("ruff", "check", "."), ("ruff", "format", "--check", ".")],
    ids=["lint-imports", "ruff-check", "ruff-format"],
)
def test_tool_passes(cmd):
    r = _run(str(BIN / cmd[0]), *cmd[1:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_the_cli_is_a_thin_face():
    assert len((REPO / "raypeft/cli.py").read_text().splitlines()) <= 200


def test_no_package_imports_another_packages_private_names():
    offenders = []
    pattern = re.compile(r"^\s*from (\w+)(\.[\w.]+)? import ([^\n]+)", re.M)
    for pkg in PACKAGES:
        for f in (REPO / pkg).rglob("*.py"):
            for m in pattern.finditer(f.read_text()):
                other, names = m.group(1), m.group(3)
                if other in PACKAGES and other != pkg and re.search(r"(^|[\s,(])_\w", names):
                    offenders.append(f"{f.relative_to(REPO)}: {m.group(0).strip()}")
    assert not offenders, offenders

"""The docs stay true: the reference pages are the generated ones, the site builds strictly,
the quickstart commands exist, and the README stays short."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_generated_reference_pages_are_current():
    from tests.update_docs import pages

    for path, text in pages().items():
        rel = path.relative_to(REPO)
        assert path.exists(), f"{rel} is missing: run .venv/bin/python tests/update_docs.py"
        assert path.read_text() == text, f"{rel} is stale: run .venv/bin/python tests/update_docs.py"


def test_mkdocs_builds_strict(tmp_path):
    """A broken link, a page missing from the nav or a bad anchor fails the build.
    (No -q: mkdocs 1.6 with -q drops warnings before --strict counts them, and passes.)"""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(REPO / "mkdocs.yml"),
            "-d",
            str(tmp_path / "site"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert r.returncode == 0, f"mkdocs build --strict failed:\n{r.stdout}\n{r.stderr}"


def test_readme_is_at_most_15_kb():
    size = len((REPO / "README.md").read_bytes())
    assert size <= 15_000, f"README.md is {size} bytes; move detail into docs/"


def test_quickstart_commands_exist_and_ci_runs_the_readme_test_command():
    readme = _readme()
    quick = readme.split("## Quickstart", 1)[1].split("##", 1)[0]
    assert "make demo" in quick and "make test" in quick
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo: install\n\t\$\(VENV\)/bin/raypeft train pipelines/configs/demo.yaml$", makefile, re.M)
    test_cmd = re.search(r"^test: install\n\t(.+)$", makefile, re.M).group(1)
    assert test_cmd.replace("$(PY)", ".venv/bin/python") in readme  # README documents the exact command
    ci = (REPO / ".ci" / "run").read_text()
    assert "make install" in ci and "make test" in ci


def test_docs_show_a_real_bad_spec_error():
    """The error example in docs/training.md is what the validator really prints."""
    from pipelines.spec import SpecError, apply_overrides, read_yaml, validate

    page = (REPO / "docs" / "training.md").read_text()
    raw = apply_overrides(
        read_yaml(REPO / "pipelines/configs/demo.yaml"),
        ["method.r=-4", "train.lr=fast", "method.name=qlora", "model.quantization=none"],
    )
    try:
        validate(raw, base_dir=REPO)
    except SpecError as e:
        for line in str(e).splitlines()[1:]:
            assert line in page, f"docs/training.md error example is stale: {line!r}"
    else:
        raise AssertionError("spec should be invalid")

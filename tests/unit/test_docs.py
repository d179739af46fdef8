"""The README stays true: the spec reference is the generated one, and the quickstart commands exist."""
from __future__ import annotations

import re

from tests.conftest import REPO


def _readme() -> str:
    return (REPO / "README.md").read_text()


def test_spec_reference_matches_schema():
    from pipelines.spec import reference_markdown

    block = re.search(r"<!-- spec-reference:start -->\n(.*?)\n<!-- spec-reference:end -->", _readme(), re.S)
    assert block, "README lacks the spec-reference markers"
    assert block.group(1).strip() == reference_markdown().strip(), "README spec reference is stale: run tests/update_readme.py"


def test_serving_reference_matches_schema():
    from pipelines.spec import reference_markdown
    from serving.spec import ServeSpec

    block = re.search(r"<!-- serving-reference:start -->\n(.*?)\n<!-- serving-reference:end -->", _readme(), re.S)
    assert block, "README lacks the serving-reference markers"
    assert block.group(1).strip() == reference_markdown(ServeSpec).strip(), "README serving reference is stale: run tests/update_readme.py"


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


def test_readme_shows_a_real_bad_spec_error():
    """The error example in the README is what the validator really prints."""
    from pipelines.spec import SpecError, apply_overrides, read_yaml, validate

    raw = apply_overrides(read_yaml(REPO / "pipelines/configs/demo.yaml"),
                          ["method.r=-4", "train.lr=fast", "method.name=qlora", "model.quantization=none"])
    try:
        validate(raw, base_dir=REPO)
    except SpecError as e:
        for line in str(e).splitlines()[1:]:
            assert line in _readme(), f"README error example is stale: {line!r}"
    else:
        raise AssertionError("spec should be invalid")

"""Local paths in a spec resolve once, on the driver, against the directory the user ran from; URL data
sources are checked and fingerprinted through fsspec (issue: relative paths and URL sources)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipelines.data import url_fingerprint
from pipelines.spec import SpecError, load_spec, resolve_paths, validate
from tests.conftest import write_chat_data

BIN = Path(sys.executable).parent


@pytest.fixture
def project(tmp_path, tiny_model_dir):
    """A user's project folder: data and a base model under relative paths."""
    root = tmp_path / "project"
    (root / "data").mkdir(parents=True)
    write_chat_data(root / "data" / "chat.jsonl", n=16)
    (root / "models").mkdir()
    (root / "models" / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    return root


def test_relative_paths_become_absolute_and_the_rest_is_left_alone(project):
    raw = {
        "model": {"base": "models/tiny"},
        "data": {"train": "data/chat.jsonl", "eval": "file:///x/eval.jsonl"},
        "checkpoint": {"storage": "runs"},
    }
    out = resolve_paths(raw, project)
    assert out["model"]["base"] == str((project / "models" / "tiny").resolve())
    assert out["data"]["train"] == str(project / "data" / "chat.jsonl")
    assert out["data"]["eval"] == "file:///x/eval.jsonl"
    assert out["checkpoint"]["storage"] == str(project / "runs")
    assert raw["data"]["train"] == "data/chat.jsonl"  # the input is not mutated
    hub = resolve_paths({"model": {"base": "HuggingFaceTB/SmolLM2-135M"}, "data": {"train": "builtin:json_extract"}})
    assert hub == {"model": {"base": "HuggingFaceTB/SmolLM2-135M"}, "data": {"train": "builtin:json_extract"}}


def test_load_spec_resolves_against_the_directory_the_user_ran_from(project, monkeypatch):
    (project / "spec.yaml").write_text(
        yaml.safe_dump({"model": {"base": "models/tiny"}, "data": {"train": "data/chat.jsonl", "format": "chat"}})
    )
    monkeypatch.chdir(project)
    spec = load_spec("spec.yaml")
    assert spec.data.train == str(project / "data" / "chat.jsonl")
    assert os.path.isabs(spec.model.base) and Path(spec.model.base, "config.json").is_file()
    assert spec.flat()["data.train"] == spec.data.train  # what MLflow records


def test_a_file_url_is_checked_and_fingerprinted_by_content(project):
    url = (project / "data" / "chat.jsonl").as_uri()
    spec = validate({"data": {"train": url, "format": "chat"}})
    assert spec.data.train == url
    digest = hashlib.sha256((project / "data" / "chat.jsonl").read_bytes()).hexdigest()
    assert url_fingerprint(url) == f"{url} sha256:{digest}"


@pytest.mark.parametrize(
    ("url", "needle"),
    [("file:///nonexistent/chat.jsonl", "no file at this URL"), ("file:///tmp/chat.txt", "unsupported data file type")],
)
def test_a_bad_url_source_names_the_field(url, needle):
    with pytest.raises(SpecError) as e:
        validate({"data": {"train": url}})
    [(field, msg)] = [p for p in e.value.problems if p[0] == "data.train"]
    assert needle in msg and url in msg


def test_raypeft_train_with_a_missing_file_url_exits_2_before_ray(tmp_path, tiny_model_dir):
    spec = {"model": {"base": str(tiny_model_dir)}, "data": {"train": "file:///nonexistent/chat.jsonl"}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAYPEFT_HOME": str(tmp_path / "home"), "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [str(BIN / "raypeft"), "train", "spec.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    assert "data.train" in proc.stderr and "no file at this URL" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "home").exists()  # no run directory, no MLflow database

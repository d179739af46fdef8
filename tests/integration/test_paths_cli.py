"""A job written as a user writes it, with paths relative to their project folder, trains through the real
CLI on a real local Ray cluster, and the same project trains under `ray job submit --working-dir`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import write_chat_data

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent


def project(root: Path, tiny_model_dir: Path) -> dict:
    """A project folder with its data, eval set and base model under relative paths; returns the spec."""
    (root / "data").mkdir(parents=True)
    write_chat_data(root / "data" / "chat.jsonl", n=32)
    write_chat_data(root / "data" / "eval.jsonl", n=8, seed=1)
    (root / "models").mkdir()
    (root / "models" / "tiny").symlink_to(tiny_model_dir, target_is_directory=True)
    return {
        "name": "relative",
        "model": {"base": "models/tiny"},
        "method": {"name": "lora", "r": 4},
        "data": {"train": "data/chat.jsonl", "eval": (root / "data" / "eval.jsonl").as_uri(), "max_length": 64},
        "train": {"max_steps": 3, "micro_batch_size": 4, "warmup_steps": 1, "eval_every": 0, "eval_base": False},
        "checkpoint": {"storage": "runs"},
    }


def _result(stdout: str) -> dict:
    return json.loads([line for line in stdout.splitlines() if line.startswith('{"run_id"')][-1])


def test_raypeft_train_from_a_project_folder_with_relative_paths_and_a_file_url(tmp_path, tiny_model_dir):
    from mlflow import MlflowClient

    root = tmp_path / "project"
    spec = project(root, tiny_model_dir)
    (root / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "RAYPEFT_HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [str(BIN / "raypeft"), "train", "spec.yaml", "scaling.cpus_per_worker=1"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = _result(proc.stdout)
    assert Path(result["adapter_dir"]) == root / "runs" / "relative" / "adapter"  # storage resolved in the project
    assert (Path(result["adapter_dir"]) / "adapter_model.safetensors").is_file()
    params = MlflowClient(result["tracking_uri"]).get_run(result["run_id"]).data.params
    assert params["data.train"] == str(root / "data" / "chat.jsonl")  # the resolved paths are recorded
    assert params["model.base"] == str((root / "models" / "tiny").resolve())
    assert params["data.eval"] == spec["data"]["eval"]
    assert yaml.safe_load((root / "spec.yaml").read_text()) == spec  # the spec file is unchanged
    assert "eval_loss" in result["metrics"]

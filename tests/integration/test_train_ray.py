"""Training on a real local Ray cluster with a real MLflow (SQLite) backend and registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import tiny_spec

pytestmark = pytest.mark.integration


def _mlflow(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_one_worker_job_end_to_end(local_ray, raypeft_home, tiny_model_dir, chat_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pipelines.train import run

    spec = tiny_spec(
        tiny_model_dir,
        chat_data,
        method={"dropout": 0.0},  # no dropout on the prefix's tokens: data.share_prefix unset is on
        train={"max_steps": 8, "eval_every": 4, "eval_base": True},
        checkpoint={"every_steps": 4},
        tracking={"registered_model": "tiny-adapter"},
    )
    result = run(spec)

    # one job's tracking URI does not leak into this process (mlflow.set_tracking_uri exports it)
    import os

    assert "MLFLOW_TRACKING_URI" not in os.environ

    # the result record pipelines chain on
    assert set(result) >= {"run_id", "adapter_dir", "registered_model", "version", "metrics"}
    m = result["metrics"]
    assert m["eval_loss"] < m["base_eval_loss"], m
    assert "train_loss" in m

    # a standard PEFT adapter dir that plain PEFT loads
    adapter = Path(result["adapter_dir"])
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "adapter B matrices are still zero"

    # MLflow: one run with params, per-step curves, lineage, loss curve, LoggedModel, registered version
    c = _mlflow(result["tracking_uri"])
    run_ = c.get_run(result["run_id"])
    assert run_.info.status == "FINISHED"
    assert run_.data.params["train.max_steps"] == "8" and run_.data.params["method.name"] == "lora"
    assert run_.data.tags["method"] == "lora" and run_.data.tags["dataset_hash"].startswith("sha256:")
    assert run_.data.tags["base_model_hash"].startswith("sha256:")
    steps = [x.step for x in c.get_metric_history(result["run_id"], "train_loss")]
    assert steps == list(range(1, 9))
    assert [x.step for x in c.get_metric_history(result["run_id"], "eval_loss")] == [4, 8]
    # unpacked examples of uneven length, run padding-free by default: no slot went to a pad token
    assert {x.value for x in c.get_metric_history(result["run_id"], "real_token_fraction")} == {1.0}
    # and the examples' shared template tokens were computed once per micro-batch (data.share_prefix unset: on)
    shared = [x.value for x in c.get_metric_history(result["run_id"], "shared_prefix_fraction")]
    assert len(shared) == 8 and all(0.1 < v < 0.5 for v in shared), shared
    assert run_.data.tags["raypeft.micro_batches"] == (
        "padding-free rows; attention per example (raypeft_sdpa_varlen), a shared prefix computed once"
    )
    assert run_.data.tags["raypeft.attention"] == "per_example"
    assert "loss_curve.png" in [a.path for a in c.list_artifacts(result["run_id"])]
    runs = c.search_runs([run_.info.experiment_id])
    assert len(runs) == 1

    from pipelines.lifecycle import show

    shown = show(result["tracking_uri"], f"tiny-adapter/{result['version']}")["versions"][0]
    assert "max_steps: 8" in shown["spec"] and shown["lineage"]["method"] == "lora"
    assert shown["lineage"]["base_model_hash"].startswith("sha256:") and shown["metrics"]["eval_loss"] > 0
    version = c.get_model_version("tiny-adapter", str(result["version"]))
    assert version.tags["method"] == "lora" and version.tags["raypeft.run_id"] == result["run_id"]
    model_id = run_.data.tags["raypeft.model_id"]
    files = {a.path: a.file_size for a in c.list_logged_model_artifacts(model_id)}
    assert "adapter_model.safetensors" in files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files), f"base weights logged: {files}"
    base_bytes = sum(p.stat().st_size for p in Path(tiny_model_dir).glob("*.safetensors"))
    assert sum(v or 0 for v in files.values()) < base_bytes

    # checkpoints every 4 steps, kept by Ray Train
    ckpts = sorted(p.name for p in (raypeft_home / "runs" / "tiny").glob("step_*"))
    assert ckpts == ["step_0000004", "step_0000008"]


def test_packed_padding_free_training_under_ddp(local_ray, raypeft_home, tiny_model_dir, chat_data, capfd):
    """Packed rows, collated padding-free, trained by 2 workers under DDP: the loss falls, every token slot the
    model ran was a real token, and attention ran per example. With no eval split, no eval metric is made up.
    (Unpacked rows under DDP: test_distributed's reference run for the ZeRO stages.)"""
    from mlflow import MlflowClient

    from pipelines.spec import validate
    from pipelines.train import run

    raw = tiny_spec(
        tiny_model_dir,
        chat_data,
        name="packed-ddp",
        train={"max_steps": 10, "micro_batch_size": 2, "eval_every": 0},
        scaling={"num_workers": 2, "cpus_per_worker": 1},
    ).model_dump(mode="json")
    raw["data"].update(packing=True, eval_fraction=0)  # and no eval split
    result = run(validate(raw))
    c = MlflowClient(result["tracking_uri"])
    losses = [h.value for h in sorted(c.get_metric_history(result["run_id"], "train_loss"), key=lambda h: h.step)]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert {h.value for h in c.get_metric_history(result["run_id"], "real_token_fraction")} == {1.0}
    assert c.get_metric_history(result["run_id"], "data_row_fill")[0].value < 1.0  # rows alone would pad
    assert "attention per example (raypeft_sdpa_varlen)" in capfd.readouterr().out
    # no eval split: no eval metric at all, rather than an eval_loss of 0 that looks perfect
    assert "eval_loss" not in result["metrics"] and not c.get_metric_history(result["run_id"], "eval_loss")
    # the local cluster ran Train V2's own actors but no preemption watcher (cluster.connect.init_ray)
    from ray._private.state import actors

    classes = {a["ActorClassName"] for a in actors().values()}
    assert {"TrainController", "RayTrainWorker"} <= classes and "PreemptionWatcher" not in classes, classes


def test_lora_plus_and_adalora_run_under_ray_and_a_rerun_keeps_the_finished_job(
    local_ray, raypeft_home, tiny_model_dir, chat_data
):
    """Methods with their own optimizer / per-step hook go through the real worker loop. The LoRA+ job, run
    again once it has finished, runs as a new job beside it and never overwrites it."""
    from pipelines.train import run

    for name, extra in (("lora_plus", {}), ("adalora", {"r": 8})):
        spec = tiny_spec(
            tiny_model_dir, chat_data, name=f"m-{name}", method={"name": name, **extra}, train={"max_steps": 6}
        )
        result = run(spec)
        cfg = json.loads((Path(result["adapter_dir"]) / "adapter_config.json").read_text())
        assert cfg["peft_type"] == ("LORA" if name == "lora_plus" else "ADALORA")
        if name == "lora_plus":
            first, second = result, run(spec)
            assert first["job"] == "m-lora_plus" and second["job"] == "m-lora_plus-2"
            assert first["run_id"] != second["run_id"]
            assert Path(first["adapter_dir"]).is_dir() and Path(second["adapter_dir"]).is_dir()
            assert first["adapter_dir"] != second["adapter_dir"]


def test_bad_spec_exits_2_before_ray_starts(tmp_path, capsys):
    import ray

    from raypeft.cli import main

    ray.shutdown()
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  name: lora\n  r: -4\ntrain:\n  lr: fast\n")
    assert main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "method.r" in err and "-4" in err
    assert "train.lr" in err and "'fast'" in err
    assert not ray.is_initialized()


def test_validate_prints_resolved_spec(tmp_path, capsys):
    from raypeft.cli import main

    assert main(["validate", "pipelines/configs/demo.yaml", "train.lr=1e-4", "method.r=8"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0001" in out and "r: 8" in out

"""Train an adapter from a job spec on Ray Train. The ``ray job submit`` entrypoint.

    python -m pipelines.train pipelines/configs/demo.yaml train.lr=1e-4 method.r=16
    ray job submit --working-dir . -- python -m pipelines.train pipelines/configs/demo.yaml

Validates the spec once (exit 2 on any problem, before Ray starts), creates the
MLflow run, runs the ``TorchTrainer``, copies the final adapter out of the last
checkpoint, logs and registers it, and prints one JSON object as the last stdout
line: run_id, adapter_dir, registered_model, version, metrics.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.spec import ADAPTER_DIR, storage_dir  # noqa: F401 - storage_dir: also the tuner's
from pipelines.spec.job import JobSpec, SpecError

JOB_STATE = "raypeft_job.json"


def _run_name(spec: JobSpec, storage: str) -> tuple[str, dict[str, Any] | None]:
    """The Ray Train run name for this job and the unfinished job state to resume, if any.

    Re-running a job whose previous attempt did not finish resumes it (same Ray Train
    run, same MLflow run). A finished job of that name is kept; the new one gets a suffix.
    """
    if "://" in storage:
        return spec.name, None
    for i in range(1, 10_000):
        name = spec.name if i == 1 else f"{spec.name}-{i}"
        state_file = Path(storage) / name / JOB_STATE
        if not (Path(storage) / name).exists():
            return name, None
        if state_file.is_file():
            state = json.loads(state_file.read_text())
            if state.get("status") != "finished":
                return name, state
    raise RuntimeError("too many runs with the same name")


def _write_state(storage: str, name: str, state: dict[str, Any]) -> None:
    if "://" in storage:
        return
    d = Path(storage) / name
    d.mkdir(parents=True, exist_ok=True)
    (d / JOB_STATE).write_text(json.dumps(state, indent=2))


def job_lineage(spec: JobSpec) -> dict[str, str]:
    """Tags that tie a run to its exact base weights, data and method."""
    from pipelines.data import dataset_hash
    from pipelines.model import base_lineage

    return {
        **base_lineage(spec.model),
        "dataset": spec.data.train,
        "dataset_hash": dataset_hash(spec),
        "method": spec.method.name,
        "quantization": spec.quantization() if not spec.model.quantization_plan else "mixed",
    }


def make_trainer(spec: JobSpec, loop_config: dict[str, Any], run_name: str, storage: str, callbacks=()):
    """The ``TorchTrainer`` of one training run (a job, or one Tune trial)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cluster.connect import mlflow_runtime_env
    from pipelines.train.worker import train_worker

    sc = spec.scaling
    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker={"CPU": sc.cpus_per_worker, **({"GPU": 1} if sc.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=spec.checkpoint.keep),
            failure_config=FailureConfig(max_failures=spec.checkpoint.max_failures),
            callbacks=list(callbacks),
            worker_runtime_env=mlflow_runtime_env(),  # rank 0 logs per-step metrics to the tracking server
        ),
    )


def run(spec: JobSpec, log=print) -> dict[str, Any]:
    """Run a validated job end to end and return the result record (see module docstring)."""
    from cluster.connect import init_ray
    from cluster.waits import watch_pending
    from pipelines import tracking
    from pipelines.data.prepare import prepare

    storage = storage_dir(spec)
    run_name, prior = _run_name(spec, storage)
    uri = tracking.tracking_uri(spec)
    tracking.check_server(uri)  # a wrong password or an unreachable server: exit 2 before Ray starts
    t_run = time.perf_counter()
    init_ray()
    ray_s = time.perf_counter() - t_run
    data = prepare(spec, log)  # bad data stops here (DataError, exit 2): no MLflow run, no workers
    lineage = job_lineage(spec)
    if prior:
        run_id = prior["mlflow_run_id"]
        log(f"[raypeft] resuming unfinished job {run_name!r} (MLflow run {run_id})")
        tracking.reopen_run(uri, run_id)
    else:
        run_id = tracking.start_run(spec, uri, run_name, {**lineage, "raypeft.job": run_name})
    _write_state(storage, run_name, {"status": "running", "mlflow_run_id": run_id, "tracking_uri": uri})
    log(f"[raypeft] MLflow run {run_id} at {uri}")

    loop = {"spec": spec, "run_id": run_id, "tracking_uri": uri, "data_dir": data.layout}
    trainer = make_trainer(spec, loop, run_name, storage)
    # the driver's share of the start-up: Ray's start (or connection), the data (a cache hit or the
    # tokenization), the MLflow run and the trainer; rank 0 logs the rest with its first step. The span
    # train_start_at → worker_started_at compares two hosts' clocks when rank 0 runs on another node.
    driver_s = time.perf_counter() - t_run
    startup = {"startup_ray_s": ray_s, "startup_driver_s": driver_s, "train_start_at": time.time()}
    tracking.StepLogger(uri, run_id).log({**data.stats, **startup}, 0)
    t0 = time.time()
    try:
        with watch_pending(log):  # workers waiting for the cluster say so, and what it has free
            result = trainer.fit()
    except Exception as e:
        tracking.fail_run(uri, run_id, f"{type(e).__name__}: {e}")
        _write_state(
            storage,
            run_name,
            {"status": "failed", "mlflow_run_id": run_id, "tracking_uri": uri, "error": str(e)[:2000]},
        )
        raise
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint")
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float)) and k != "step"}

    out_root = Path(storage) / run_name if "://" not in storage else Path(tracking.raypeft_home()) / "runs" / run_name
    adapter_dir = out_root / "adapter"
    with result.checkpoint.as_directory() as d:
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        shutil.copytree(Path(d) / ADAPTER_DIR, adapter_dir)

    reg = tracking.finish_run(spec, uri, run_id, str(adapter_dir), lineage, metrics)
    _write_state(storage, run_name, {"status": "finished", "mlflow_run_id": run_id, "tracking_uri": uri, **reg})
    return {
        "run_id": run_id,
        "adapter_dir": str(adapter_dir),
        "registered_model": reg["registered_model"],
        "version": reg["version"],
        "model_uri": reg["model_uri"],
        "tracking_uri": uri,
        "job": run_name,
        "wall_s": round(time.time() - t0, 1),
        "metrics": metrics,
    }


def summary_lines(result: dict[str, Any], spec: JobSpec) -> list[str]:
    m = result["metrics"]
    lines = [f"[raypeft] adapter: {result['adapter_dir']}"]
    if result["registered_model"]:
        lines.append(f"[raypeft] registered: models:/{result['registered_model']}/{result['version']}")
    for key in ("eval_loss", "exact_match"):
        if key in m:
            base = m.get(f"base_{key}")
            lines.append(
                f"[raypeft] {key}: base {base:.4f} → adapter {m[key]:.4f}"
                if base is not None
                else f"[raypeft] {key}: {m[key]:.4f}"
            )
    return lines


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipelines.train", description=__doc__.split("\n\n")[0])
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.lr=1e-4 method.r=16")
    p.add_argument("--validate-only", action="store_true", help="validate the spec, print it resolved, and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from pipelines.train.preflight import load_checked_spec

        spec = load_checked_spec(args.spec, args.overrides)  # + target_modules vs the base, before Ray starts
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.validate_only:
        from pipelines.tracking import spec_yaml

        print(spec_yaml(spec), end="")
        return 0
    from pipelines.data import DataError

    try:
        result = run(spec)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in summary_lines(result, spec):
        print(line, flush=True)
    print(json.dumps(result), flush=True)
    return 0


def command(args) -> int:
    """``raypeft train``."""
    return main([args.spec, *args.overrides])


if __name__ == "__main__":
    sys.exit(main())

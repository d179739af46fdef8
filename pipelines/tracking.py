"""MLflow tracking: one run per job, per-step metrics, the adapter as a LoggedModel, registration.

Who writes what (so no record is duplicated by several ranks):
  * the driver creates the run, logs params (the flattened spec) and lineage tags,
    and at the end logs the loss curve, the LoggedModel and the registry version;
  * rank 0 logs per-step metrics through ``StepLogger``.

Embedded default: ``sqlite:///$RAYPEFT_HOME/mlflow.db`` with artifacts under
``$RAYPEFT_HOME/mlartifacts``; ``MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri``
selects a server.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.spec import (
    UserError,
    raypeft_home,  # noqa: F401 - and the home's MLflow store is tracking's default
)

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import JobSpec

ADAPTER_MODEL_TYPE = "peft-adapter"


def tracking_uri(spec: JobSpec | None = None) -> str:
    if spec is not None and spec.tracking.tracking_uri:
        return spec.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    home = raypeft_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


class TrackingError(UserError):
    """The tracking server cannot be used as configured (unreachable, or it refused the credentials)."""


def check_server(uri: str) -> None:
    """Fail fast, before any Ray resources start, when an HTTP tracking server cannot be used: one request,
    no retries, with the client's own credentials (``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``/``_TOKEN``).
    The error names the URI and what to fix; other URIs (SQLite, a directory) are not checked. A server that
    is up but slow gets MLflow's own request timeout (``MLFLOW_HTTP_REQUEST_TIMEOUT``, 120 s unless set): a
    busy server answering late must not stop a job that it would serve."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_TIMEOUT
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    timeout = MLFLOW_HTTP_REQUEST_TIMEOUT.get()
    try:
        r = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            params={"max_results": 1},
            max_retries=0,
            timeout=timeout,
            raise_on_status=False,
        )
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, TLS: all mean "cannot reach it"
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {uri} (waited up to {timeout} s, "
            f"MLFLOW_HTTP_REQUEST_TIMEOUT): {type(e).__name__}: {e}"
        ) from None
    if r.status_code in (401, 403):
        who = os.environ.get("MLFLOW_TRACKING_USERNAME")
        raise TrackingError(
            f"the MLflow tracking server at {uri} refused the credentials (HTTP {r.status_code}"
            + (f", user {who!r}" if who else ", no MLFLOW_TRACKING_USERNAME set")
            + "): check MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        )
    if r.status_code >= 400:
        raise TrackingError(f"the MLflow tracking server at {uri} answered HTTP {r.status_code}: {r.text[:300]}")


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    from mlflow.exceptions import MlflowException

    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the db, not in whatever cwd the job runs in
        location = (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    try:
        return c.create_experiment(name, artifact_location=location)
    except MlflowException:  # created concurrently
        return c.get_experiment_by_name(name).experiment_id


def str_params(d: dict[str, Any]) -> dict[str, str]:
    return {k: (str(v) if v is not None else "null")[:6000] for k, v in d.items()}


def start_run(spec: JobSpec, uri: str, run_name: str, tags: dict[str, str]) -> str:
    """Create the job's MLflow run; log the flattened spec as params and the lineage tags."""
    from mlflow.entities import Param

    c = client(uri)
    run = c.create_run(experiment_id(uri, spec.tracking.experiment), run_name=run_name, tags=tags)
    params = [Param(k, v) for k, v in str_params(spec.flat()).items()]
    for i in range(0, len(params), 100):
        c.log_batch(run.info.run_id, params=params[i : i + 100])
    c.log_text(run.info.run_id, spec_yaml(spec), "spec.yaml")
    return run.info.run_id


def spec_yaml(spec: JobSpec) -> str:
    import yaml

    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)


class StepLogger:
    """Per-step metric logging from rank 0 (batched, retried on a locked SQLite db)."""

    def __init__(self, uri: str, run_id: str):
        self.client = client(uri)
        self.run_id = run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        for attempt in range(5):
            try:
                self.client.log_batch(self.run_id, metrics=batch)
                return
            except Exception as e:  # "database is locked" under concurrent writers
                if "locked" not in str(e) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))


def loss_curve_png(uri: str, run_id: str, out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = client(uri)
    train = c.get_metric_history(run_id, "train_loss")
    if not train:
        return None
    evals = c.get_metric_history(run_id, "eval_loss")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([m.step for m in train], [m.value for m in train], label="train_loss")
    if evals:
        ax.plot([m.step for m in evals], [m.value for m in evals], "o-", label="eval_loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def finish_run(
    spec: JobSpec, uri: str, run_id: str, adapter_dir: str, lineage: dict[str, str], final_metrics: dict[str, float]
) -> dict[str, Any]:
    """Log the loss curve and the adapter (a LoggedModel of adapter files only), register it, close the run."""

    c = client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        png = loss_curve_png(uri, run_id, Path(tmp) / "loss_curve.png")
        if png:
            c.log_artifact(run_id, str(png))

    with _global_uri(uri):
        return _log_and_register(spec, uri, run_id, adapter_dir, lineage, final_metrics)


@contextlib.contextmanager
def _global_uri(uri: str):
    """mlflow's fluent API reads a process-global URI, and ``set_tracking_uri`` also exports it as
    ``MLFLOW_TRACKING_URI``; restore both afterwards so one job's URI never leaks into the next."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_state
    from mlflow.tracking._tracking_service import utils as tracking_state

    saved_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    # what was *set* (None: nothing), not mlflow.get_tracking_uri(), which would be the default URI: setting
    # that back would pin the process to it and hide a MLFLOW_TRACKING_URI exported later
    saved = (tracking_state._tracking_uri, registry_state._registry_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _log_and_register(
    spec: JobSpec, uri: str, run_id: str, adapter_dir: str, lineage: dict[str, str], final_metrics: dict[str, float]
) -> dict[str, Any]:
    c = client(uri)
    params = {"method": spec.method.name, "r": spec.rank(), "alpha": spec.alpha(), "quantization": spec.quantization()}
    version_tags = {
        **lineage,
        "raypeft.run_id": run_id,
        **{f"metric.{k}": f"{v:.6g}" for k, v in final_metrics.items()},
    }
    out = _log_model(
        c,
        run_id,
        adapter_dir,
        {**lineage, "raypeft.method": spec.method.name},
        params,
        spec.tracking.registered_model,
        version_tags,
    )
    c.set_terminated(run_id, "FINISHED")
    return out


def _log_model(
    c,
    run_id: str,
    directory: str,
    tags: dict[str, str],
    params: dict[str, Any],
    registered_model: str | None,
    version_tags: dict[str, str],
) -> dict[str, Any]:
    """Log ``directory`` as an MLflow 3 LoggedModel of ``run_id`` and register it (inside ``_global_uri``)."""
    import mlflow

    model = mlflow.initialize_logged_model(
        name="adapter",
        source_run_id=run_id,
        tags=tags,
        params=str_params(params),
        model_type=ADAPTER_MODEL_TYPE,
        experiment_id=c.get_run(run_id).info.experiment_id,
    )
    try:
        c.log_model_artifacts(model.model_id, directory)
    except Exception:
        mlflow.finalize_logged_model(model.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(model.model_id, "READY")
    c.set_tag(run_id, "raypeft.model_id", model.model_id)
    out: dict[str, Any] = {
        "run_id": run_id,
        "model_id": model.model_id,
        "model_uri": f"models:/{model.model_id}",
        "registered_model": None,
        "version": None,
    }
    if registered_model:
        version = mlflow.register_model(f"models:/{model.model_id}", registered_model, tags=version_tags)
        out["registered_model"] = registered_model
        out["version"] = int(version.version)
    return out


def register_directory(
    uri: str, directory: str, registered_model: str, run_name: str, tags: dict[str, str], experiment: str = "raypeft"
) -> dict[str, Any]:
    """Log a directory (an exported or combined adapter / model) in a run of its own and register it.

    ``tags`` carry the lineage (parents, source), on the run, the LoggedModel and the version.
    """
    c = client(uri)
    run = c.create_run(experiment_id(uri, experiment), run_name=run_name, tags=tags)
    with _global_uri(uri):
        out = _log_model(c, run.info.run_id, directory, tags, {}, registered_model, tags)
    c.set_terminated(run.info.run_id, "FINISHED")
    return out


def reopen_run(uri: str, run_id: str) -> None:
    """A resumed job's run is running again (it may have ended FAILED when its restarts ran out); the earlier
    attempt's error stays in its ``raypeft.error`` tag."""
    client(uri).update_run(run_id, status="RUNNING")


def fail_run(uri: str, run_id: str, error: str) -> None:
    c = client(uri)
    c.set_tag(run_id, "raypeft.error", error[:5000])
    c.set_terminated(run_id, "FAILED")

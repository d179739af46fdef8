"""Ray Tune sweeps over a job spec: ``raypeft tune SPEC``.

Each trial is one training-pipeline run: a Tune function trial (the Train V2 pattern) builds the job's
``TorchTrainer`` for its sampled spec and runs it with ``TuneReportCallback``, so every eval the workers
report reaches the scheduler, which stops weak trials early. Concurrency is capped at what the cluster
holds (``pipelines.spec.tune.concurrency``), so trials never wait on placement groups that cannot be placed.

MLflow: one parent run for the sweep and one child run per trial, all written by *this* process (a
Tune callback on the driver), so the SQLite default never sees concurrent writers. The best trial's
adapter is logged on its child run and registered; a results table and a PNG of the metric against
each searched field go to the parent run.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ray import tune

from pipelines.spec import JobSpec, TunedJobSpec, concurrency, resolve_paths, trial_raw, validate

DRIVER_CPU = 0.01  # the Tune trial process only waits on its TorchTrainer; Train's workers hold the real resources
PENALTY = 1e3  # the metric reported by a trial that was not trained (plan over budget)
LOGGED = (
    "eval_loss",
    "eval_perplexity",
    "train_loss",
    "exact_match",
    "base_eval_loss",
    "base_exact_match",
    "memory_bytes",
)


# --------------------------------------------------------------------------- the trial


def run_trial(config: dict[str, Any], raw: dict[str, Any], storage: str) -> None:
    """One Tune trial: the sampled spec's training run.

    Config keys with a dot are spec fields; a ``plan`` key holds them as one grid value; ``memory_bytes``
    is added to every report (the search's second objective); ``over_budget`` trials report ``PENALTY``
    without training. Other keys are searcher bookkeeping."""
    from pipelines.train import make_trainer
    from tuning.report_order import deliver_train_reports_in_order

    plan = config.get("plan") or config
    extra = {"memory_bytes": plan["memory_bytes"]} if "memory_bytes" in plan else {}
    if plan.get("over_budget"):
        tune.report({"eval_loss": PENALTY, "step": 0, "over_budget": True, **extra})
        return
    from pipelines.data.prepare import prepare

    spec = validate(trial_raw(raw, {k: v for k, v in plan.items() if "." in k}))
    data = prepare(spec)  # the driver prepared it: a cache hit unless the trial samples a data field
    loop = {"spec": spec, "run_id": None, "tracking_uri": None, "report_evals": True, "data_dir": data.layout}
    trial_id = tune.get_context().get_trial_id()
    deliver_train_reports_in_order()  # else a slow driver can deadlock the trial on its last report
    make_trainer(spec, loop, f"trial_{trial_id}", storage, callbacks=[_Report(extra)]).fit()


def _Report(extra: dict[str, Any]):
    """``TuneReportCallback`` that adds ``extra`` to every report the Train workers make."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class Report(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            super().after_report(run_context, [{**m, **extra} for m in metrics], checkpoint)

    return Report()


# --------------------------------------------------------------------------- MLflow, from the driver only


class MlflowSweepLogger(tune.Callback):
    """Child run per trial under the sweep's parent run; every write happens in the Tune driver."""

    def __init__(self, uri: str, experiment_id: str, parent_run_id: str, sweep: str, max_steps: int):
        # no callables kept here: Tune pickles its callbacks with the experiment state
        self.uri, self.experiment_id, self.parent, self.sweep, self.max_steps = (
            uri,
            experiment_id,
            parent_run_id,
            sweep,
            max_steps,
        )
        self.runs: dict[str, str] = {}
        self.last: dict[str, dict[str, Any]] = {}

    def _client(self):
        from pipelines.tracking import client

        return client(self.uri)

    def on_trial_start(self, iteration, trials, trial, **info):
        from mlflow.entities import Param

        from pipelines.tracking import str_params

        c = self._client()
        run = c.create_run(
            self.experiment_id,
            run_name=f"{self.sweep}/{trial.trial_id}",
            tags={"mlflow.parentRunId": self.parent, "raypeft.sweep": self.sweep, "raypeft.trial_id": trial.trial_id},
        )
        config = trial.config.get("plan") or trial.config
        params = {k: v for k, v in config.items() if not isinstance(v, dict)}  # the plan's dicts: as bits_i / rank_i
        batch = [Param(k, v) for k, v in str_params(params).items()]
        for i in range(0, len(batch), 100):
            c.log_batch(run.info.run_id, params=batch[i : i + 100])
        self.runs[trial.trial_id] = run.info.run_id
        if "bits_0" in config:  # a layerwise plan: one line instead of Tune's table of every bits_i / rank_i
            from cluster.memory import describe
            from tuning.layerwise import from_point

            plan = describe(from_point(config))
            note = (
                " (infeasible: not trained)"
                if config.get("over_budget")
                else " (repaired to fit the budget)"
                if config.get("repaired")
                else ""
            )
            print(f"[raypeft] trial {trial.trial_id}: {plan}{note}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from pipelines.tracking import StepLogger

        self.last[trial.trial_id] = result
        metrics = {k: result[k] for k in LOGGED if isinstance(result.get(k), (int, float))}
        if trial.trial_id in self.runs and metrics:
            StepLogger(self.uri, self.runs[trial.trial_id]).log(metrics, int(result.get("step", 0)))

    def _end(self, trial, status: str) -> None:
        run_id = self.runs.get(trial.trial_id)
        if run_id is None:
            return
        last = self.last.get(trial.trial_id, {})
        step = int(last.get("step", 0))
        early = status == "FINISHED" and not last.get("over_budget") and step < self.max_steps
        c = self._client()
        c.set_tag(run_id, "raypeft.stopped_early", str(early).lower())
        c.set_terminated(run_id, status)
        if last.get("over_budget") and status == "FINISHED":
            return  # announced as infeasible when it started
        what = f"stopped early at step {step}" if early else f"finished {step} steps"
        metric = ", ".join(
            f"{k} {last[k]:.4f}" for k in ("eval_loss", "exact_match") if isinstance(last.get(k), (int, float))
        )
        print(
            f"[raypeft] trial {trial.trial_id}: {what if status == 'FINISHED' else 'failed'}{', ' + metric if metric else ''}"
        )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trial, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trial, "FAILED")


# --------------------------------------------------------------------------- search space, scheduler, searcher


def search_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The spec's ``tune.space`` as Tune domains."""
    make = {
        "choice": tune.choice,
        "grid": tune.grid_search,
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(*a),
    }
    return {field: make[kind](arg) for field, dom in space.items() for kind, arg in dom.items()}


def make_scheduler(spec: TunedJobSpec):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler, MedianStoppingRule

    t = spec.tune
    grace = t.grace_period or spec.train.eval_every or max(1, spec.train.max_steps // 4)
    if t.scheduler == "asha":
        return ASHAScheduler(
            time_attr="step", max_t=spec.train.max_steps, grace_period=grace, reduction_factor=t.reduction_factor
        )
    if t.scheduler == "hyperband":
        return HyperBandScheduler(time_attr="step", max_t=spec.train.max_steps, reduction_factor=t.reduction_factor)
    if t.scheduler == "median":
        return MedianStoppingRule(time_attr="step", grace_period=grace, min_samples_required=3)
    return FIFOScheduler()


def make_searcher(spec: TunedJobSpec):
    if spec.tune.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=spec.tune.seed)
    return None


# --------------------------------------------------------------------------- running trials


def run_trials(
    spec: TunedJobSpec,
    name: str,
    param_space: dict[str, Any],
    *,
    metric,
    mode,
    num_samples: int,
    scheduler=None,
    searcher=None,
    parent_run_id: str,
    uri: str,
    max_steps: int,
    verbose: int = 1,
    log=print,
):
    """Run Tune trials of ``spec`` (each a Train run) and log them under ``parent_run_id``. Returns the ResultGrid.
    ``verbose``: Tune's console output (0: only raypeft's one line per trial start and end)."""
    import ray

    from cluster.connect import init_ray
    from cluster.waits import watch_pending
    from pipelines.spec import storage_dir
    from pipelines.tracking import StepLogger, client

    init_ray()
    from pipelines.data.prepare import prepare

    data = prepare(spec, log)  # tokenize once here, not in every trial
    sc = spec.scaling
    per_trial = {"CPU": sc.num_workers * sc.cpus_per_worker + DRIVER_CPU, "GPU": sc.num_workers if sc.use_gpu else 0}
    n = concurrency(ray.cluster_resources(), per_trial, spec.tune.max_concurrent_trials)
    log(f"[raypeft] {name}: up to {n} trial(s) at once ({per_trial['CPU']:g} CPU each)")
    storage = storage_dir(spec)
    raw = resolve_paths(spec.model_dump(mode="json", exclude={"tune"}))
    exp_id = client(uri).get_run(parent_run_id).info.experiment_id
    logger = MlflowSweepLogger(uri, exp_id, parent_run_id, name, max_steps)
    StepLogger(uri, parent_run_id).log(data.stats, 0)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, raw=raw, storage=f"{storage}/{name}/train"), {"CPU": DRIVER_CPU}
    )
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=num_samples,
            scheduler=scheduler,
            search_alg=searcher,
            max_concurrent_trials=n,
        ),
        run_config=tune.RunConfig(name=name, storage_path=storage, callbacks=[logger], verbose=verbose),
    )
    with watch_pending(log):  # a trial waiting for CPUs nobody frees says so
        grid = tuner.fit()
    return grid, logger


def trial_rows(grid, logger: MlflowSweepLogger, fields: list[str], metric: str) -> list[dict[str, Any]]:
    """One row per trial: id, searched values, steps trained, the metric, status, checkpoint."""
    rows = []
    for r in grid:
        tid = r.metrics.get("trial_id") if r.metrics else None
        tid = tid or Path(r.path).name
        last = logger.last.get(tid, r.metrics or {})
        rows.append(
            {
                "trial": tid,
                **{f: r.config.get(f) for f in fields},
                "steps": int(last.get("step", 0)),
                metric: last.get(metric),
                "error": r.error is not None,
                "over_budget": bool(last.get("over_budget")),
                "checkpoint": last.get("checkpoint_path"),
                "run_id": logger.runs.get(tid),
                "memory_bytes": r.config.get("memory_bytes"),
            }
        )
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "—" if v is None else str(v)


def results_table(rows: list[dict[str, Any]], fields: list[str], metric: str, max_steps: int, mode: str = "min") -> str:
    """The markdown results table, best first."""
    sign = 1 if mode == "min" else -1
    key = lambda r: (r[metric] is None, sign * (r[metric] if r[metric] is not None else 0))  # noqa: E731
    head = ["trial", *fields, "steps", metric, "status"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=key):
        status = (
            "error"
            if r["error"]
            else "over budget"
            if r["over_budget"]
            else "stopped early"
            if r["steps"] < max_steps
            else "finished"
        )
        lines.append(
            "| "
            + " | ".join([r["trial"], *(_fmt(r[f]) for f in fields), str(r["steps"]), _fmt(r[metric]), status])
            + " |"
        )
    return "\n".join(lines)


def metric_png(
    rows: list[dict[str, Any]], fields: list[str], metric: str, max_steps: int, out: Path, log_fields=()
) -> Path:
    """The final metric against each searched field; early-stopped trials as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(fields)), figsize=(4 * max(1, len(fields)), 3.5), squeeze=False)
    ok = [r for r in rows if isinstance(r[metric], (int, float)) and not r["over_budget"]]
    for ax, f in zip(axes[0], fields):
        xs = [r[f] for r in ok]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        cats = sorted({str(x) for x in xs})
        pos = (lambda x: x) if numeric else (lambda x, cats=cats: cats.index(str(x)))
        for done, marker, label in ((True, "o", f"{max_steps} steps"), (False, "x", "stopped early")):
            pts = [(pos(r[f]), r[metric]) for r in ok if (r["steps"] >= max_steps) == done]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, label=label)
        if not numeric:
            ax.set_xticks(range(len(cats)), cats)
        elif f in log_fields:
            ax.set_xscale("log")
        ax.set_xlabel(f)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def register_trial(spec: JobSpec, row: dict[str, Any], uri: str, dest: Path, log=print) -> dict[str, Any]:
    """Log the trial's final adapter on its child run (a LoggedModel) and register it."""
    from pipelines import tracking
    from pipelines.spec import ADAPTER_DIR
    from pipelines.train import job_lineage

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(Path(row["checkpoint"]) / ADAPTER_DIR, dest)
    model = spec.tracking.registered_model or spec.name
    reg_spec = spec.model_copy(update={"tracking": spec.tracking.model_copy(update={"registered_model": model})})
    metrics = {k: v for k, v in row.items() if k in LOGGED and isinstance(v, (int, float))}
    out = tracking.finish_run(reg_spec, uri, row["run_id"], str(dest), job_lineage(spec), metrics)
    log(f"[raypeft] registered trial {row['trial']} as models:/{model}/{out['version']}")
    return out


def sweep(spec: TunedJobSpec, log=print) -> dict[str, Any]:
    """Run the spec's ``tune`` sweep end to end and return the result record."""
    from pipelines import tracking
    from pipelines.train import job_lineage

    t, fields = spec.tune, list(spec.tune.space)
    name = f"{spec.name}-tune-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = tracking.tracking_uri(spec)
    tracking.check_server(uri)  # before Ray starts
    parent = tracking.start_run(spec, uri, name, {**job_lineage(spec), "raypeft.sweep": name})
    log(f"[raypeft] sweep {name}: MLflow parent run {parent} at {uri}")
    t0 = time.time()
    try:
        grid, logger = run_trials(
            spec,
            name,
            search_space(t.space),
            metric=t.metric,
            mode=t.mode,
            num_samples=t.num_samples,
            scheduler=make_scheduler(spec),
            searcher=make_searcher(spec),
            parent_run_id=parent,
            uri=uri,
            max_steps=spec.train.max_steps,
            log=log,
        )
    except Exception as e:
        tracking.fail_run(uri, parent, f"{type(e).__name__}: {e}")
        raise
    rows = trial_rows(grid, logger, fields, t.metric)
    max_steps = spec.train.max_steps
    table = results_table(rows, fields, t.metric, max_steps, t.mode)
    print(table, flush=True)

    c = tracking.client(uri)
    _log_results(c, parent, spec, rows, table)
    finished = [
        r for r in rows if r["checkpoint"] and r["steps"] >= max_steps and isinstance(r[t.metric], (int, float))
    ]
    total = sum(r["steps"] for r in rows)
    summary = {
        "trials": len(rows),
        "stopped_early": sum(1 for r in rows if not r["error"] and r["steps"] < max_steps),
        "failed": sum(1 for r in rows if r["error"]),
        "total_steps": total,
        "full_grid_steps": len(rows) * max_steps,
    }
    result: dict[str, Any] = {
        "sweep": name,
        "parent_run_id": parent,
        "tracking_uri": uri,
        "wall_s": round(time.time() - t0, 1),
        **summary,
        "rows": rows,
        "best": None,
    }
    if not finished:
        tracking.fail_run(uri, parent, "no trial finished")
        return result
    result["best"] = _register_best(spec, finished, uri, parent, name, summary, log)
    return result


def _log_results(c, parent: str, spec: TunedJobSpec, rows: list[dict], table: str) -> None:
    """The results table and the metric plot, to the sweep's parent run."""
    t, fields = spec.tune, list(spec.tune.space)
    logs = [f for f, d in t.space.items() if "loguniform" in d]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sweep_results.md").write_text(table + "\n")
        c.log_artifact(parent, str(Path(tmp) / "sweep_results.md"))
        c.log_artifact(
            parent, str(metric_png(rows, fields, t.metric, spec.train.max_steps, Path(tmp) / "sweep.png", logs))
        )


def _register_best(
    spec: TunedJobSpec, finished: list[dict], uri: str, parent: str, name: str, summary: dict, log
) -> dict[str, Any]:
    """The best finished trial's adapter registered, the parent run ended with the sweep's summary."""
    from pipelines import tracking
    from pipelines.spec import storage_dir

    t, fields = spec.tune, list(spec.tune.space)
    c = tracking.client(uri)
    best = (min if t.mode == "min" else max)(finished, key=lambda r: r[t.metric])
    best_spec = validate(trial_raw(spec.model_dump(mode="json", exclude={"tune"}), {f: best[f] for f in fields}))
    reg = register_trial(best_spec, best, uri, Path(storage_dir(spec)) / name / "best_adapter", log)
    c.log_batch(parent, metrics=metric_batch({f"best_{t.metric}": best[t.metric], **summary}))
    c.set_tag(parent, "raypeft.best_trial", best["trial"])
    c.set_tag(parent, "raypeft.best_model", f"models:/{reg['registered_model']}/{reg['version']}")
    c.set_terminated(parent, "FINISHED")
    best_record = {
        "trial": best["trial"],
        "config": {f: best[f] for f in fields},
        t.metric: best[t.metric],
        "adapter_dir": str(Path(storage_dir(spec)) / name / "best_adapter"),
        **reg,
    }
    log(
        f"[raypeft] best trial {best['trial']}: {t.metric} {best[t.metric]:.4f} with "
        + ", ".join(f"{f}={_fmt(best[f])}" for f in fields)
        + f"; {summary['stopped_early']} of {summary['trials']} trials stopped early, {summary['total_steps']} of "
        f"{summary['full_grid_steps']} steps trained"
    )
    return best_record


def metric_batch(d: dict[str, float]):
    """MLflow ``Metric``s at step 0 for the finite numbers in ``d`` (one ``log_batch``)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in d.items() if isinstance(v, (int, float)) and math.isfinite(v)]

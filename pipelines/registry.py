"""Promotion through the MLflow registry: an evaluation gate, alias history, rollback.

* ``evaluate_versions`` scores the candidate and the alias's current holder on the same eval
  set with the same metric, in one Ray task.
* ``gate_decision`` (pure) says whether the candidate clears the gate: at least the baseline
  plus a margin (``mode: max``; at most baseline − margin for ``min``) and the absolute bound.
* ``promote`` records both results (an MLflow run, and ``validation_status`` plus the figures as
  tags on the version) and moves the alias only when the gate passes, or when forced (recorded
  as ``forced``). Each move is appended to the alias's history, a JSON tag on the registered
  model; ``rollback`` moves the alias back to the previous holder in that history.
* Moves of one alias are serialized by a file lock beside the tracking store, so two racing
  promotions leave the alias on one of the two versions with the history in the same order.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipelines.spec import DataSpec
from pipelines.specbase import SEED_MAX, Float, Int, Section, read_yaml, validate_spec

PROMOTIONS_EXPERIMENT = "raypeft-promotions"


class Gate(Section):
    """The evaluation gate (a YAML file for ``raypeft promote --gate``)."""

    metric: Literal["eval_loss", "exact_match"] = Field("eval_loss", description="Metric compared on the eval set.")
    mode: Literal["min", "max"] = Field(
        "min", description="`min`: lower is better (eval_loss); `max`: higher is better."
    )
    margin: Float = Field(
        0.0, ge=0, le=1e6, description="The candidate must beat the current holder by at least this much."
    )
    bound: Float | None = Field(None, description="Absolute bound: a ceiling for `min`, a floor for `max`.")
    data: DataSpec = Field(
        default_factory=DataSpec, description="Eval data (the `data` section of a job spec; its eval split is used)."
    )
    seed: Int = Field(42, ge=0, le=SEED_MAX, description="Seed of the held-out split (as in the job spec).")


def load_gate(path: str | None) -> Gate:
    return validate_spec(Gate, read_yaml(path, "gate") if path else {}, source="gate")


def gate_decision(gate: Gate, candidate: float, baseline: float | None) -> tuple[bool, list[str]]:
    """(passed, reasons). Pure."""
    reasons = []
    better = (lambda a, b: a >= b) if gate.mode == "max" else (lambda a, b: a <= b)
    if gate.bound is not None and not better(candidate, gate.bound):
        word = "below the floor" if gate.mode == "max" else "above the ceiling"
        reasons.append(f"{gate.metric} {candidate:.4f} is {word} {gate.bound}")
    if baseline is not None:
        need = baseline + gate.margin if gate.mode == "max" else baseline - gate.margin
        if not better(candidate, need):
            reasons.append(
                f"{gate.metric} {candidate:.4f} does not beat the current holder's {baseline:.4f} "
                f"by the margin {gate.margin} (needs {'≥' if gate.mode == 'max' else '≤'} {need:.4f})"
            )
    return not reasons, reasons


# --------------------------------------------------------------------------- evaluation (one Ray task)


def _evaluate(gate: Gate, uris: dict[str, str], tracking_uri: str) -> dict[str, dict[str, float]]:
    import torch
    from peft import PeftModel

    from pipelines import data as D
    from pipelines.adapters import load_base_as_trained, resolve
    from pipelines.evaluate import eval_loss, task_score

    out = {}
    for label, uri in uris.items():
        src = resolve(uri, tracking_uri)
        base, tok, _ = load_base_as_trained(src)
        model = PeftModel.from_pretrained(base, str(src)).eval()
        _, records = D.train_eval_records(gate.data, gate.seed)
        examples = D.encode_all(records, gate.data, tok, packing=False)
        with torch.no_grad():
            scores = eval_loss(model, examples, 8, tok.pad_token_id, torch.device("cpu"))
            if gate.data.task != "none":
                scores.update(
                    {
                        k: v
                        for k, v in task_score(
                            model,
                            tok,
                            records,
                            gate.data.format,
                            gate.data.task,
                            gate.data.eval_task_samples,
                            torch.device("cpu"),
                        ).items()
                        if not k.startswith("_")
                    }
                )
        out[label] = scores
    return out


def evaluate_versions(gate: Gate, uris: dict[str, str], tracking_uri: str) -> dict[str, dict[str, float]]:
    """Score every ``label → models:/...`` on the gate's eval set, together, in one Ray task."""
    import ray

    from cluster.connect import init_ray

    init_ray(log_to_driver=False)
    return ray.get(ray.remote(num_cpus=1)(_evaluate).remote(gate, uris, tracking_uri))


# --------------------------------------------------------------------------- registry state


def _client(uri: str):
    from pipelines.tracking import client

    return client(uri)


def _history_tag(alias: str) -> str:
    return f"raypeft.alias_history.{alias}"


def history(uri: str, name: str, alias: str) -> list[dict[str, Any]]:
    tags = _client(uri).get_registered_model(name).tags
    return json.loads(tags.get(_history_tag(alias), "[]"))


def _lock(uri: str, name: str, alias: str):
    from filelock import FileLock

    from pipelines.tracking import raypeft_home

    d = raypeft_home() / "locks"
    d.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{uri}|{name}|{alias}".encode()).hexdigest()[:24]
    return FileLock(str(d / f"alias-{key}.lock"), timeout=120)


def holder(uri: str, name: str, alias: str) -> str | None:
    try:
        return str(_client(uri).get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - no such alias yet
        return None


def _move(uri: str, name: str, alias: str, version: str, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Set the alias and append to its history, under the alias lock. Returns the new history."""
    c = _client(uri)
    with _lock(uri, name, alias):
        hist = history(uri, name, alias)
        prev = holder(uri, name, alias)
        if prev is not None and (not hist or hist[-1]["version"] != prev):  # an alias set outside raypeft
            hist.append({"version": prev, "at": time.time(), "by": "external"})
        hist.append({"version": str(version), "at": time.time(), **entry})
        c.set_registered_model_alias(name, alias, str(version))
        c.set_registered_model_tag(name, _history_tag(alias), json.dumps(hist[-100:]))
    return hist


def promote(
    uri: str, name: str, version: str, alias: str, gate: Gate, force: bool = False, log=print
) -> dict[str, Any]:
    """Evaluate, record, and move ``alias`` to ``version`` if the gate passes (or ``force``)."""
    c = _client(uri)
    c.get_model_version(name, str(version))  # raises for a missing version
    current = holder(uri, name, alias)
    uris = {"candidate": f"models:/{name}/{version}"}
    if current is not None and current != str(version):
        uris["baseline"] = f"models:/{name}/{current}"
    log(f"[raypeft] evaluating {', '.join(f'{k} {v}' for k, v in uris.items())} on the gate's eval set")
    scores = evaluate_versions(gate, uris, uri)
    cand = scores["candidate"][gate.metric]
    base = scores.get("baseline", {}).get(gate.metric)
    passed, reasons = gate_decision(gate, cand, base)
    status = "passed" if passed else ("forced" if force else "failed")

    from pipelines.tracking import experiment_id

    run = c.create_run(
        experiment_id(uri, PROMOTIONS_EXPERIMENT),
        run_name=f"promote-{name}-v{version}-{alias}",
        tags={
            "raypeft.model": name,
            "raypeft.version": str(version),
            "raypeft.alias": alias,
            "raypeft.baseline_version": current or "none",
            "validation_status": status,
        },
    )
    for label, vals in scores.items():
        for k, v in vals.items():
            c.log_metric(run.info.run_id, f"{label}_{k}", float(v))
    c.log_param(run.info.run_id, "gate", gate.model_dump_json())
    c.set_terminated(run.info.run_id, "FINISHED")
    for k, v in {
        "validation_status": status,
        f"validation.{gate.metric}": f"{cand:.6g}",
        "validation.baseline_version": current or "none",
        "validation.run_id": run.info.run_id,
    }.items():
        c.set_model_version_tag(name, str(version), k, v)
    result = {
        "model": name,
        "version": str(version),
        "alias": alias,
        "previous": current,
        "status": status,
        "candidate": scores["candidate"],
        "baseline": scores.get("baseline"),
        "reasons": reasons,
        "run_id": run.info.run_id,
        "moved": passed or force,
    }
    if passed or force:
        _move(
            uri, name, alias, str(version), {"by": "promote", "forced": force and not passed, "run_id": run.info.run_id}
        )
    return result


def rollback(uri: str, name: str, alias: str) -> dict[str, Any]:
    """Move ``alias`` back to the previous holder in its history (and drop the undone entry)."""
    c = _client(uri)
    with _lock(uri, name, alias):
        hist = history(uri, name, alias)
        current = holder(uri, name, alias)
        if len(hist) < 2:
            raise ValueError(
                f"{name}@{alias} has no previous holder to roll back to (history: {[h['version'] for h in hist]})"
            )
        undone = hist.pop()
        target = hist[-1]["version"]
        c.set_registered_model_alias(name, alias, target)
        c.set_registered_model_tag(name, _history_tag(alias), json.dumps(hist))
        c.set_model_version_tag(name, undone["version"], f"raypeft.rolled_back.{alias}", str(time.time()))
    return {"model": name, "alias": alias, "from": current, "to": target}


# --------------------------------------------------------------------------- listing


LINEAGE = (
    "base_model",
    "base_model_revision",
    "base_model_hash",
    "base_model_source",
    "dataset",
    "dataset_hash",
    "method",
    "quantization",
    "raypeft.run_id",
    "raypeft.source",
    "raypeft.parents",
    "raypeft.combination",
)


def list_models(uri: str) -> list[dict[str, Any]]:
    c = _client(uri)
    out = []
    for m in c.search_registered_models():
        versions = c.search_model_versions(f"name='{m.name}'")
        out.append(
            {
                "name": m.name,
                "versions": len(versions),
                "latest": max((int(v.version) for v in versions), default=None),
                "aliases": dict(sorted((a, str(v)) for a, v in (m.aliases or {}).items())),
            }
        )
    return out


def show(uri: str, ref: str) -> dict[str, Any]:
    """``NAME``, ``NAME@alias`` or ``NAME/version`` → versions with aliases, metrics and lineage."""
    c = _client(uri)
    if "@" in ref:
        name, alias = ref.split("@", 1)
        versions = [c.get_model_version_by_alias(name, alias)]
    elif "/" in ref:
        name, v = ref.split("/", 1)
        versions = [c.get_model_version(name, v)]
    else:
        name = ref
        versions = sorted(c.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    model = c.get_registered_model(name)
    aliases_of: dict[str, list[str]] = {}
    for a, v in (model.aliases or {}).items():
        aliases_of.setdefault(str(v), []).append(a)
    rows = []
    for v in versions:
        tags = v.tags or {}
        rows.append(
            {
                "version": str(v.version),
                "aliases": sorted(aliases_of.get(str(v.version), [])),
                "validation_status": tags.get("validation_status", "unvalidated"),
                "metrics": {k[len("metric.") :]: float(x) for k, x in tags.items() if k.startswith("metric.")},
                "lineage": {k: tags[k] for k in LINEAGE if k in tags},
                "run_id": v.run_id,
                "source": v.source,
                "created": v.creation_timestamp,
            }
        )
    if len(rows) == 1 and rows[0]["run_id"]:  # one version: the job spec that trained it, from its run
        try:
            rows[0]["spec"] = Path(c.download_artifacts(rows[0]["run_id"], "spec.yaml")).read_text()
        except Exception:  # noqa: BLE001 - exports and combinations have no training spec
            pass
    hist = {
        k[len("raypeft.alias_history.") :]: json.loads(val)
        for k, val in (model.tags or {}).items()
        if k.startswith("raypeft.alias_history.")
    }
    return {"name": name, "versions": rows, "alias_history": hist}

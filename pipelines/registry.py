"""Promotion through the MLflow registry: an evaluation gate, alias history, rollback.

* ``evaluate_versions`` scores the candidate and the alias's current holder on the same eval
  set with the same metric, in one Ray task.
* ``gate_decision`` (pure) says whether the candidate clears the gate: at least the baseline
  plus a margin (``mode: max``; at most baseline − margin for ``min``) and the absolute bound.
* ``promote`` records both results (an MLflow run, and ``validation_status`` plus the figures as
  tags on the version) and moves the alias only when the gate passes, or when forced (recorded
  as ``forced``). Each move is appended to the alias's history, a JSON tag on the registered
  model; ``rollback`` moves the alias back to the previous holder in that history.
* Moves of one alias are serialized by a lease kept on the tracking server (``alias_lease``), and a
  gated move is a compare-and-set against the holder it was evaluated against, so racing promotions,
  from one machine or several, never leave the alias on a candidate that lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import time
import uuid
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


def _lease_tag(alias: str) -> str:
    return f"raypeft.lease.{alias}"


class AliasBusy(RuntimeError):
    """Another promotion or rollback of the same alias held its lease for the whole wait."""


@contextlib.contextmanager
def alias_lease(uri: str, name: str, alias: str, ttl_s: float = 120.0, wait_s: float = 300.0, settle_s: float = 1.0):
    """Hold ``name@alias`` exclusively across processes and machines, through the tracking server itself.

    The lease is a registered-model tag ``raypeft.lease.ALIAS`` holding an owner id and an expiry. To take
    it: wait until it is absent or expired, write ours, wait ``settle_s``, and re-read: whoever wrote last
    owns it, and a writer that reads another owner backs off and waits again. An expired lease (a holder
    that died) is taken over. No local file is involved, so promotions from several machines against one
    tracking server are serialized.
    """
    c = _client(uri)
    tag = _lease_tag(alias)
    me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.time() + wait_s
    while True:
        held = json.loads(c.get_registered_model(name).tags.get(tag, "null") or "null")
        if held is None or held.get("expires", 0) < time.time():
            c.set_registered_model_tag(name, tag, json.dumps({"owner": me, "expires": time.time() + ttl_s}))
            time.sleep(settle_s)
            held = json.loads(c.get_registered_model(name).tags.get(tag, "null") or "null")
            if held and held.get("owner") == me:
                break
        if time.time() > deadline:
            raise AliasBusy(f"{name}@{alias} stayed leased by {held.get('owner') if held else '?'} for {wait_s:.0f} s")
        time.sleep(0.2 + random.random() * 0.3)
    try:
        yield me
    finally:
        now = json.loads(c.get_registered_model(name).tags.get(tag, "null") or "null")
        if now and now.get("owner") == me:
            c.delete_registered_model_tag(name, tag)


def _still_ours(c, name: str, alias: str, me: str) -> None:
    """Right before a write under the lease: it must still be ours (not expired and taken over)."""
    held = json.loads(c.get_registered_model(name).tags.get(_lease_tag(alias), "null") or "null")
    if not held or held.get("owner") != me:
        raise AliasBusy(f"lost the lease on {name}@{alias} to {held.get('owner') if held else 'nobody'}; nothing moved")


def holder(uri: str, name: str, alias: str) -> str | None:
    try:
        return str(_client(uri).get_model_version_by_alias(name, alias).version)
    except Exception:  # noqa: BLE001 - no such alias yet
        return None


def _move(uri: str, name: str, alias: str, version: str, entry: dict[str, Any], expected: str | None = None,
          check: bool = False) -> bool:  # fmt: skip
    """Compare-and-set: under the alias lease, move the alias to ``version`` and append to its history, but
    only if (with ``check``) the holder is still ``expected``, the one the candidate was evaluated against.
    Returns whether it moved."""
    c = _client(uri)
    with alias_lease(uri, name, alias) as me:
        prev = holder(uri, name, alias)
        if check and prev != expected:
            return False
        _still_ours(c, name, alias, me)
        hist = history(uri, name, alias)
        if prev is not None and (not hist or hist[-1]["version"] != prev):  # an alias set outside raypeft
            hist.append({"version": prev, "at": time.time(), "by": "external"})
        hist.append({"version": str(version), "at": time.time(), **entry})
        c.set_registered_model_alias(name, alias, str(version))
        c.set_registered_model_tag(name, _history_tag(alias), json.dumps(hist[-100:]))
    return True


def promote(
    uri: str,
    name: str,
    version: str,
    alias: str,
    gate: Gate,
    force: bool = False,
    log=print,
    evaluate=None,
    max_rounds: int = 3,
) -> dict[str, Any]:
    """Evaluate ``version`` against the alias's holder, record it, and move ``alias`` to it if the gate passes
    (or ``force``).

    The move is a compare-and-set: if another promotion moved the alias while this one was evaluating, the
    candidate is evaluated again against the new holder, up to ``max_rounds`` times, so the alias can never
    end on a candidate that lost to the version it displaced. ``evaluate(gate, uris, uri)`` scores
    ``label → models:/`` URIs (default: ``evaluate_versions`` on a Ray task)."""
    c = _client(uri)
    c.get_model_version(name, str(version))  # raises for a missing version
    evaluate = evaluate or evaluate_versions
    for round_ in range(1, max_rounds + 1):
        current = holder(uri, name, alias)
        result = _evaluate_and_record(c, uri, name, str(version), alias, gate, current, force, log, evaluate)
        if not result["moved"]:
            return result
        entry = {"by": "promote", "forced": result["status"] == "forced", "run_id": result["run_id"]}
        if _move(uri, name, alias, str(version), entry, expected=current, check=not force):
            return result
        log(f"[raypeft] {name}@{alias} moved from {current or 'nothing'} to {holder(uri, name, alias)} while "
            f"version {version} was evaluated; evaluating again against the new holder (round {round_ + 1})")  # fmt: skip
    result.update(moved=False, status="failed", reasons=[f"{name}@{alias} kept moving during {max_rounds} evaluations"])
    c.set_model_version_tag(name, str(version), "validation_status", "failed")
    return result


def _evaluate_and_record(c, uri, name, version, alias, gate, current, force, log, evaluate) -> dict[str, Any]:
    """One evaluation of ``version`` against ``current``: scores, the gate's decision, a promotion run in
    MLflow and the validation tags on the version. Moves nothing."""
    uris = {"candidate": f"models:/{name}/{version}"}
    if current is not None and current != version:
        uris["baseline"] = f"models:/{name}/{current}"
    log(f"[raypeft] evaluating {', '.join(f'{k} {v}' for k, v in uris.items())} on the gate's eval set")
    scores = evaluate(gate, uris, uri)
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
            "raypeft.version": version,
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
        c.set_model_version_tag(name, version, k, v)
    return {
        "model": name,
        "version": version,
        "alias": alias,
        "previous": current,
        "status": status,
        "candidate": scores["candidate"],
        "baseline": scores.get("baseline"),
        "reasons": reasons,
        "run_id": run.info.run_id,
        "moved": passed or force,
    }


def rollback(uri: str, name: str, alias: str) -> dict[str, Any]:
    """Move ``alias`` back to the previous holder in its history (and drop the undone entry)."""
    c = _client(uri)
    with alias_lease(uri, name, alias) as me:
        hist = history(uri, name, alias)
        current = holder(uri, name, alias)
        _still_ours(c, name, alias, me)
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

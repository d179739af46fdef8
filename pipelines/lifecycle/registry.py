"""Promotion through the MLflow registry: an evaluation gate, alias history, rollback.

* ``evaluate_versions`` scores the candidate and the alias's current holder on the same eval
  set with the same metric, together: in one Ray task on a cluster, in this process without one.
* ``gate_decision`` (pure) says whether the candidate clears the gate: at least the baseline
  plus a margin (``mode: max``; at most baseline − margin for ``min``) and the absolute bound.
* ``promote`` records both results (an MLflow run with the verdict and the move's outcome, and
  ``validation.ALIAS.*`` tags on the version, written with the move) and moves the alias only when
  the gate passes, or when forced (recorded as ``forced``). Each move is appended to the alias's history, a JSON tag on the registered
  model; ``rollback`` moves the alias back to the previous holder in that history.
* Moves of one alias are serialized by a lease whose tickets are versions of a registered model on the
  tracking server (``alias_lease``: taking one is atomic in the store), and a gated move is a
  compare-and-set against the holder it was evaluated against, so racing promotions, from one
  machine or several, do not leave the alias on a candidate that lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from pipelines.spec import SEED_MAX, DataSpec, Float, Int, Section, read_yaml, validate_spec

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


# --------------------------------------------------------------------------- evaluation


def _evaluate(gate: Gate, uris: dict[str, str], tracking_uri: str) -> dict[str, dict[str, float]]:
    import torch
    from peft import PeftModel

    from pipelines import data as D
    from pipelines.lifecycle.adapters import load_base_as_trained, local_adapter
    from pipelines.train import eval_loss, task_score

    out = {}
    for label, uri in uris.items():
        with local_adapter(uri, tracking_uri) as src:
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
    """Score every ``label → models:/...`` on the gate's eval set, together: in one Ray task on the cluster
    in ``RAY_ADDRESS`` (``ray job submit``, or a client of a cluster with the GPUs), else in this process. A
    local Ray cluster started for that one task cost more than the evaluation: a gated ``raypeft promote`` of
    the tiny test model took 19.4 s (21 CPU-s) with one and 10.6 s (10 CPU-s) without, on 2 cores."""
    if not os.environ.get("RAY_ADDRESS"):
        return _evaluate(gate, uris, tracking_uri)
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


LEASE_PREFIX = "raypeft-lease."


def lease_model(name: str, alias: str) -> str:
    """The registered model whose versions are the tickets of ``name@alias``'s lease."""
    return f"{LEASE_PREFIX}{name}.{alias}"


class AliasBusy(RuntimeError):
    """Another promotion or rollback of the same alias held its lease for the whole wait, or this one lost
    its lease (it stalled for longer than the lease's time to live and another took it over)."""


class RegistryError(RuntimeError):
    """The registry failed to answer a read the gate depends on (unreachable, 5xx, 403): nothing moved."""


def _not_found(e: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(e, MlflowException) and e.error_code == "RESOURCE_DOES_NOT_EXIST"


class Lease:
    """A ticket in ``name@alias``'s queue, kept alive by a heartbeat while it waits and while it is held.

    ``ticket`` (the lease model's version number) is the fencing token: ``check()`` raises ``AliasBusy``
    once the ticket is gone, which happens only if this process stopped beating for ``ttl_s`` and a waiter
    took the lease over."""

    def __init__(self, c, lock: str, ticket: str, owner: str, beat_s: float):
        self.c, self.lock, self.ticket, self.owner = c, lock, ticket, owner
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(beat_s,), daemon=True, name=f"lease-{lock}")
        self._thread.start()

    def _beat(self, every: float) -> None:
        n = 0
        while not self._stop.wait(every):
            n += 1
            try:
                self.c.set_model_version_tag(self.lock, self.ticket, "beat", str(n))
            except Exception as e:  # noqa: BLE001 - a failed beat is retried at the next one
                if _not_found(e):
                    self._lost.set()
                    return

    def check(self) -> None:
        """Right before a write under the lease: the ticket must still be there."""
        try:
            self.c.get_model_version(self.lock, self.ticket)
            gone = self._lost.is_set()
        except Exception as e:
            if not _not_found(e):
                raise
            gone = True
        if gone:
            raise AliasBusy(f"lost the lease {self.lock} (ticket {self.ticket}) after stalling; nothing moved")

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):  # gone already: taken over, or removed by a waiter
            self.c.delete_model_version(self.lock, self.ticket)


ANCHOR_TAG = "raypeft.lease_anchor"


def _ticket_source(c, uri: str, lock: str, what: str) -> dict[str, str]:
    """The lease model (created the first time) and what its tickets name as their source. A tracking server
    registers a version only with a source it can resolve, and a ticket has no artifacts of its own: there,
    the lease's own LoggedModel, made once and kept in a tag (two first-timers racing may each make one;
    either serves). A database store takes any string."""
    try:
        c.create_registered_model(lock, description=f"raypeft's promotion lease of {what}: one version per ticket")
    except Exception as e:  # noqa: BLE001 - created by an earlier lease: the expected case
        if getattr(e, "error_code", None) != "RESOURCE_ALREADY_EXISTS":
            raise
    if not uri.startswith(("http://", "https://")):
        return {"source": f"raypeft-lease:{lock}"}
    anchor = (c.get_registered_model(lock).tags or {}).get(ANCHOR_TAG)
    if not anchor:
        from pipelines.tracking import experiment_id

        anchor = c.create_logged_model(experiment_id(uri, PROMOTIONS_EXPERIMENT), name="raypeft-lease").model_id
        c.set_registered_model_tag(lock, ANCHOR_TAG, anchor)
    return {"source": f"models:/{anchor}", "model_id": anchor}


@contextlib.contextmanager
def alias_lease(uri: str, name: str, alias: str, ttl_s: float = 60.0, wait_s: float = 300.0, log=print):
    """Hold ``name@alias`` exclusively across processes and machines, through the tracking server itself.

    A ticket is a new version of the registered model ``raypeft-lease.NAME.ALIAS`` (its source: the lease's
    source: ``_ticket_source``): the store gives each version a unique, increasing number in one
    transaction, so taking a ticket is atomic. The lowest ticket
    holds the lease; the others wait in order. Every ticket's heartbeat bumps a tag every ``ttl_s / 4``;
    a waiter that sees a ticket ahead of it not beat for ``ttl_s`` of its own clock deletes it (its holder
    died or stalled), so no two machines' clocks are ever compared. The holder deletes its own ticket on
    release. Yields the ``Lease``; call ``check()`` right before each write.
    """
    c = _client(uri)
    lock = lease_model(name, alias)
    source = _ticket_source(c, uri, lock, f"{name}@{alias}")
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    v = c.create_model_version(lock, **source, tags={"owner": owner, "beat": "0"}, await_creation_for=0)
    lease = Lease(c, lock, str(v.version), owner, ttl_s / 4)
    seen: dict[str, tuple[str | None, float]] = {}  # ticket → (its last beat, when this process saw it change)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            ahead = [t for t in c.search_model_versions(f"name='{lock}'") if int(t.version) < int(lease.ticket)]
            if not ahead:
                break
            now = time.monotonic()
            for t in ahead:
                beat = (t.tags or {}).get("beat")
                if seen.get(t.version, (None, 0.0))[0] != beat or t.version not in seen:
                    seen[t.version] = (beat, now)
                elif now - seen[t.version][1] > ttl_s:
                    log(f"[raypeft] {name}@{alias}: taking over the lease of {(t.tags or {}).get('owner')} "
                        f"(ticket {t.version}), silent for {ttl_s:.0f} s")  # fmt: skip
                    with contextlib.suppress(Exception):  # another waiter removed it first
                        c.delete_model_version(lock, t.version)
            if now > deadline:
                owners = ", ".join(f"{(t.tags or {}).get('owner')} (ticket {t.version})" for t in ahead)
                raise AliasBusy(f"{name}@{alias} stayed leased by {owners} for {wait_s:.0f} s")
            time.sleep(0.1 + random.random() * 0.2)
        lease.check()
        yield lease
    finally:
        lease.release()


def holder(uri: str, name: str, alias: str) -> str | None:
    """The version ``name@alias`` points at, or None when the registry says the model has no such alias.
    Any failed read (unreachable server, 5xx after retries, 403) raises ``RegistryError``: a gate must
    never take a failed read for an empty baseline."""
    try:
        aliases = _client(uri).get_registered_model(name).aliases or {}
    except Exception as e:
        if _not_found(e):
            raise
        raise RegistryError(f"the registry at {uri} failed to say which version {name}@{alias} is: {e}") from e
    v = aliases.get(alias)
    return None if v is None else str(v)


def verdict_tags(alias: str, metric: str, status: str, score: float, baseline: str | None, run_id: str) -> dict:
    """The version's record of one gate verdict for ``alias`` (each alias keeps its own)."""
    return {
        f"validation.{alias}.status": status,
        f"validation.{alias}.{metric}": f"{score:.6g}",
        f"validation.{alias}.baseline_version": baseline or "none",
        f"validation.{alias}.run_id": run_id,
    }


def _move(uri: str, name: str, alias: str, version: str, entry: dict[str, Any], expected: str | None = None,
          check: bool = False, tags: dict[str, str] | None = None) -> bool:  # fmt: skip
    """Compare-and-set: under the alias lease, move the alias to ``version``, append to its history and write
    ``tags`` on the version, but only if (with ``check``) the holder is still ``expected``, the one the
    candidate was evaluated against. The lease's ticket is checked before each write and kept in the
    history entry. Returns whether it moved; if not, nothing was written."""
    c = _client(uri)
    with alias_lease(uri, name, alias) as lease:
        prev = holder(uri, name, alias)
        if check and prev != expected:
            return False
        hist = history(uri, name, alias)
        if prev is not None and (not hist or hist[-1]["version"] != prev):  # an alias set outside raypeft
            hist.append({"version": prev, "at": time.time(), "by": "external"})
        hist.append({"version": str(version), "at": time.time(), "lease": lease.ticket, **entry})
        lease.check()
        c.set_registered_model_alias(name, alias, str(version))
        lease.check()
        c.set_registered_model_tag(name, _history_tag(alias), json.dumps(hist[-100:]))
        for k, v in (tags or {}).items():
            c.set_model_version_tag(name, str(version), k, v)
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
    end on a candidate that lost to the version it displaced. The version's ``validation.ALIAS.*`` tags are
    written with the move, under the lease, or with a refusal; a move that does not happen leaves them as
    they were. Each round's promotion run records the gate's verdict and the move's outcome.
    ``evaluate(gate, uris, uri)`` scores ``label → models:/`` URIs (default: ``evaluate_versions``)."""
    c = _client(uri)
    c.get_model_version(name, str(version))  # raises for a missing version
    evaluate = evaluate or evaluate_versions
    for round_ in range(1, max_rounds + 1):
        current = holder(uri, name, alias)
        result = _evaluate_and_record(c, uri, name, str(version), alias, gate, current, force, log, evaluate)
        tags = verdict_tags(alias, gate.metric, result["status"], result["candidate"][gate.metric], current,
                            result["run_id"])  # fmt: skip
        if result["status"] == "failed":
            for k, v in tags.items():
                c.set_model_version_tag(name, str(version), k, v)
            _outcome(c, result["run_id"], "refused")
            return result
        entry = {"by": "promote", "forced": result["status"] == "forced", "run_id": result["run_id"]}
        try:
            moved = _move(uri, name, alias, str(version), entry, expected=current, check=not force, tags=tags)
        except AliasBusy as e:
            _outcome(c, result["run_id"], f"not moved: {e}")
            raise
        if moved:
            _outcome(c, result["run_id"], "moved")
            return {**result, "moved": True}
        now = holder(uri, name, alias)
        _outcome(c, result["run_id"], f"not moved: {name}@{alias} moved from {current or 'nothing'} to {now}")
        log(f"[raypeft] {name}@{alias} moved from {current or 'nothing'} to {now} while version {version} was "
            f"evaluated; evaluating again against the new holder (round {round_ + 1})")  # fmt: skip
    return {**result, "moved": False, "reasons": [f"{name}@{alias} kept moving during {max_rounds} evaluations"]}


def _outcome(c, run_id: str, outcome: str) -> None:
    c.set_tag(run_id, "raypeft.outcome", outcome[:5000])


def _evaluate_and_record(c, uri, name, version, alias, gate, current, force, log, evaluate) -> dict[str, Any]:
    """One evaluation of ``version`` against ``current``: scores, the gate's decision and a promotion run in
    MLflow. Moves nothing and tags no version."""
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
            "raypeft.outcome": "pending",
        },
    )
    for label, vals in scores.items():
        for k, v in vals.items():
            c.log_metric(run.info.run_id, f"{label}_{k}", float(v))
    c.log_param(run.info.run_id, "gate", gate.model_dump_json())
    c.set_terminated(run.info.run_id, "FINISHED")
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
        "moved": False,
    }


def rollback(uri: str, name: str, alias: str) -> dict[str, Any]:
    """Move ``alias`` back to the previous holder in its history (and drop the undone entry)."""
    c = _client(uri)
    with alias_lease(uri, name, alias) as lease:
        hist = history(uri, name, alias)
        current = holder(uri, name, alias)
        if len(hist) < 2:
            raise ValueError(
                f"{name}@{alias} has no previous holder to roll back to (history: {[h['version'] for h in hist]})"
            )
        undone = hist.pop()
        target = hist[-1]["version"]
        lease.check()
        c.set_registered_model_alias(name, alias, target)
        lease.check()
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
        if m.name.startswith(LEASE_PREFIX):  # a promotion lease's tickets, not a model
            continue
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
                "validation": {  # the gate's last verdict for each alias it was judged for
                    k[len("validation.") : -len(".status")]: x
                    for k, x in tags.items()
                    if k.startswith("validation.") and k.endswith(".status")
                },
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

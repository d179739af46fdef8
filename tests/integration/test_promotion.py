"""Promotion behind an evaluation gate on a real SQLite MLflow registry, evaluated on a local Ray cluster."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import yaml

from cluster.connect import init_ray
from pipelines.lifecycle import registry
from tests.unit.test_toolbox import _trained_adapter

pytestmark = pytest.mark.integration


def test_gate_decision_is_pure_and_explains_itself():
    g = registry.Gate(metric="exact_match", mode="max", margin=0.02, bound=0.5)
    assert registry.gate_decision(g, 0.80, 0.75) == (True, [])
    ok, why = registry.gate_decision(g, 0.76, 0.75)
    assert not ok and "does not beat" in why[0] and "0.7700" in why[0]
    ok, why = registry.gate_decision(g, 0.40, None)
    assert not ok and "below the floor 0.5" in why[0]
    assert registry.gate_decision(registry.Gate(metric="eval_loss", mode="min"), 1.0, 1.2)[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir, chat_data):

    import ray

    from pipelines import tracking

    home = tmp_path_factory.mktemp("promo-home")
    mp = pytest.MonkeyPatch()  # undone at teardown: the session's own isolated home comes back
    mp.setenv("RAYPEFT_HOME", str(home))
    uri = f"sqlite:///{home / 'mlflow.db'}"
    d = tmp_path_factory.mktemp("promo-adapters")
    dirs = [
        _trained_adapter(tiny_model_dir, chat_data, d / "v1", steps=4),
        _trained_adapter(tiny_model_dir, chat_data, d / "v2", steps=1, args={"init_lora_weights": False}),
        _trained_adapter(tiny_model_dir, chat_data, d / "v3", steps=12),
    ]
    for i, a in enumerate(dirs, 1):
        tracking.register_directory(
            uri, str(a), "tiny-promo", f"train-v{i}", {"method": "lora", "dataset_hash": f"sha256:{i}"}
        )
    gate_path = d / "gate.yaml"
    gate_raw = {
        "metric": "eval_loss",
        "mode": "min",
        "margin": 0.0,
        "bound": 50.0,
        "data": {"train": str(chat_data), "format": "chat", "max_length": 64, "eval_fraction": 0.2},
    }
    gate_path.write_text(yaml.safe_dump(gate_raw))
    gate = registry.load_gate(str(gate_path))
    # the real ordering of the three versions on the gate's eval set decides what the gate must do
    losses = {
        v: registry._evaluate(gate, {"x": f"models:/tiny-promo/{v}"}, uri)["x"]["eval_loss"] for v in ("1", "2", "3")
    }
    best, mid, worst = sorted(losses, key=losses.get)
    assert losses[worst] - losses[best] > 0.01, losses
    ray.shutdown()
    init_ray(num_cpus=2, include_dashboard=False)
    yield {
        "uri": uri,
        "gate": gate,
        "gate_path": str(gate_path),
        "best": best,
        "mid": mid,
        "worst": worst,
        "losses": losses,
    }
    ray.shutdown()
    mp.undo()


def _cli(*args, capsys):
    from raypeft.cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_gate_accepts_better_refuses_worse_and_rollback_restores(setup, capsys):
    from mlflow import MlflowClient

    s, uri = setup, setup["uri"]
    c = MlflowClient(uri, registry_uri=uri)
    common = ("--gate", s["gate_path"], "--tracking-uri", uri)

    code, out, err = _cli("promote", "tiny-promo", "--version", s["mid"], *common, capsys=capsys)
    assert code == 0 and registry.holder(uri, "tiny-promo", "champion") == s["mid"], err

    code, out, err = _cli("promote", "tiny-promo", "--version", s["worst"], *common, capsys=capsys)
    assert code == 1 and "refused" in err and "does not beat" in err
    assert registry.holder(uri, "tiny-promo", "champion") == s["mid"]
    refused = json.loads(out.strip().splitlines()[-1])
    v = c.get_model_version("tiny-promo", s["worst"])
    assert v.tags["validation.champion.status"] == "failed"
    assert v.tags["validation.champion.baseline_version"] == s["mid"]
    assert v.tags["validation.champion.run_id"] == refused["run_id"]
    run = c.get_run(refused["run_id"])  # both results are in MLflow, measured in one run
    assert run.data.metrics["candidate_eval_loss"] == pytest.approx(s["losses"][s["worst"]], rel=1e-4)
    assert run.data.metrics["baseline_eval_loss"] == pytest.approx(s["losses"][s["mid"]], rel=1e-4)
    assert run.data.tags["validation_status"] == "failed" and run.data.tags["raypeft.outcome"] == "refused"

    code, out, err = _cli("promote", "tiny-promo", "--version", s["best"], *common, capsys=capsys)
    assert code == 0 and registry.holder(uri, "tiny-promo", "champion") == s["best"]
    assert c.get_model_version("tiny-promo", s["best"]).tags["validation.champion.status"] == "passed"
    moved = json.loads(out.strip().splitlines()[-1])
    assert c.get_run(moved["run_id"]).data.tags["raypeft.outcome"] == "moved"

    code, out, err = _cli("rollback", "tiny-promo", "--alias", "champion", "--tracking-uri", uri, capsys=capsys)
    assert code == 0 and registry.holder(uri, "tiny-promo", "champion") == s["mid"]

    code, out, err = _cli("models", "show", "tiny-promo@champion", "--tracking-uri", uri, capsys=capsys)
    shown = json.loads(out)
    assert shown["versions"][0]["version"] == s["mid"] and shown["versions"][0]["aliases"] == ["champion"]
    assert shown["versions"][0]["lineage"]["method"] == "lora"
    assert shown["versions"][0]["validation"] == {"champion": "passed"}
    assert [h["version"] for h in shown["alias_history"]["champion"]] == [s["mid"]]

    code, out, err = _cli("promote", "tiny-promo", "--version", s["worst"], "--force", *common, capsys=capsys)
    assert code == 0 and registry.holder(uri, "tiny-promo", "champion") == s["worst"]
    tags = c.get_model_version("tiny-promo", s["worst"]).tags
    assert tags["validation.champion.status"] == "forced"
    assert registry.history(uri, "tiny-promo", "champion")[-1]["forced"] is True

    code, out, err = _cli("models", "list", "--tracking-uri", uri, capsys=capsys)
    assert "tiny-promo" in out and f"@champion→{s['worst']}" in out
    assert registry.LEASE_PREFIX not in out  # the lease's tickets are not a model


def test_racing_promotions_leave_a_consistent_alias(setup):
    uri, gate = setup["uri"], setup["gate"]
    before = len(registry.history(uri, "tiny-promo", "race"))
    results = {}

    def go(v):
        results[v] = registry.promote(uri, "tiny-promo", v, "race", gate, force=True, log=lambda *_: None)

    threads = [threading.Thread(target=go, args=(v,)) for v in (setup["best"], setup["mid"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert set(results) == {setup["best"], setup["mid"]}
    final = registry.holder(uri, "tiny-promo", "race")
    hist = registry.history(uri, "tiny-promo", "race")
    assert hist[-1]["version"] == final  # the history ends where the alias is
    assert sorted(h["version"] for h in hist[before:]) == sorted([setup["best"], setup["mid"]])
    tickets = [int(h["lease"]) for h in hist[before:]]
    assert tickets[0] < tickets[1], hist  # the moves ran in the lease's ticket order, one at a time


def test_the_gate_evaluates_on_the_cluster_in_ray_address_and_without_one_here(setup, monkeypatch):
    """With ``RAY_ADDRESS`` (``ray job submit``, or a client of the cluster with the GPUs) the versions are
    scored in one Ray task on that cluster; without it, in this process, with no cluster started for it.
    Both give the gate's eval loss."""
    import ray

    real = registry._evaluate

    def where(gate, uris, uri):
        return {k: {**v, "pid": os.getpid()} for k, v in real(gate, uris, uri).items()}

    monkeypatch.setattr(registry, "_evaluate", where)
    uris = {"x": f"models:/tiny-promo/{setup['best']}"}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    here = registry.evaluate_versions(setup["gate"], uris, setup["uri"])["x"]
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)  # the module's cluster
    there = registry.evaluate_versions(setup["gate"], uris, setup["uri"])["x"]
    assert here["pid"] == os.getpid() and there["pid"] != os.getpid()
    assert here["eval_loss"] == pytest.approx(setup["losses"][setup["best"]], rel=1e-4)
    assert there["eval_loss"] == pytest.approx(here["eval_loss"], rel=1e-6)


def test_bad_promotions_exit_2(setup, capsys, tmp_path):
    code, _, err = _cli("promote", "tiny-promo", "--version", "99", "--tracking-uri", setup["uri"], capsys=capsys)
    assert code == 2 and "tiny-promo/99" in err
    bad_gate = tmp_path / "gate.yaml"
    bad_gate.write_text("metric: accuracy\nmode: up\n")
    code, _, err = _cli(
        "promote",
        "tiny-promo",
        "--version",
        "1",
        "--gate",
        str(bad_gate),
        "--tracking-uri",
        setup["uri"],
        capsys=capsys,
    )
    assert code == 2 and "metric" in err and "'accuracy'" in err and "mode" in err


@pytest.mark.parametrize("first", ["2", "3"])
def test_two_gated_promotions_racing_leave_the_alias_on_the_better_candidate(tmp_path, first):
    """Two gated promotions evaluated against the same holder at once: the alias move is a compare-and-set
    under a lease on the registry, so the one that moves second is evaluated again against the new holder.
    The alias ends on the better candidate whichever finishes first, and the tags tell the truth."""
    from mlflow import MlflowClient

    from pipelines import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    files = tmp_path / "files"
    files.mkdir()
    (files / "adapter_config.json").write_text("{}")
    for v in ("1", "2", "3"):
        tracking.register_directory(uri, str(files), "racer", f"v{v}", {"v": v})
    c = MlflowClient(uri, registry_uri=uri)
    c.set_registered_model_alias("racer", "champion", "1")
    loss = {"1": 0.9, "2": 0.5, "3": 0.4}  # 3 is the better candidate
    delay = {first: 0.2, ({"2", "3"} - {first}).pop(): 2.5}
    start = threading.Barrier(2)

    def evaluate(gate, uris, _uri):
        version = uris["candidate"].rsplit("/", 1)[1]
        if "baseline" in uris and uris["baseline"].endswith("/1"):  # the first round: both against v1
            start.wait(timeout=30)
            time.sleep(delay[version])
        return {k: {"eval_loss": loss[u.rsplit("/", 1)[1]]} for k, u in uris.items()}

    results: dict[str, dict] = {}
    gate = registry.Gate()
    threads = [
        threading.Thread(
            target=lambda v=v: results.setdefault(
                v, registry.promote(uri, "racer", v, "champion", gate, log=lambda *_: None, evaluate=evaluate)
            )
        )
        for v in ("2", "3")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert registry.holder(uri, "racer", "champion") == "3"
    tags = {v: c.get_model_version("racer", v).tags for v in ("2", "3")}
    assert tags["3"]["validation.champion.status"] == "passed"
    hist = [h["version"] for h in registry.history(uri, "racer", "champion")]
    if first == "2":  # 2 moved first, 3 was evaluated again against 2 and displaced it
        assert results["2"]["moved"] and results["3"]["moved"] and results["3"]["previous"] == "2"
        assert tags["3"]["validation.champion.baseline_version"] == "2" and hist[-2:] == ["2", "3"]
    else:  # 3 moved first; 2 was evaluated again against 3 and refused
        assert not results["2"]["moved"] and results["2"]["previous"] == "3"
        assert tags["2"]["validation.champion.status"] == "failed"
        assert tags["2"]["validation.champion.baseline_version"] == "3"
        assert hist[-1] == "3" and "2" not in hist
    assert c.search_model_versions(f"name='{registry.lease_model('racer', 'champion')}'") == []  # released


# --------------------------------------------------------------------------- the lease

_LEASE_CLIENT = """
import json, sys, time
from mlflow import MlflowClient
from pipelines.lifecycle import registry
uri, out, stall, hold, start = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
if stall:  # a GC pause, an HTTP retry or a busy machine, between what this client read and what it writes
    for name in ("set_registered_model_tag", "create_model_version"):
        def slow(self, *a, _write=getattr(MlflowClient, name), **k):
            time.sleep(stall)
            return _write(self, *a, **k)
        setattr(MlflowClient, name, slow)
time.sleep(max(0.0, start - time.time()))
with registry.alias_lease(uri, "leased", "champion"):
    t0 = time.time()
    time.sleep(hold)
    t1 = time.time()
open(out, "w").write(json.dumps([t0, t1]))
"""


def test_two_processes_never_hold_the_lease_at_once_even_when_one_stalls_between_read_and_write(tmp_path):
    """Two clients in two processes take the same lease at the same moment; one stalls 2 s before each
    write, longer than any settle time. Their times inside the lease must not overlap."""
    import subprocess
    import sys

    from mlflow import MlflowClient

    from tests.conftest import REPO

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri, registry_uri=uri).create_registered_model("leased")
    start = time.time() + 8  # both interpreters have imported MLflow by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LEASE_CLIENT, uri, str(tmp_path / f"{i}.json"), stall, "3", str(start)],
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, stall in enumerate(("2", "0"))
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()[-3000:]
    (a0, a1), (b0, b1) = (json.loads((tmp_path / f"{i}.json").read_text()) for i in (0, 1))
    assert a1 <= b0 or b1 <= a0, f"both held the lease: {a0:.2f}-{a1:.2f} and {b0:.2f}-{b1:.2f}"


def test_a_silent_holder_is_taken_over_and_its_late_write_is_fenced(tmp_path):
    """A ticket that stops beating (its process died or hung) is removed after the time to live, by the
    waiter's own clock; the stalled holder then finds its ticket gone and writes nothing."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri, registry_uri=uri)
    c.create_registered_model("leased")
    said: list[str] = []
    with registry.alias_lease(uri, "leased", "champion", ttl_s=60) as stalled:
        stalled._stop.set()  # its heartbeat stops, as in a process that hangs
        t0 = time.monotonic()
        with registry.alias_lease(uri, "leased", "champion", ttl_s=1.0, log=said.append) as taker:
            waited = time.monotonic() - t0
            assert int(taker.ticket) > int(stalled.ticket)
            taker.check()
            with pytest.raises(registry.AliasBusy, match="lost the lease"):
                stalled.check()
    assert 1.0 < waited < 10, waited
    assert said and "taking over the lease" in said[0] and f"ticket {stalled.ticket}" in said[0]
    assert c.search_model_versions(f"name='{registry.lease_model('leased', 'champion')}'") == []


def test_racing_pairs_from_two_processes_with_stalls_leave_the_alias_on_the_best(tmp_path):
    """The promotion drill, short: three pairs of gated promotions race from two processes that stall at
    random before every registry write; after each pair the alias is on the best version so far, and the
    history holds every move (``python -m benchmarks.promotion_drill`` runs ten pairs)."""
    from benchmarks.promotion_drill import drill

    record = drill(f"sqlite:///{tmp_path / 'mlflow.db'}", pairs=3, stall=1.0, seed=1, work=tmp_path)
    assert record["alias_right"] == 3, record
    assert record["moves"] >= 1 and record["history_complete"] and record["history_entries"] == record["moves"]
    assert record["leases_left"] == 0


def test_a_promotion_that_never_gets_to_move_leaves_the_versions_tags_as_they_were(tmp_path):
    """The alias moves during every one of the candidate's evaluations (another promotion keeps winning):
    after max_rounds nothing moved, the version carries no verdict for the alias, and each promotion run
    records the verdict and that the move did not happen."""
    from mlflow import MlflowClient

    from pipelines import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    files = tmp_path / "files"
    files.mkdir()
    (files / "adapter_config.json").write_text("{}")
    for v in ("1", "2", "3", "4"):
        tracking.register_directory(uri, str(files), "mover", f"v{v}", {"v": v})
    c = MlflowClient(uri, registry_uri=uri)
    c.set_registered_model_alias("mover", "champion", "1")
    others = iter(["2", "3", "4"])

    def evaluate(gate, uris, _uri):  # meanwhile, someone else moves the alias
        c.set_registered_model_alias("mover", "champion", next(others))
        return {k: {"eval_loss": 0.1 if k == "candidate" else 0.9} for k in uris}

    result = registry.promote(uri, "mover", "4", "champion", registry.Gate(), log=lambda *_: None,
                              evaluate=evaluate, max_rounds=2)  # fmt: skip
    assert not result["moved"] and result["status"] == "passed" and "kept moving" in result["reasons"][0]
    assert not any(k.startswith("validation.") for k in c.get_model_version("mover", "4").tags)
    runs = c.search_runs([c.get_experiment_by_name(registry.PROMOTIONS_EXPERIMENT).experiment_id])
    assert len(runs) == 2 and all(r.data.tags["raypeft.outcome"].startswith("not moved") for r in runs)
    assert registry.holder(uri, "mover", "champion") == "3"

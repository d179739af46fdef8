"""A promotion drill: pairs of gated promotions race from two processes against one registry, each client
stalling a random time before every lease, alias and history write. After each pair the alias must be on
the best of the holder and the two candidates, and the alias history must hold every move.

    python -m benchmarks.promotion_drill [--pairs 10] [--stall 1.5] [--seed 0] [--tracking-uri URI]

The registry is real (SQLite by default, or a tracking server); the evaluation is a table of losses, so
the drill exercises the lease and the compare-and-set, not the model. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODEL, ALIAS = "drill", "champion"
LEASE = f"raypeft-lease.{MODEL}.{ALIAS}"  # registry.lease_model(MODEL, ALIAS)
STALLED = ("create_model_version", "set_registered_model_alias", "set_registered_model_tag")

_CLIENT = """
import json, random, sys, time
from pathlib import Path
from mlflow import MlflowClient
from pipelines.lifecycle import registry
uri, work, me, pairs, stall, seed = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \\
    float(sys.argv[5]), int(sys.argv[6])
model, alias, stalled = sys.argv[7], sys.argv[8], sys.argv[9].split(",")
rng = random.Random(seed * 2 + me)
for name in stalled:
    def slow(self, *a, _write=getattr(MlflowClient, name), **k):
        time.sleep(rng.uniform(0, stall))
        return _write(self, *a, **k)
    setattr(MlflowClient, name, slow)
loss = json.loads((work / "losses.json").read_text())
def evaluate(gate, uris, _uri):
    return {label: {"eval_loss": loss[u.rsplit("/", 1)[1]]} for label, u in uris.items()}
for k in range(pairs):
    (work / f"ready-{k}-{me}").touch()
    while not (work / f"go-{k}").exists():
        time.sleep(0.02)
    version = str(2 + 2 * k + me)
    r = registry.promote(uri, model, version, alias, registry.Gate(), log=lambda *_: None, evaluate=evaluate)
    with open(work / f"results-{me}.jsonl", "a") as f:
        f.write(json.dumps({"pair": k, "version": version, "moved": r["moved"], "status": r["status"]}) + "\\n")
    (work / f"done-{k}-{me}").touch()
"""


def _wait(paths: list[Path], procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not all(p.exists() for p in paths):
        for proc in procs:
            if proc.poll() not in (None, 0):
                raise RuntimeError(f"a drill client failed:\n{proc.stderr.read()[-3000:]}")
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {[p.name for p in paths if not p.exists()]}")
        time.sleep(0.02)


def drill(uri: str, pairs: int = 10, stall: float = 1.5, seed: int = 0, work: Path | None = None, log=print) -> dict:
    """Run the drill against the registry at ``uri`` and return its record (see the module docstring)."""
    from mlflow import MlflowClient

    from pipelines.lifecycle import registry

    work = Path(work or tempfile.mkdtemp(prefix="raypeft-drill-"))
    rng = random.Random(seed)
    c = MlflowClient(uri, registry_uri=uri)
    c.create_registered_model(MODEL)
    # each pair's two candidates both beat every earlier version, so both pass the gate against the holder
    # they are first evaluated against and both go for the move: every pair races for the lease
    losses = {"1": 1.0}
    for k in range(pairs):
        for me in (0, 1):
            losses[str(2 + 2 * k + me)] = round(1.0 - 0.08 * (k + 1) + rng.uniform(-0.03, 0.03), 4)
    for _ in losses:
        c.create_model_version(MODEL, source=str(work), await_creation_for=0)
    (work / "losses.json").write_text(json.dumps(losses))
    c.set_registered_model_alias(MODEL, ALIAS, "1")
    t0 = time.time()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _CLIENT,
                uri,
                str(work),
                str(me),
                str(pairs),
                str(stall),
                str(seed),
                MODEL,
                ALIAS,
                ",".join(STALLED),
            ],  # fmt: skip
            cwd=REPO,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me in (0, 1)
    ]
    right, best = 0, "1"
    try:
        for k in range(pairs):
            _wait([work / f"ready-{k}-{me}" for me in (0, 1)], procs)
            (work / f"go-{k}").touch()
            _wait([work / f"done-{k}-{me}" for me in (0, 1)], procs)
            best = min((best, str(2 + 2 * k), str(3 + 2 * k)), key=lambda v: losses[v])
            now = registry.holder(uri, MODEL, ALIAS)
            right += now == best
            log(f"[drill] pair {k + 1}/{pairs}: alias on {now}, best {best} ({'ok' if now == best else 'WRONG'})")
    finally:
        for proc in procs:
            proc.wait(timeout=60)
    results = [json.loads(x) for me in (0, 1) for x in (work / f"results-{me}.jsonl").read_text().splitlines()]
    moved = [r["version"] for r in results if r["moved"]]
    hist = [h for h in registry.history(uri, MODEL, ALIAS) if h.get("by") == "promote"]
    return {
        "pairs": pairs,
        "stall_s": stall,
        "alias_right": right,
        "moves": len(moved),
        "history_entries": len(hist),
        "history_complete": sorted(h["version"] for h in hist) == sorted(moved),
        "leases_left": len(c.search_model_versions(f"name='{LEASE}'")),
        "wall_s": round(time.time() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--stall", type=float, default=1.5, help="most seconds a client stalls before a write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tracking-uri", default=None, help="default: a fresh SQLite registry")
    a = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="raypeft-drill-"))
    uri = a.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    print(json.dumps(drill(uri, a.pairs, a.stall, a.seed, work)))


if __name__ == "__main__":
    main()

"""Data at scale: raypeft's Ray Data preparation against HF ``datasets.map`` and today's in-worker path,
worker memory with a large dataset, the first step on a warm cache, and packing efficiency.

    python -m benchmarks.data [--records 1000000] [--repeats 3] [--subset 50000] [--out /tmp/raypeft-bench-data]

1. A deterministic synthetic chat dataset of ``--records`` records (JSONL) is written once.
2. **Preparation**, each run in a fresh process, sides alternating, ``--repeats`` times:
   - ``raypeft``: ``pipelines.data.prepare.prepare`` on a local Ray cluster of all cores, cold cache
     (timed: Ray's start, as ``hf_map``'s worker pool's start is timed, hashing the file, tokenizing and
     writing the shards);
   - ``hf_map``: ``datasets.load_dataset("json")`` + ``.map(batched=True, num_proc=<cores>)`` with the
     same formatting function (``data.encode_ids``) and tokenizer, writing its Arrow cache of what
     raypeft stores (the ids and the prompt's length, no labels column);
   - ``in_worker``: the pre-Ray-Data path (``train_eval_records`` + ``encode_all``, one thread) on the
     first ``--subset`` records, scaled linearly to ``--records``.
3. **Worker memory**: a 2-step ``raypeft train`` job (1 worker, SmolLM2, batch 8, ``max_length`` 160) on
   the large dataset and on a demo-sized one (its first 2,000 records), alternating, each in a fresh
   process; rank 0's RSS after its first step (``worker_rss_mib`` in MLflow). The small side is the same
   synthetic data rather than ``builtin:json_extract``: that demo's rows are shorter, and activation
   memory would then differ by row length, not dataset size.
4. **Warm first step**: in the large job's reruns (cache warm) the wall time from calling ``run`` to the
   end of the first step, minus the worker's model load (``model_load_s``): Ray's start-up, the cache
   hit, MLflow, the Train worker group's start and the first step. Its data share is reported beside it:
   the driver's ``prepare`` on a cache hit (``data_prepare_s``) plus the worker's ``open_layout``
   (``data_open_s``). Then the same span for the same job run on an already running cluster, as
   ``ray job submit`` runs it (the driver connects through ``RAY_ADDRESS``; a ``ray start --head`` of the
   benchmark's own, on free ports, stopped by signalling its own process group), so without Ray's start.
   Where the span went, from each run's own MLflow metrics (medians): Ray's start (``startup_ray_s``),
   the cache hit, the MLflow run and building the trainer (``startup_driver_s`` minus that), the Train
   controller and worker group (``train_start_at`` → ``worker_started_at``), the worker's setup without
   the model load (``worker_setup_s``: imports, method, pre-flight, engine, data, the MLflow client) and
   the first step (``first_step_s``). The job sets ``train.eval_base: false``, so no base eval runs
   between the last two.
5. **Packing efficiency** of the demo data at ``max_length`` 512: real tokens ÷ token slots over one
   epoch of the micro-batches (8 rows) ``data.collate`` builds, padding-free; beside it the same rows
   padded to their longest (raypeft before padding-free batches), the unpacked batches, and the rows'
   fill. Then a training step on 4 packed rows in each layout (``packed_step``), fresh processes,
   alternating.

Ends with one JSON line: ``prep_over_hf_map`` (raypeft ÷ HF median wall time), ``worker_rss_ratio``,
``warm_first_step_s`` (local cluster started by the job), ``warm_first_step_running_cluster_s``,
``packing_efficiency``, plus the raw samples.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = (
    "the a order customer invoice ship city price item total date account name street number email phone "
    "product quantity status paid pending returned review rating service delivery warehouse region code"
).split()


def write_dataset(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` chat records: a user request of 12–80 words, an assistant answer of 6–40 (deterministic)."""
    if path.is_file() and path.with_suffix(".done").read_text() == str(n):
        return path
    r = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            user = " ".join(r.choice(WORDS) for _ in range(r.randint(12, 80)))
            answer = " ".join(r.choice(WORDS) for _ in range(r.randint(6, 40)))
            rec = {"messages": [{"role": "user", "content": f"#{i}: {user}"}, {"role": "assistant", "content": answer}]}
            f.write(json.dumps(rec) + "\n")
    path.with_suffix(".done").write_text(str(n))
    return path


def job_spec(train: str, storage: str, home: str, steps: int = 2, packing: bool = False, max_length: int = 160):
    from pipelines.spec import validate

    return validate(
        {
            "name": "bench-data",
            "model": {"base": "smollm2-135m"},
            "method": {"name": "lora", "r": 16},
            "data": {
                "train": train,
                "format": "chat",
                "max_length": max_length,
                "packing": packing,
                "eval_fraction": 0,
            },
            "train": {
                "max_steps": steps,
                "micro_batch_size": 8,
                "warmup_steps": 1,
                "eval_every": 0,
                "eval_base": False,
            },
            "scaling": {"num_workers": 1, "cpus_per_worker": os.cpu_count() or 1},
            "checkpoint": {"storage": storage},
            "tracking": {"experiment": "bench-data", "tracking_uri": f"sqlite:///{home}/mlflow.db"},
        }
    )


# ---------------------------------------------------------------- the sides (each in a fresh process)


def side_raypeft(a: dict) -> dict:
    import ray

    from cluster.connect import init_ray
    from pipelines.data.prepare import prepare
    from pipelines.model import load_tokenizer, resolve_base

    spec = job_spec(a["data"], a["storage"], a["home"])
    load_tokenizer(resolve_base(spec.model, log=lambda *_: None))  # loaded before the clock, as hf_map's is
    t0 = time.perf_counter()  # Ray's start is timed, as hf_map's worker pool's is
    init_ray(num_cpus=os.cpu_count(), include_dashboard=False)
    p = prepare(spec, log=lambda *_: None)
    wall = time.perf_counter() - t0
    ray.shutdown()
    return {"wall_s": wall, "records": p.stats["data_records"], "tokens": p.stats["data_tokens"]}


def side_hf_map(a: dict) -> dict:
    import datasets

    from pipelines import data as D
    from pipelines.model import load_tokenizer, resolve_base

    datasets.disable_progress_bars()
    tok = load_tokenizer(resolve_base(job_spec(a["data"], a["storage"], a["home"]).model, log=lambda *_: None))

    def fn(batch):  # what preparation stores: the ids and the prompt's length (no labels column)
        records = [{"messages": m} for m in batch["messages"]]
        enc = D.encode_ids(records, "chat", tok, 160)
        return {"input_ids": [ids for ids, _ in enc], "masked": [m for _, m in enc]}

    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=a["data"], split="train", cache_dir=a["storage"])
    out = ds.map(fn, batched=True, num_proc=os.cpu_count(), remove_columns=ds.column_names)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "records": len(out)}


def side_in_worker(a: dict) -> dict:
    from pipelines import data as D
    from pipelines.model import load_tokenizer, resolve_base

    spec = job_spec(a["subset"], a["storage"], a["home"])
    tok = load_tokenizer(resolve_base(spec.model, log=lambda *_: None))
    t0 = time.perf_counter()
    train, _ = D.train_eval_records(spec.data, spec.train.seed)
    D.encode_all(train, spec.data, tok)
    return {"wall_s": time.perf_counter() - t0, "records": len(train)}


def side_train(a: dict) -> dict:
    from mlflow import MlflowClient

    from pipelines.train import run

    spec = job_spec(a["data"], a["storage"], a["home"])
    t0 = time.time()
    result = run(spec, log=lambda *_: None)
    c = MlflowClient(spec.tracking.tracking_uri)
    keys = ("worker_rss_mib", "model_load_s", "first_step_at", "data_open_s", "data_prepare_s", "startup_ray_s")
    keys += ("startup_driver_s", "train_start_at", "worker_started_at", "worker_setup_s", "first_step_s")
    m = {k: c.get_metric_history(result["run_id"], k)[0].value for k in keys}
    return {
        "data_share_s": m["data_prepare_s"] + m["data_open_s"],
        "worker_rss_mib": m["worker_rss_mib"],
        "model_load_s": m["model_load_s"],
        "first_step_after_load_s": m["first_step_at"] - t0 - m["model_load_s"],
        "parts_s": {  # where that span went, from the run's own metrics (they add up to it, to within ~0.1 s)
            "ray": m["startup_ray_s"],
            "driver": m["startup_driver_s"] - m["startup_ray_s"],  # data, MLflow run, trainer
            "train_start": m["worker_started_at"] - m["train_start_at"],
            "worker_setup": m["worker_setup_s"],
            "first_step": m["first_step_s"],
        },
        "cache_hit": c.get_metric_history(result["run_id"], "data_cache_hit")[0].value,
    }


def _layout(a: dict, packing: bool):
    import ray

    from cluster.connect import init_ray
    from pipelines.data.prepare import open_layout, prepare

    init_ray(num_cpus=os.cpu_count(), include_dashboard=False)
    spec = job_spec("builtin:json_extract", a["storage"], a["home"], packing=packing, max_length=512)
    p = prepare(spec, log=lambda *_: None)
    ray.shutdown()
    return spec, p, open_layout(p.layout)[0]


def side_packing(a: dict) -> dict:
    """Real tokens ÷ token slots over one epoch of the micro-batches ``data.collate`` builds (batch 8),
    packed (padding-free) and not (padded rows); and the packed rows' fill, padded as before padding-free."""
    from pipelines import data as D

    out = {}
    for packing in (True, False):
        spec, p, rows = _layout(a, packing)
        sharder = D.Sharder(len(rows), spec.train.micro_batch_size, 1, 0, spec.train.seed)
        real = slots = padded_rows = 0
        for m in range(-(-len(rows) // spec.train.micro_batch_size)):
            micro = [rows[i] for i in sharder.indices(m)]
            lengths = [len(r["input_ids"]) for r in micro]
            real += sum(lengths)
            slots += D.collate(micro, 0)["input_ids"].numel()
            padded_rows += max(lengths) * len(micro)
        out["packed" if packing else "unpacked"] = real / slots
        if packing:
            out["packed_rows_padded"] = real / padded_rows
            out["row_fill"] = p.stats["data_row_fill"]
    return {"packing_efficiency": out["packed"], **out}


def side_packed_step(a: dict) -> dict:
    """Training throughput on packed micro-batches of ``a["rows"]`` rows: ``layout`` "padding_free"
    (``data.collate`` + ``attention.VARLEN``) or "padded_rows" (the rows padded to the longest, each with
    transformers' block-diagonal SDPA mask: raypeft before padding-free batches). LoRA r16 on SmolLM2;
    forward + backward + optimizer step of ``a["steps"]`` micro-batches after one warm-up, collation timed."""
    import torch

    from pipelines import data as D
    from pipelines.model import load_base, methods
    from pipelines.train import attention

    spec, _, rows = _layout(a, True)
    torch.set_num_threads(os.cpu_count() or 1)
    base, tok, _ = load_base(spec, device="cpu", log=lambda *_: None)
    model = methods.build(spec, base).model.train()
    if a["layout"] == "padding_free":
        assert attention.enable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def padded_rows(micro):
        n = max(len(r["input_ids"]) for r in micro)
        out = {"input_ids": [], "labels": [], "position_ids": []}
        for r in micro:
            pad = n - len(r["input_ids"])
            labels = list(r["labels"]) + [D.IGNORE] * pad
            for start in itertools.accumulate([0, *r["segments"][:-1]]):
                labels[start] = D.IGNORE
            out["input_ids"].append(list(r["input_ids"]) + [tok.pad_token_id] * pad)
            out["labels"].append(labels)
            out["position_ids"].append([p for k in [*r["segments"], pad] for p in range(k)])
        return {**{k: torch.tensor(v) for k, v in out.items()}, "use_cache": False}

    collate = (
        (lambda m: attention.model_inputs(D.collate(m, tok.pad_token_id), "cpu"))
        if a["layout"] == "padding_free"
        else padded_rows
    )
    sharder = D.Sharder(len(rows), a["rows"], 1, 0, 0)
    tokens, losses = 0, []
    for m in range(a["steps"] + 1):
        if m == 1:
            t0, tokens = time.perf_counter(), 0
        micro = [rows[i] for i in sharder.indices(m)]
        loss = model(**collate(micro)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        tokens += sum(len(r["input_ids"]) for r in micro)
        losses.append(loss.item())
    wall = time.perf_counter() - t0
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "losses": losses}


SIDES = {
    f.__name__[5:]: f for f in (side_raypeft, side_hf_map, side_in_worker, side_train, side_packing, side_packed_step)
}


def spawn(side: str, args: dict, env: dict[str, str] | None = None) -> dict:
    """Run one side in a fresh Python process (with ``env`` added to its environment); its result is the last
    stdout line."""
    env = {**os.environ, "RAYPEFT_HOME": args["home"], "TOKENIZERS_PARALLELISM": "true", **(env or {})}
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.data", "--side", side, "--args", json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
    )
    if out.returncode != 0:
        raise RuntimeError(f"side {side} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.2f} (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--subset", type=int, default=50_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "raypeft-bench-data"))
    p.add_argument(
        "--prep-from",
        help="skip the preparation sides: reuse their figures from this JSON file (written by an earlier run "
        "into --out as prep.json) and a large run's warm cache",
    )
    p.add_argument("--prep-only", action="store_true", help="run the preparation sides only, then end")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--args", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.side:
        print(json.dumps(SIDES[a.side](json.loads(a.args))), flush=True)
        return 0

    # `timeout`, a cancelled CI job or a closed terminal: unwind (so the Ray head below is stopped) rather
    # than die at once, as Ctrl-C already does
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    home = str(out / "home")
    t = time.perf_counter()
    data = write_dataset(out / f"chat-{a.records}.jsonl", a.records)
    subset = out / f"chat-{a.records}-first{a.subset}.jsonl"
    small = out / f"chat-{a.records}-first2000.jsonl"
    for path, n in ((subset, a.subset), (small, 2000)):
        with open(data) as src, open(path, "w") as dst:
            for _, line in zip(range(n), src):
                dst.write(line)
    print(f"dataset: {a.records:,} records, {data.stat().st_size / 2**20:,.0f} MiB ({time.perf_counter() - t:.0f}s)")

    def fresh(tag: str) -> str:
        d = tempfile.mkdtemp(prefix=f"{tag}-", dir=out)
        return d

    base = {"data": str(data), "subset": str(subset), "home": home}
    prep: dict[str, list[float]] = {"raypeft": [], "hf_map": [], "in_worker": []}
    if a.prep_from:
        saved = json.loads(Path(a.prep_from).read_text())
        prep, large_store = saved["prep_s"], saved["large_store"]
        print(f"preparation figures from {a.prep_from}")
    else:
        spawn("packing", {**base, "storage": fresh("warm")})  # materializes SmolLM2 once, outside any timing
    for r in range(0 if a.prep_from else a.repeats):
        order = ["raypeft", "hf_map", "in_worker"] if r % 2 == 0 else ["in_worker", "hf_map", "raypeft"]
        for side in order:
            res = spawn(side, {**base, "storage": fresh(side)})
            wall = res["wall_s"] * (a.records / res["records"] if side == "in_worker" else 1)
            prep[side].append(wall)
            print(f"prep {side:9s} repeat {r + 1}: {wall:8.1f}s" + (" (scaled)" if side == "in_worker" else ""))
    for side, xs in prep.items():
        print(f"prep {side:9s} {spread(xs)} s")
    if a.prep_only:
        ratio = statistics.median(prep["raypeft"]) / statistics.median(prep["hf_map"])
        print(json.dumps({"prep_over_hf_map": round(ratio, 3), "records": a.records, "prep_s": prep}))
        return 0

    if not a.prep_from:
        large_store = fresh("large")
        cold = spawn("train", {**base, "storage": large_store})  # tokenizes: the cache is warm from here on
        print(f"train large (cold cache): worker RSS {cold['worker_rss_mib']:.0f} MiB")
        (out / "prep.json").write_text(json.dumps({"prep_s": prep, "large_store": large_store}))
    rss: dict[str, list[float]] = {"large": [], "demo": []}
    warm: list[float] = []
    parts: dict[str, list[dict]] = {"local": [], "running_cluster": []}
    share: list[float] = []
    demo_store = fresh("demo")
    for r in range(a.repeats):
        for side in ("demo", "large") if r % 2 == 0 else ("large", "demo"):
            if side == "large":
                res = spawn("train", {**base, "storage": large_store})
                assert res["cache_hit"] == 1.0, res
                warm.append(res["first_step_after_load_s"])
                share.append(res["data_share_s"])
                parts["local"].append(res["parts_s"])
            else:
                res = spawn("train", {**base, "data": str(small), "storage": demo_store})
            rss[side].append(res["worker_rss_mib"])
            print(
                f"train {side}: worker RSS {res['worker_rss_mib']:.0f} MiB, first step {res['first_step_after_load_s']:.1f}s after load"
            )
    # The same warm rerun as a job on a running cluster (how `ray job submit` runs it: the driver connects
    # through RAY_ADDRESS), so Ray's own start is not in it. The head is this benchmark's own (free ports,
    # own process group, own token) and settles before the first run.
    from cluster.local import ray_head

    on_cluster: list[float] = []
    token = secrets.token_hex(32)
    with ray_head(token, os.cpu_count() or 1) as (gcs, _):
        time.sleep(15)
        for _ in range(a.repeats):
            res = spawn(
                "train",
                {**base, "storage": large_store},
                {"RAY_ADDRESS": gcs, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token},
            )
            assert res["cache_hit"] == 1.0, res
            on_cluster.append(res["first_step_after_load_s"])
            parts["running_cluster"].append(res["parts_s"])
            print(f"train large on a running cluster: first step {res['first_step_after_load_s']:.1f}s after load")
    pack_store = fresh("packing")
    pack = spawn("packing", {**base, "storage": pack_store})
    step_tok_s: dict[str, list[float]] = {"padding_free": [], "padded_rows": []}
    for r in range(a.repeats):
        for layout in ("padding_free", "padded_rows") if r % 2 == 0 else ("padded_rows", "padding_free"):
            res = spawn("packed_step", {**base, "storage": pack_store, "layout": layout, "rows": 4, "steps": 2})
            step_tok_s[layout].append(res["tokens_per_s"])
            print(f"packed step {layout}: {res['tokens_per_s']:.1f} tok/s, losses {res['losses']}")
    for side, xs in rss.items():
        print(f"worker RSS {side}: {spread(xs)} MiB")
    print(f"warm first step beyond model load: {spread(warm)} s, of which data: {spread(share)} s")
    print(f"warm first step beyond model load, a job on a running cluster: {spread(on_cluster)} s")
    breakdown = {where: {k: statistics.median(p[k] for p in runs) for k in runs[0]} for where, runs in parts.items()}
    for where, b in breakdown.items():
        print(f"  where it went ({where}, medians): " + ", ".join(f"{k} {v:.2f}s" for k, v in b.items()))
    print(
        f"packing at max_length 512, micro-batches of 8: real tokens ÷ slots {pack['packed']:.3f} padding-free, "
        f"{pack['packed_rows_padded']:.3f} as padded rows, {pack['unpacked']:.3f} unpacked; rows {pack['row_fill']:.3f} full"
    )
    for layout, xs in step_tok_s.items():
        print(f"packed training step (4 rows) {layout}: {spread(xs)} tok/s")
    result = {
        "prep_over_hf_map": statistics.median(prep["raypeft"]) / statistics.median(prep["hf_map"]),
        "worker_rss_ratio": statistics.median(rss["large"]) / statistics.median(rss["demo"]),
        "warm_first_step_s": statistics.median(warm),
        "warm_first_step_running_cluster_s": statistics.median(on_cluster),
        "warm_first_step_breakdown_s": breakdown,
        "packing_efficiency": pack["packing_efficiency"],
        "packing": pack,
        "packed_step_tokens_per_s": step_tok_s,
        "records": a.records,
        "cores": os.cpu_count(),
        "prep_s": prep,
        "worker_rss_mib": rss,
        "warm_first_step_samples_s": warm,
        "warm_first_step_data_share_s": share,
        "warm_first_step_running_cluster_samples_s": on_cluster,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

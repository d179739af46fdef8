"""Scaling: tokens/s for 1 vs 2 workers and for each ZeRO stage, plus checkpoint save / restore times.

    python -m benchmarks.scaling [--base smollm2-135m] [--steps 8] [--seq 128] [--batch 4] [--gpu]

Every configuration runs the real pipeline (``pipelines.train.driver.run``) on the same spec:
LoRA r=16 on all linear layers, the same global batch (``--batch`` × 2 examples of
``--seq`` packed tokens per optimizer step, so 1 worker accumulates 2 micro-batches),
fp32 on CPU (bf16 with ``--gpu``). Steady-state tokens/s is the mean of the per-step
``tokens_per_s`` metric after ``--warmup`` steps, read back from MLflow. Checkpoint
save and restore are timed inside 2 Ray Train workers on the same model and method
through the engines the loop uses (``engine.save`` / ``engine.load``: the resume path),
after two optimizer steps so the optimizer states exist. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = [(1, "ddp"), (2, "ddp"), (2, "zero1"), (2, "zero2"), (2, "zero2_offload"), (2, "zero3"), (2, "zero3_offload")]


def make_spec(args, home: str, workers: int, strategy: str, name: str):
    from pipelines.spec import validate

    return validate(
        {
            "name": name,
            "model": {
                "base": args.base,
                "dtype": "bfloat16" if args.gpu else "float32",
                "compute_dtype": "bfloat16" if args.gpu else "float32",
            },
            "method": {"name": args.method, "r": 16, "alpha": 32, "dropout": 0.0},
            "data": {"train": "builtin:json_extract", "format": "chat", "max_length": args.seq, "packing": True},
            "train": {
                "max_steps": args.steps,
                "micro_batch_size": args.batch,
                "global_batch_size": args.batch * 2,
                "lr": 1e-4,
                "warmup_steps": 1,
                "eval_every": 0,
                "eval_base": False,
            },
            "scaling": {
                "num_workers": workers,
                "strategy": strategy,
                "use_gpu": args.gpu,
                "cpus_per_worker": 1 if not args.gpu else 2,
                "torch_threads": max(1, args.threads // workers),
            },
            "checkpoint": {"storage": os.path.join(home, "runs")},
            "tracking": {"experiment": "bench-scaling", "tracking_uri": f"sqlite:///{home}/mlflow.db"},
        }
    )


def throughput(spec, warmup: int) -> tuple[float, float]:
    """Run the real pipeline; (steady-state tokens/s, end-to-end wall seconds)."""
    from mlflow import MlflowClient

    from pipelines.train import run

    t0 = time.perf_counter()
    result = run(spec, log=lambda *_: None)
    wall = time.perf_counter() - t0
    hist = MlflowClient(result["tracking_uri"]).get_metric_history(result["run_id"], "tokens_per_s")
    rates = [h.value for h in sorted(hist, key=lambda h: h.step)]
    return statistics.mean(rates[warmup:]), wall


def checkpoint_worker(config: dict) -> None:
    """Ray Train worker: for each strategy, build the job's model + engine, step twice, time save and load."""
    import gc
    import shutil

    import ray.train
    import torch

    from pipelines import data as D
    from pipelines.model import load_base, methods
    from pipelines.train import build_engine, deepspeed_setup, label_tokens

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device(f"cuda:{ctx.get_local_rank()}") if config["gpu"] else torch.device("cpu")
    timings: dict[str, dict[str, float]] = {}
    for spec in config["specs"]:
        torch.set_num_threads(spec.scaling.torch_threads)
        ds = spec.deepspeed_config()
        keep = deepspeed_setup(ds, device, quantized=spec.quantization() != "none")
        base, tok, _ = load_base(spec, device=device, log=lambda *_: None)
        prepared = methods.build(spec, base)
        if ds is None:
            prepared.model.to(device)
        engine = build_engine(spec, prepared, rank, world, device, ds)
        records, _ = D.train_eval_records(spec.data, spec.train.seed)
        ex = D.encode_all(records[:64], spec.data, tok)
        sharder = D.Sharder(len(ex), spec.train.micro_batch_size, world, rank, 0)
        for step in range(2):
            batch = {
                k: v.to(device) for k, v in D.collate([ex[i] for i in sharder.indices(step)], tok.pad_token_id).items()
            }
            engine.micro_step(batch, last=True, tokens=label_tokens(batch["labels"]))
            engine.finish_step(step)
        saves, loads = [], []
        root = config["scratch"]  # one directory both workers see, like a checkpoint Ray Train hands back
        for rep in range(3):
            d = os.path.join(root, f"{spec.scaling.strategy}-{rep}")
            os.makedirs(d, exist_ok=True)
            torch.distributed.barrier()
            t0 = time.perf_counter()
            engine.save(Path(d), 2)
            torch.distributed.barrier()
            saves.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine.load(Path(d))
            torch.distributed.barrier()
            loads.append(time.perf_counter() - t0)
            if rank == 0:
                size = sum(os.path.getsize(os.path.join(p, f)) for p, _, fs in os.walk(d) for f in fs)
            torch.distributed.barrier()
            if rank == 0:
                shutil.rmtree(d)
        if rank == 0:
            timings[spec.scaling.strategy] = {
                "save_s": statistics.median(saves),
                "restore_s": statistics.median(loads),
                "bytes": size,
            }
        del engine, prepared, base, keep
        gc.collect()
    if rank == 0:
        with open(os.path.join(config["scratch"], "timings.json"), "w") as f:
            json.dump(timings, f)


def checkpoint_times(args, home: str) -> dict[str, dict[str, float]]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    specs = [make_spec(args, home, 2, s, f"ckpt-{s}") for w, s in CONFIGS if w == 2]
    scratch = os.path.join(home, "ckpt-scratch")
    os.makedirs(scratch, exist_ok=True)
    TorchTrainer(
        checkpoint_worker,
        train_loop_config={"specs": specs, "gpu": args.gpu, "scratch": scratch},
        scaling_config=ScalingConfig(
            num_workers=2, use_gpu=args.gpu, resources_per_worker={"CPU": specs[0].scaling.cpus_per_worker}
        ),
        run_config=RunConfig(name="bench-ckpt", storage_path=os.path.join(home, "runs")),
    ).fit()
    with open(os.path.join(scratch, "timings.json")) as f:
        return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--method", default="lora", help="lora, dora, qlora, ... (the same for every configuration)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4, help="micro batch per worker; the global batch is twice this")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads shared by the workers (CPU)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker, bf16, NCCL")
    p.add_argument("--only", default="", help="comma-separated strategies to run (default: all)")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    from cluster.connect import init_ray

    init_ray()
    configs = [c for c in CONFIGS if not args.only or c[1] in args.only.split(",")]
    print(
        f"model {args.base}, {args.method} r=16 all-linear, {'bf16 GPU' if args.gpu else 'fp32 CPU'}, global batch "
        f"{args.batch * 2} × {args.seq} tokens (packed), {args.steps} steps ({args.warmup} warmup), {args.threads} threads in all",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory() as home:
        for workers, strategy in configs:
            spec = make_spec(args, home, workers, strategy, f"bench-{workers}w-{strategy}")
            tok_s, wall = throughput(spec, args.warmup)
            rows.append({"workers": workers, "strategy": strategy, "tok_s": tok_s, "wall_s": wall})
            print(f"  {workers} worker(s) {strategy:<14} {tok_s:8.0f} tok/s   (end-to-end {wall:.0f}s)", flush=True)
        ckpt = checkpoint_times(args, home)
    ref = rows[0]["tok_s"]
    print("\n| workers | strategy | tokens/s | vs 1 worker | checkpoint save | restore | checkpoint size |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        c = ckpt.get(r["strategy"]) if r["workers"] == 2 else None
        cs = f"{c['save_s']:.2f} s | {c['restore_s']:.2f} s | {c['bytes'] / 2**20:.1f} MiB" if c else "– | – | –"
        print(f"| {r['workers']} | {r['strategy']} | {r['tok_s']:.0f} | {r['tok_s'] / ref:.2f}× | {cs} |")
    print(json.dumps({"throughput": rows, "checkpoint": ckpt}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

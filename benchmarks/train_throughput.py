"""Training throughput: raypeft (1 Ray Train worker) vs a bare PEFT + torch loop, side by side.

    python -m benchmarks.train_throughput [--steps 20] [--base smollm2-135m] [--seq 128] [--batch 8]

Both sides train the same LoRA (r=16, all-linear) on the same base, batches of the
same token ids (the shipped json_extract data, packed to ``--seq`` tokens), fp32,
with the same number of torch threads. Steady-state tokens/s excludes the first
``--warmup`` steps (and, for raypeft, Ray and model start-up, which are reported
separately). Order is bare → raypeft → bare, and the bare figure is the mean of
its two runs, so drift on a noisy machine hits both sides. Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def make_spec(args, home: str):
    from pipelines.spec import validate

    return validate(
        {
            "name": "bench-throughput",
            "model": {"base": args.base},
            "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
            "data": {"train": "builtin:json_extract", "format": "chat", "max_length": args.seq, "packing": True},
            "train": {
                "max_steps": args.steps,
                "micro_batch_size": args.batch,
                "lr": 1e-4,
                "warmup_steps": 1,
                "eval_every": 0,
                "eval_base": False,
                "max_grad_norm": 1.0,
            },
            "scaling": {"num_workers": 1, "cpus_per_worker": args.threads},
            "checkpoint": {"storage": os.path.join(home, "runs")},
            "tracking": {"experiment": "bench", "tracking_uri": f"sqlite:///{home}/mlflow.db"},
        }
    )


def bare_loop(spec, args) -> float:
    """A plain PEFT + torch training loop over the same batches; returns steady-state tokens/s."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipelines import data as D
    from pipelines.models import load_tokenizer, resolve_base

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = resolve_base(spec.model)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(
        model, LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    train, _ = D.train_eval_records(spec.data, spec.train.seed)
    ex = D.encode_all(train, spec.data, tok)
    sharder = D.Sharder(len(ex), args.batch, 1, 0, spec.train.seed)
    model.train()
    rates = []
    for step in range(args.steps):
        batch = D.collate([ex[i] for i in sharder.indices(step)], tok.pad_token_id)
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(int(batch["attention_mask"].sum()) / (time.perf_counter() - t0))
    return statistics.mean(rates[args.warmup :])


def raypeft_run(spec, args) -> tuple[float, float]:
    """Run the real pipeline; steady-state tokens/s from its per-step metric, plus wall seconds."""
    from mlflow import MlflowClient

    from pipelines.train import run

    t0 = time.perf_counter()
    result = run(spec, log=lambda *_: None)
    wall = time.perf_counter() - t0
    hist = MlflowClient(result["tracking_uri"]).get_metric_history(result["run_id"], "tokens_per_s")
    rates = [h.value for h in sorted(hist, key=lambda h: h.step)]
    return statistics.mean(rates[args.warmup :]), wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    with tempfile.TemporaryDirectory() as home:
        spec = make_spec(args, home)
        print(
            f"model {args.base}, LoRA r=16 all-linear, fp32, batch {args.batch} × {args.seq} tokens (packed), "
            f"{args.steps} steps ({args.warmup} warmup), {args.threads} threads",
            flush=True,
        )
        bare1 = bare_loop(spec, args)
        print(f"bare PEFT+torch (1st): {bare1:8.0f} tok/s", flush=True)
        ray_rate, wall = raypeft_run(spec, args)
        print(
            f"raypeft 1 worker:      {ray_rate:8.0f} tok/s  (end-to-end wall {wall:.0f}s incl. Ray + model start)",
            flush=True,
        )
        bare2 = bare_loop(spec, args)
        print(f"bare PEFT+torch (2nd): {bare2:8.0f} tok/s", flush=True)
    bare = (bare1 + bare2) / 2
    ratio = ray_rate / bare
    print(f"ratio raypeft / bare = {ratio:.3f}  (goal >= 0.95)")
    print(json.dumps({"bare_tok_s": round(bare, 1), "raypeft_tok_s": round(ray_rate, 1), "ratio": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tuning quality and cost, measured side by side in one run. Not a timed test.

    python -m benchmarks.tuning asha        # ASHA vs the full grid on the same space (tiny model, toy task)
    python -m benchmarks.tuning layerwise   # searched plan vs uniform 4-bit rank 8 at ≤ its memory (SmolLM2)

``asha``: the same 12-point grid (learning rate × rank) runs twice, once to completion (FIFO) and once
under ASHA; prints the best eval loss of each, their ratio, and the training steps each spent.

``layerwise``: on SmolLM2-135M with the shipped json_extract task, the budget is the memory of uniform
4-bit rank 8 (weights + adapter + its optimizer); the searched plan and that uniform baseline are then
trained for the same steps; prints both eval losses (and exact match) and memories.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def _tiny_setup(home: str) -> tuple[str, str]:
    from pathlib import Path

    from pipelines.models import tiny_llama
    from tests.conftest import write_chat_data

    return str(tiny_llama(Path(home) / "tiny")), str(write_chat_data(Path(home) / "chat.jsonl", n=96))


def asha(args) -> dict:
    from pipelines.spec import validate
    from tuning.sweep import sweep

    home = tempfile.mkdtemp(prefix="bench-tune-")
    os.environ["RAYPEFT_HOME"] = home
    model, data = _tiny_setup(home)
    out = {}
    for scheduler in ("fifo", "asha"):
        spec = validate({
            "name": f"bench-{scheduler}", "model": {"base": model},
            "method": {"name": "lora", "r": 4},
            "data": {"train": data, "format": "chat", "max_length": 64, "eval_fraction": 0.2},
            "train": {"max_steps": args.steps, "micro_batch_size": 4, "warmup_steps": 1, "eval_every": 3, "eval_base": False},
            "scaling": {"cpus_per_worker": 0.9},
            # the grid in a shuffled order (the same for both runs): trials start in this order, and
            # ASHA can only stop a trial that does worse than the ones before it
            "tune": {"space": {"train.lr": {"grid": [3e-3, 1e-4, 3e-2, 3e-4, 1e-2, 1e-3]}, "method.r": {"grid": [4, 8]}},
                     "num_samples": 1, "scheduler": scheduler, "reduction_factor": 4, "grace_period": 3},
        })
        t0 = time.time()
        res = sweep(spec, log=lambda m: print(m, file=sys.stderr))
        out[scheduler] = {"best_eval_loss": res["best"]["eval_loss"], "steps": res["total_steps"], "trials": res["trials"],
                          "stopped_early": res["stopped_early"], "wall_s": round(time.time() - t0, 1)}
    ratio = out["asha"]["best_eval_loss"] / out["fifo"]["best_eval_loss"]
    steps = out["asha"]["steps"] / out["fifo"]["steps"]
    print("\n| run | best eval_loss | training steps | trials stopped early | wall |\n|---|---|---|---|---|")
    for k, label in (("fifo", "full grid (12 trials)"), ("asha", "ASHA, same grid")):
        o = out[k]
        print(f"| {label} | {o['best_eval_loss']:.4f} | {o['steps']} | {o['stopped_early']} | {o['wall_s']:.0f} s |")
    print(f"\nASHA best / grid best eval_loss: {ratio:.4f} (goal ≤ 1.02); ASHA steps / grid steps: {steps:.2f} (goal ≤ 0.40)")
    return {**out, "loss_ratio": ratio, "steps_ratio": steps}


def layerwise(args) -> dict:
    from cluster.memory import Shape
    from pipelines.plan import shape_of
    from pipelines.spec import validate
    from pipelines.train import run
    from tuning import layerwise as L
    from tuning.search import ALL_TARGETS, search
    from tuning.spec import trial_raw

    home = tempfile.mkdtemp(prefix="bench-layerwise-")
    os.environ["RAYPEFT_HOME"] = home
    raw = {
        "name": "bench-lw", "model": {"base": "smollm2-135m"},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": "builtin:json_extract", "format": "chat", "max_length": 192, "task": "json_extract", "eval_task_samples": 32},
        "train": {"max_steps": args.steps, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "eval_every": args.steps, "eval_base": False},
        "scaling": {"cpus_per_worker": 0.9},
        "tune": {"layerwise": {"trials": args.trials, "population": 6, "short_steps": args.short_steps, "promote": 2, "calibration_samples": 16}},
    }
    spec = validate(raw)
    shape: Shape = shape_of(spec)
    budget = int(L.memory(shape, L.uniform(shape, 4, 8), ALL_TARGETS))
    t0 = time.time()
    found = search(spec, budget, out=os.path.join(home, "plan.yaml"), log=lambda m: print(m, file=sys.stderr))
    search_s = time.time() - t0
    chosen = found["chosen"]
    base_raw = trial_raw(spec.model_dump(mode="json"), {"name": "bench-uniform", "model.quantization": "nf4"})
    baseline = run(validate(base_raw), log=lambda m: print(m, file=sys.stderr))
    rows = [("uniform NF4, rank 8 (QLoRA)", budget, baseline["metrics"]), (f"searched: {chosen['describe']}", chosen["memory_bytes"], {
        "eval_loss": chosen.get("eval_loss"), "exact_match": chosen.get("exact_match")})]
    print(f"\nbudget {budget / 1e6:.2f} MB (weights + adapter + its AdamW states); {args.steps} training steps each; search {search_s / 60:.1f} min\n")
    print("| plan | memory (MB) | eval_loss | exact_match |\n|---|---|---|---|")
    for label, mem, m in rows:
        em = m.get("exact_match")
        print(f"| {label} | {mem / 1e6:.2f} | {m['eval_loss']:.4f} | {em if em is None else f'{em:.3f}'} |")
    return {"budget": budget, "baseline": baseline["metrics"], "chosen": {k: v for k, v in chosen.items() if k != "layers"}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tuning", description=__doc__.split("\n\n")[0])
    p.add_argument("which", choices=["asha", "layerwise"])
    p.add_argument("--steps", type=int, default=None, help="full-length training steps (asha: 24, layerwise: 20)")
    p.add_argument("--trials", type=int, default=12, help="layerwise: plans proposed")
    p.add_argument("--short-steps", type=int, default=6, help="layerwise: steps of each short trial")
    args = p.parse_args(argv)
    args.steps = args.steps or (24 if args.which == "asha" else 20)
    result = (asha if args.which == "asha" else layerwise)(args)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tuning quality and cost, measured side by side in one run. Not a timed test.

    python -m benchmarks.tuning asha        # ASHA vs the full grid on the same space (tiny model, toy task)
    python -m benchmarks.tuning layerwise   # searched plan vs uniform 4-bit rank 8 at ≤ its memory (SmolLM2)

``asha``: the same 12-point grid (learning rate × rank) runs twice, once to completion (FIFO) and once
under ASHA; prints the best eval loss of each, their ratio, and the training steps each spent.

``layerwise``: on SmolLM2-135M with the shipped json_extract task, the search runs as ``raypeft layerwise``
does by default: under its baseline's settings (``--baseline qlora_gc``: uniform NF4 rank 8 with gradient
checkpointing, the standard QLoRA recipe), with that baseline's modelled peak as the budget (``--budget
105%`` allows 5 % more). The search chooses on training seed 0, so its own eval loss is biased in its
favour. The trade-off is then retrained on fresh seeds (``--seeds``, default 1 2 3): uniform QLoRA with
checkpointing (without it the math is the same, so its runs stand for both), uniform int8 and 16-bit LoRA
at the baseline's rank, and every promoted plan of the search's front. Each plan's peak is measured in a
fresh process (``benchmarks.memory``) beside its modelled one. The table and a memory-against-loss plot
go to the search's MLflow parent run. The last line holds ``loss_ratio_vs_qlora_gc`` (goal ≤ 0.8) and
``memory_ratio_vs_qlora_gc`` (measured peaks; goal ≤ 1.05). Every figure is in MiB.

``plan``: one full-length run of the same job, uniform NF4 rank 8 changed by ``--layers`` (``b8:29,11``:
layers 29 and 11 in int8; ``r0:24,25``: no adapter on layers 24 and 25; ``r16:11``: rank 16) and/or
``--set field=value`` overrides, e.g. ``--set model.quantization=int8``; prints its memory and metrics. With
``--measure-only`` it trains nothing and prints the plan's modelled peak beside the one measured in a fresh
process.
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

    from pipelines.model import tiny_llama
    from tests.conftest import write_chat_data

    return str(tiny_llama(Path(home) / "tiny")), str(write_chat_data(Path(home) / "chat.jsonl", n=96))


def asha(args) -> dict:
    from pipelines.spec.tune import validate
    from tuning.sweep import sweep

    home = tempfile.mkdtemp(prefix="bench-tune-")
    os.environ["RAYPEFT_HOME"] = home
    model, data = _tiny_setup(home)
    out = {}
    for scheduler in ("fifo", "asha"):
        spec = validate(
            {
                "name": f"bench-{scheduler}",
                "model": {"base": model},
                "method": {"name": "lora", "r": 4},
                "data": {"train": data, "format": "chat", "max_length": 64, "eval_fraction": 0.2},
                "train": {
                    "max_steps": args.steps,
                    "micro_batch_size": 4,
                    "warmup_steps": 1,
                    "eval_every": 3,
                    "eval_base": False,
                },
                "scaling": {"cpus_per_worker": 0.9},
                # the grid in a shuffled order (the same for both runs): trials start in this order, and
                # ASHA can only stop a trial that does worse than the ones before it
                "tune": {
                    "space": {"train.lr": {"grid": [3e-3, 1e-4, 3e-2, 3e-4, 1e-2, 1e-3]}, "method.r": {"grid": [4, 8]}},
                    "num_samples": 1,
                    "scheduler": scheduler,
                    "reduction_factor": 4,
                    "grace_period": 3,
                },
            }
        )
        t0 = time.time()
        res = sweep(spec, log=lambda m: print(m, file=sys.stderr))
        out[scheduler] = {
            "best_eval_loss": res["best"]["eval_loss"],
            "steps": res["total_steps"],
            "trials": res["trials"],
            "stopped_early": res["stopped_early"],
            "wall_s": round(time.time() - t0, 1),
        }
    ratio = out["asha"]["best_eval_loss"] / out["fifo"]["best_eval_loss"]
    steps = out["asha"]["steps"] / out["fifo"]["steps"]
    print("\n| run | best eval_loss | training steps | trials stopped early | wall |\n|---|---|---|---|---|")
    for k, label in (("fifo", "full grid (12 trials)"), ("asha", "ASHA, same grid")):
        o = out[k]
        print(f"| {label} | {o['best_eval_loss']:.4f} | {o['steps']} | {o['stopped_early']} | {o['wall_s']:.0f} s |")
    print(
        f"\nASHA best / grid best eval_loss: {ratio:.4f} (goal ≤ 1.02); ASHA steps / grid steps: {steps:.2f} (goal ≤ 0.40)"
    )
    return {**out, "loss_ratio": ratio, "steps_ratio": steps}


def _lw_raw(steps: int, trials: int = 15, short_steps: int = 6) -> dict:
    return {
        "name": "bench-lw",
        "model": {"base": "smollm2-135m"},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
        "data": {
            "train": "builtin:json_extract",
            "format": "chat",
            "max_length": 192,
            "task": "json_extract",
            "eval_task_samples": 32,
        },
        "train": {
            "max_steps": steps,
            "micro_batch_size": 4,
            "lr": 1e-3,
            "warmup_steps": 2,
            "eval_every": steps,
            "eval_base": False,
        },
        "scaling": {"cpus_per_worker": 0.9},
        "tune": {
            "layerwise": {
                "trials": trials,
                "population": 6,
                "short_steps": short_steps,
                "promote": 2,
                "calibration_samples": 16,
            }
        },
    }


def _plan_raw(raw: dict, layers, fields: dict) -> dict:
    """The benchmark job with ``layers`` as its base and adapter (uniform: a plain QLoRA-style job)."""
    from pipelines.spec import trial_raw
    from tuning import layerwise as L
    from tuning.search import ALL_TARGETS

    if L.is_uniform(layers):  # one quantization, one rank
        ((bits, rank),) = set(layers)
        plan = {
            "model.quantization": {4: "nf4", 8: "int8", 16: "none"}[bits],
            "method.r": rank,
            "method.alpha": 2.0 * rank,
        }
    else:
        plan = {"model.quantization": "nf4", **L.plan_fields(layers, ALL_TARGETS)}
    return trial_raw(raw, {**plan, **fields})


def _train_layers(raw: dict, layers, fields: dict, name: str) -> dict:
    from pipelines.spec import validate
    from pipelines.train import run

    return run(validate(_plan_raw(raw, layers, {"name": name, **fields})), log=lambda m: print(m, file=sys.stderr))[
        "metrics"
    ]


def _measured_peak(raw: dict, layers, fields: dict | None = None) -> int:
    """The plan's training peak measured on this machine (``benchmarks.memory``: fresh process, live-tensor RSS,
    a full micro batch of ``max_length`` tokens)."""
    from benchmarks.memory import LIVE_MALLOC, _measure

    return _measure(_plan_raw(raw, layers, fields or {}), LIVE_MALLOC)["measured"]


def _mean(runs: list[dict], key: str) -> float | None:
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


MIB = 2**20


def _plot(rows: list[dict], out: str) -> str:
    """Measured peak against mean eval loss (min–max over the seeds), one point per plan."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        losses = r["losses"]
        mean = sum(losses) / len(losses)
        ax.errorbar(
            r["measured"] / MIB, mean, yerr=[[mean - min(losses)], [max(losses) - mean]], fmt="o", capsize=3,
            color="red" if r["key"] == "chosen" else ("black" if r["key"] == "qlora_gc" else "tab:blue"),
        )  # fmt: skip
        ax.annotate(r["key"], (r["measured"] / MIB, mean), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("measured training peak (MiB)")
    ax.set_ylabel("eval loss, mean and min–max over seeds")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def layerwise(args) -> dict:
    """The search under the baseline's settings (default: QLoRA with gradient checkpointing, its modelled peak
    as the budget), then every plan of the trade-off retrained on fresh seeds with its peak measured."""
    import dataclasses

    from cluster.memory import describe
    from pipelines.spec.tune import validate
    from pipelines.tracking import client
    from tuning import layerwise as L
    from tuning.search import ALL_TARGETS, plan_memory, search, under_baseline

    home = tempfile.mkdtemp(prefix="bench-layerwise-")
    os.environ["RAYPEFT_HOME"] = home
    raw = _lw_raw(args.steps, args.trials, args.short_steps)
    raw["tune"]["layerwise"].update({"memory": args.memory, "baseline": args.baseline})
    if args.budget:
        raw["tune"]["layerwise"]["budget"] = args.budget
    spec, baseline = under_baseline(validate(raw))
    mem = plan_memory(spec)  # with the baseline's checkpointing
    weights = L.Memory(mem.shape, ALL_TARGETS)  # weights + adapter + its states, whatever the budget counts
    gc = {"model.gradient_checkpointing": spec.model.gradient_checkpointing}
    t0 = time.time()
    found = search(validate(raw), out=os.path.join(home, "plan.yaml"), log=lambda m: print(m, file=sys.stderr))
    search_s = time.time() - t0
    budget, chosen = found["budget_bytes"], found["chosen"]
    print(
        f"\nbudget {budget / MIB:.1f} MiB ({args.memory}), baseline {args.baseline}; search {search_s / 60:.1f} min, "
        f"{found['plans_trained']} plans trained\n\nplans promoted to {args.steps} steps on seed 0 (the search's own):\n"
    )
    print("| plan | modelled (MiB) | eval_loss (seed 0) | exact_match (seed 0) |\n|---|---|---|---|")
    for p in found["promoted"]:
        mark = " (chosen)" if p["layers"] == chosen["layers"] else ""
        em = p.get("exact_match")
        print(
            f"| {describe(p['layers'])}{mark} | {p['memory_bytes'] / MIB:.1f} | "
            f"{p.get('eval_loss', float('nan')):.4f} | {'—' if em is None else f'{em:.3f}'} |"
        )
    # an unbiased comparison: fresh seeds the search never saw, peaks measured in fresh processes. The
    # trade-off: uniform QLoRA with and without checkpointing, uniform int8 and 16-bit LoRA (the baseline's
    # checkpointing), and every promoted plan of the search's front
    r = spec.method.r
    rows = [
        ("qlora", f"uniform NF4 r{r} (QLoRA), no checkpointing", L.uniform(mem.shape, 4, r), {"model.gradient_checkpointing": False}),
        ("qlora_gc", f"uniform NF4 r{r}, gradient checkpointing", L.uniform(mem.shape, 4, r), {"model.gradient_checkpointing": True}),
        ("int8", f"uniform int8 r{r}", L.uniform(mem.shape, 8, r), gc),
        ("lora16", f"uniform 16-bit r{r} (LoRA)", L.uniform(mem.shape, 16, r), gc),
    ]  # fmt: skip
    searched = [p for p in found["promoted"] if p["layers"] != baseline]
    for k, p in enumerate(sorted(searched, key=lambda p: p["layers"] != chosen["layers"])):
        key = "chosen" if p["layers"] == chosen["layers"] else f"front{k}"
        rows.append((key, f"searched ({key}): {describe(p['layers'])}", p["layers"], gc))
    if not any(key == "chosen" for key, *_ in rows):
        print("\nthe search chose the baseline itself: no searched plan beat it after the full-length run")
    runs: dict[str, list[dict]] = {key: [] for key, *_ in rows}
    for seed in args.seeds:
        for key, _, layers, fields in rows:
            if key == "qlora":  # checkpointing doesn't change the math: qlora_gc's losses
                continue
            t1 = time.time()
            metrics = _train_layers(raw, layers, {"train.seed": seed, **fields}, f"bench-{key}-s{seed}")
            runs[key].append({**metrics, "wall_s": round(time.time() - t1, 1)})
    runs["qlora"] = runs["qlora_gc"]
    measured = {key: _measured_peak(raw, layers, fields) for key, _, layers, fields in rows}
    modelled = {
        key: dataclasses.replace(mem, checkpointing=fields["model.gradient_checkpointing"])(layers)
        for key, _, layers, fields in rows
    }
    table = [
        "| plan | modelled peak (MiB) | measured peak (MiB) | model error | weights + adapter + states (MiB) | "
        "eval_loss per seed | mean eval_loss (min–max) | mean exact_match | mean wall per run |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    points = []
    for key, label, layers, _ in rows:
        losses = [x["eval_loss"] for x in runs[key]]
        err = modelled[key] / measured[key] - 1
        table.append(
            f"| {label} | {modelled[key] / MIB:.1f} | {measured[key] / MIB:.0f} | {100 * err:+.1f} % | "
            f"{weights(layers) / MIB:.1f} | {' / '.join(f'{x:.4f}' for x in losses)} | "
            f"{_mean(runs[key], 'eval_loss'):.4f} ({min(losses):.4f}–{max(losses):.4f}) | "
            f"{_mean(runs[key], 'exact_match'):.3f} | {_mean(runs[key], 'wall_s'):.0f} s |"
        )
        points.append({"key": key, "measured": measured[key], "losses": losses})
    print(f"\nretrained on fresh seeds {args.seeds} (qlora: qlora_gc's runs, the same math):\n")
    print("\n".join(table))
    best = "chosen" if "chosen" in runs else "qlora_gc"
    paired = [c["eval_loss"] < u["eval_loss"] for c, u in zip(runs[best], runs["qlora_gc"])]
    loss_ratio = _mean(runs[best], "eval_loss") / _mean(runs["qlora_gc"], "eval_loss")
    memory_ratio = measured[best] / measured["qlora_gc"]
    em_ok = (_mean(runs[best], "exact_match") or 0) >= (_mean(runs["qlora_gc"], "exact_match") or 0)
    win = best == "chosen" and all(paired) and memory_ratio <= 1.05 and em_ok
    print(
        f"\nsearched vs QLoRA + checkpointing: mean eval_loss {loss_ratio:.3f}× (goal ≤ 0.8), lower on {sum(paired)} "
        f"of {len(paired)} seeds, exact match {'no worse' if em_ok else 'worse'}, measured peak {memory_ratio:.3f}× "
        f"(goal ≤ 1.05): {'win' if win else 'no win'}"
    )
    png = _plot(points, os.path.join(home, "tradeoff.png"))
    with open(os.path.join(home, "tradeoff.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    c = client(found["tracking_uri"])
    c.log_artifact(found["parent_run_id"], png)
    c.log_artifact(found["parent_run_id"], os.path.join(home, "tradeoff.md"))
    return {
        "budget": budget,
        "baseline": args.baseline,
        "memory": args.memory,
        "search_s": round(search_s, 1),
        "chosen": describe(chosen["layers"]),
        "chosen_layers": chosen["layers"],
        "runs": runs,
        "measured_peak": measured,
        "modelled_peak": modelled,
        "lower_on_seeds": sum(paired),
        "exact_match_no_worse": em_ok,
        "verdict": "win" if win else "no win",
        "loss_ratio_vs_qlora_gc": round(loss_ratio, 4),
        "memory_ratio_vs_qlora_gc": round(memory_ratio, 4),
        "tradeoff_png": png,
        "mlflow_parent_run": found["parent_run_id"],
    }


def plan(args) -> dict:
    """One full-length run of the benchmark job: uniform NF4 rank 8 changed by ``--layers`` / ``--set``."""
    from cluster.memory import describe
    from pipelines.lifecycle import shape_of
    from pipelines.spec import validate
    from tuning import layerwise as L
    from tuning.search import ALL_TARGETS

    os.environ["RAYPEFT_HOME"] = tempfile.mkdtemp(prefix="bench-plan-")
    raw = _lw_raw(args.steps)
    shape = shape_of(validate(raw))
    layers = list(L.uniform(shape, 4, 8))
    for part in (args.layers or "").split():
        kind, idx = part.split(":")
        for i in map(int, idx.split(",")):
            b, r = layers[i]
            layers[i] = (int(kind[1:]), r) if kind[0] == "b" else (b, int(kind[1:]))
    fields = dict(kv.split("=", 1) for kv in args.set)
    if args.measure_only:  # no training: the modelled peak beside the one measured in a fresh process
        spec = validate(raw)
        gc = str(fields.get("model.gradient_checkpointing", "false")).lower() == "true"
        memory = L.Memory(
            shape, ALL_TARGETS, tokens=spec.train.micro_batch_size * spec.data.max_length, checkpointing=gc,
            loss_chunk=spec.train.loss_chunk_tokens,
        )  # fmt: skip
        modelled, measured = memory(layers), _measured_peak(raw, layers, fields)
        print(
            f"\n{describe(layers)} {' '.join(args.set)}: modelled peak {modelled / MIB:.1f} MiB, measured "
            f"{measured / MIB:.1f} MiB ({100 * (modelled / measured - 1):+.1f} %)"
        )
        return {"plan": describe(layers), "set": fields, "modelled_peak": modelled, "measured_peak": measured}
    metrics = _train_layers(raw, layers, fields, "bench-plan")
    spec = validate(raw)
    tokens = spec.train.micro_batch_size * spec.data.max_length
    known = not set(fields) - {"train.seed"}  # other overrides may change what the memory model is given
    mem = L.memory(shape, layers, ALL_TARGETS) if known else None
    peak = L.memory(shape, layers, ALL_TARGETS, tokens=tokens) if known else None
    print(
        f"\n{describe(layers)} {' '.join(args.set)}: peak {'—' if peak is None else f'{peak / 1e6:.2f} MB'}, weights + adapter + states "
        f"{'—' if mem is None else f'{mem / 1e6:.2f} MB'}, eval_loss {metrics['eval_loss']:.4f}, exact_match {metrics.get('exact_match')}"
    )
    return {"plan": describe(layers), "set": fields, "memory_bytes": mem, "peak_bytes": peak, **metrics}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tuning", description=__doc__.split("\n\n")[0])
    p.add_argument("which", choices=["asha", "layerwise", "plan"])
    p.add_argument("--steps", type=int, default=None, help="full-length training steps (asha: 24, layerwise: 20)")
    p.add_argument(
        "--trials", type=int, default=15, help="layerwise: plans proposed (two thirds of them calibration seeds)"
    )
    p.add_argument("--short-steps", type=int, default=6, help="layerwise: steps of each short trial")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2, 3], help="layerwise: fresh training seeds for the comparison"
    )
    p.add_argument(
        "--memory",
        choices=["peak", "weights"],
        default="peak",
        help="layerwise: what the budget (uniform NF4 rank 8's) counts (tune.layerwise.memory)",
    )
    p.add_argument(
        "--baseline",
        choices=["qlora_gc", "qlora", "none"],
        default="qlora_gc",
        help="layerwise: the plan the search must beat and whose checkpointing it takes (tune.layerwise.baseline)",
    )
    p.add_argument("--budget", help="layerwise: the budget (default: the baseline's modelled memory), e.g. 105%%")
    p.add_argument("--layers", help="plan: per-layer changes to uniform NF4 rank 8, e.g. 'b8:29,11 r0:24,25'")
    p.add_argument("--set", action="append", default=[], help="plan: a spec override field=value (repeatable)")
    p.add_argument(
        "--measure-only", action="store_true", help="plan: no training; the modelled and measured (fresh process) peak"
    )
    args = p.parse_args(argv)
    args.steps = args.steps or (24 if args.which == "asha" else 20)
    result = {"asha": asha, "layerwise": layerwise, "plan": plan}[args.which](args)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The layerwise bit-width × rank search under a memory budget: ``raypeft layerwise SPEC --budget 60MB``.

Phase 1 calibrates (``tuning.calibrate``, in a Ray task). Phase 2 runs NSGA-II (Optuna's sampler, through
Tune's ``OptunaSearch``) over (eval loss, memory), with the budget as a constraint and the calibration's
seed plans enqueued first; every proposal within budget is a short training trial on Ray Tune, the rest
are recorded as infeasible without training. The best few Pareto plans are retrained for the spec's
``train.max_steps``. Phase 3 logs the Pareto front (table + PNG) to MLflow and writes the chosen plan as a
job spec that ``raypeft train`` consumes unchanged.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ray import tune

from cluster.memory import Plan, describe
from pipelines.spec import JobSpec, SpecError, TunedJobSpec, trial_raw, validate, with_tune
from tuning import layerwise as L
from tuning.sweep import PENALTY, metric_batch, run_trials

ALL_TARGETS = Plan.targets  # every linear of a decoder layer

MIB = 2**20  # every figure the search reports is in MiB, as measured peaks are


def _targets(spec: JobSpec) -> tuple[str, ...]:
    t = spec.method.target_modules
    if isinstance(t, list):
        return tuple(x for x in ALL_TARGETS if x in t) or ALL_TARGETS
    return ALL_TARGETS


def plan_memory(spec: TunedJobSpec) -> L.Memory:
    """How the spec's ``tune.layerwise.memory`` counts a plan's bytes: the training step's peak (activations of
    ``train.micro_batch_size`` × ``data.max_length`` tokens included) or weights + adapter + its states only."""
    from pipelines.lifecycle import DTYPE_BYTES, shape_of

    lw = spec.tune.layerwise
    # a plan with 4/8-bit layers trains its unquantized parameters and activations in fp32 (``plan.param_bytes``)
    pbytes = 4 if min(lw.bits) < 16 else DTYPE_BYTES[spec.model.dtype]
    return L.Memory(
        shape_of(spec),
        _targets(spec),
        pbytes,
        spec.model.double_quant,
        spec.train.micro_batch_size * spec.data.max_length if lw.memory == "peak" else 0,
        spec.model.gradient_checkpointing,
        spec.train.loss_chunk_tokens,
    )


def _with(spec: TunedJobSpec, fields: dict[str, Any]) -> TunedJobSpec:
    """``spec`` with a plan's fields set (the job part validated again), keeping its ``tune`` section."""
    return with_tune(validate(trial_raw(spec.model_dump(mode="json", exclude={"tune"}), fields)), spec.tune)


def under_baseline(spec: TunedJobSpec) -> tuple[TunedJobSpec, L.Layers | None]:
    """The spec the search runs under, and the baseline plan (None for ``baseline: none``). ``qlora_gc`` and
    ``qlora`` are uniform NF4 at ``method.r``, with gradient checkpointing on and off: every plan the search
    trains and writes gets the baseline's checkpointing, and ``method.r`` joins the ranks searched, so the
    baseline is a plan of the search's own space."""
    from pipelines.lifecycle import shape_of

    lw = spec.tune.layerwise
    if lw.baseline == "none":
        return spec, None
    ranks = sorted(set(lw.ranks) | {spec.method.r})
    tune_ = spec.tune.model_copy(update={"layerwise": lw.model_copy(update={"ranks": ranks})})
    job = _with(spec, {"model.gradient_checkpointing": lw.baseline == "qlora_gc"})
    return with_tune(job, tune_), L.uniform(shape_of(spec), 4, spec.method.r)


def budget_of(spec: TunedJobSpec, baseline: L.Layers | None) -> int:
    """``tune.layerwise.budget`` in bytes of what ``tune.layerwise.memory`` counts: as given, as a share of the
    baseline's memory (``105%``), or, unset, the baseline's own memory.

    Raises:
        SpecError: no budget and no baseline to take it from.
    """
    from cluster.memory import parse_bytes
    from pipelines.spec import budget_share

    b = spec.tune.layerwise.budget
    if baseline is None and (b is None or str(b).strip().endswith("%")):
        raise SpecError(
            [("tune.layerwise.budget", f"required with baseline 'none': pass --budget 60MB or set it (got {b!r})")]
        )
    if b is None:
        return math.ceil(plan_memory(spec)(baseline))
    if str(b).strip().endswith("%"):
        return math.ceil(budget_share(b) * plan_memory(spec)(baseline))
    return parse_bytes(b)


class PlanSpace:
    """Optuna define-by-run space: a bit-width and a rank per layer. A proposal over budget is repaired
    (``layerwise.repair``) and the repaired plan is what trains; the budget also goes to NSGA-II as a
    constraint, for the proposals no repair saves. A class, not a closure: Tune pickles the searcher."""

    def __init__(self, memory: L.Memory, bits, ranks, budget, sensitivity, importance):
        self.memory, self.bits, self.ranks, self.budget = memory, list(bits), list(ranks), budget
        self.sensitivity, self.importance = sensitivity, importance

    def fits(self, layers: L.Layers) -> bool:
        return self.memory(layers) <= self.budget and any(r for _, r in layers)

    def __call__(self, trial) -> dict[str, Any]:
        layers = [
            (trial.suggest_categorical(f"bits_{i}", self.bits), trial.suggest_categorical(f"rank_{i}", self.ranks))
            for i in range(self.memory.shape.layers)
        ]
        fixed = L.repair(layers, self.sensitivity, self.importance, self.bits, self.ranks, self.fits, self.memory)
        plan = fixed or layers
        m, adapted = self.memory(plan), any(r for _, r in plan)
        trial.set_user_attr("constraint", [m - self.budget, 0.0 if adapted else 1.0])
        ok = m <= self.budget and adapted
        return {
            **(L.plan_fields(plan, self.memory.targets) if ok else {}),
            **L.to_point(plan),
            "memory_bytes": m,
            "over_budget": not ok,
            "repaired": fixed is not None and fixed != layers,
        }


def _constraints(trial) -> list[float]:
    return trial.user_attrs.get("constraint", [0.0, 0.0])


@dataclass
class _Search:
    """One search's fixed parts, passed from phase to phase: the spec under the baseline's settings, the
    baseline plan, the budget and memory model, and its MLflow parent run."""

    spec: TunedJobSpec
    baseline: L.Layers | None
    budget: int
    mem: Any  # the spec's memory model (plan_memory)
    name: str
    uri: str
    parent: str
    client: Any
    log: Any

    def fits(self, layers: L.Layers) -> bool:
        return self.mem(layers) <= self.budget and any(r for _, r in layers)


def search(spec: TunedJobSpec, budget: int | None = None, out: str | None = None, log=print) -> dict[str, Any]:
    """The search, under the baseline's settings (``under_baseline``); ``budget`` in bytes, default
    ``budget_of`` the spec. Phases: calibrate, short trials (NSGA-II), full-length trials of the best few
    and the reference, outputs."""
    s = _start(spec, budget, log)
    t0 = time.time()
    seeds, cal = _calibrate(s)
    rows = _short_trials(s, seeds, cal)
    if not rows:
        from pipelines import tracking

        tracking.fail_run(s.uri, s.parent, "no plan within budget trained")
        return {"name": s.name, "parent_run_id": s.parent, "front": [], "plan_spec": None}
    front = [rows[i] for i in L.pareto_front([(r["short_eval_loss"], r["memory_bytes"]) for r in rows])]
    log(f"[raypeft] {len(rows)} plan(s) trained within budget, {len(front)} on the Pareto front")
    promoted, reference, chosen = _full_trials(s, rows, front)
    out_path = _outputs(s, rows, front, promoted, reference, chosen, out)
    return {
        "name": s.name,
        "parent_run_id": s.parent,
        "tracking_uri": s.uri,
        "budget_bytes": s.budget,
        "baseline": s.spec.tune.layerwise.baseline,
        "gradient_checkpointing": s.spec.model.gradient_checkpointing,
        "wall_s": round(time.time() - t0, 1),
        "plan_spec": str(out_path),
        "chosen": {**chosen, "describe": describe(chosen["layers"])},
        "front": front,
        "reference": reference,
        "promoted": promoted,
        "plans_trained": len(rows),
    }


def _start(spec: TunedJobSpec, budget: int | None, log) -> _Search:
    """The baseline's settings and the budget; a budget no plan fits is refused before the parent run."""
    from pipelines import tracking
    from pipelines.train import job_lineage

    spec, baseline = under_baseline(spec)
    budget = budget_of(spec, baseline) if budget is None else budget
    lw = spec.tune.layerwise
    mem = plan_memory(spec)
    what = (
        f"peak memory ({spec.train.micro_batch_size} × {spec.data.max_length} tokens)"
        if mem.tokens
        else "weights + adapter memory"
    )
    smallest = mem(L.uniform(mem.shape, min(lw.bits), min([r for r in lw.ranks if r] or [1])))
    if smallest > budget:
        raise SpecError(
            [
                (
                    "tune.layerwise.budget",
                    f"even the smallest plan ({min(lw.bits)}-bit, rank {min(r for r in lw.ranks if r)}) "
                    f"needs {smallest / 1e6:.1f} MB of {what} (got {budget / 1e6:.1f} MB)",
                )
            ]
        )

    name = f"{spec.name}-layerwise-{time.strftime('%Y%m%d-%H%M%S')}"
    uri = tracking.tracking_uri(spec)
    tracking.check_server(uri)  # before Ray starts
    parent = tracking.start_run(spec, uri, name, {**job_lineage(spec), "raypeft.layerwise": name})
    c = tracking.client(uri)
    c.log_batch(parent, metrics=metric_batch({"budget_bytes": budget}))
    against = (
        f"baseline {lw.baseline} ({describe(baseline)}, {mem(baseline) / MIB:.1f} MiB"
        f"{', gradient checkpointing' if spec.model.gradient_checkpointing else ''})"
        if baseline
        else "no baseline"
    )
    log(
        f"[raypeft] layerwise search {name}: {mem.shape.layers} layers × bits {lw.bits} × ranks {lw.ranks}, "
        f"budget {budget / MIB:.1f} MiB of {what}, {against}; MLflow parent run {parent}"
    )
    return _Search(spec, baseline, budget, mem, name, uri, parent, c, log)


def _calibrate(s: _Search) -> tuple[list[L.Layers], dict[str, Any]]:
    """Phase 1, calibration (a Ray task, so it runs on the cluster like the trials), and the seed plans it
    gives, the baseline first."""
    import ray

    from cluster.connect import init_ray
    from tuning.calibrate import calibrate

    spec, lw, shape = s.spec, s.spec.tune.layerwise, s.mem.shape
    # nothing of the search runs during calibration: it is scheduled on one CPU, so it never waits for a
    # whole free node, and uses as many threads as the cluster has free CPUs (at most one node's)
    init_ray()
    node = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=0)
    threads = max(1, int(min(node, ray.available_resources().get("CPU", 0))))
    cal = ray.get(
        ray.remote(calibrate)
        .options(num_cpus=1)
        .remote(spec, lw.bits, s.mem.targets, lw.calibration_samples, threads=threads)
    )
    s.client.log_text(s.parent, json.dumps(cal, indent=1), "calibration.json")
    order = sorted(
        range(shape.layers), key=lambda i: -max(cal["sensitivity"].get(min(lw.bits), [0] * shape.layers)[i], 0)
    )
    s.log(
        f"[raypeft] most quantization-sensitive layers: {order[:5]}; most rank-important: "
        f"{sorted(range(shape.layers), key=lambda i: -cal['importance'][i])[:5]}"
    )
    seeds = L.seed_plans(cal["sensitivity"], cal["importance"], lw.bits, lw.ranks, s.fits)
    if s.baseline is not None and s.fits(s.baseline):  # trained first, whatever the trial count
        seeds = [s.baseline, *(x for x in seeds if x != s.baseline)]
    s.log(f"[raypeft] {len(seeds)} seed plan(s) from the calibration: " + "; ".join(describe(x) for x in seeds[:4]))
    return seeds, cal


def _short_trials(s: _Search, seeds: list[L.Layers], cal: dict[str, Any]) -> list[dict[str, Any]]:
    """Phase 2: NSGA-II over (eval loss, memory), short trials. The plans that trained within budget."""
    from optuna.samplers import NSGAIISampler
    from ray.tune.search.optuna import OptunaSearch

    lw = s.spec.tune.layerwise
    # short trials rank plans by eval loss only: no generation-based task metric
    short = _with(
        s.spec,
        {
            "train.max_steps": lw.short_steps,
            "train.eval_every": lw.short_steps,
            "data.task": "none",
            "train.warmup_steps": min(s.spec.train.warmup_steps, lw.short_steps - 1),
            "checkpoint.every_steps": 0,
        },
    )
    space = PlanSpace(s.mem, lw.bits, lw.ranks, s.budget, cal["sensitivity"], cal["importance"])
    sampler = NSGAIISampler(population_size=lw.population, seed=lw.seed, constraints_func=_constraints)
    searcher = OptunaSearch(
        space=space,
        metric=["eval_loss", "memory_bytes"],
        mode=["min", "min"],
        sampler=sampler,
        points_to_evaluate=[L.to_point(x) for x in seeds[: max(1, 2 * lw.trials // 3)]],
    )  # a third left to NSGA-II
    grid, _ = run_trials(
        short,
        f"{s.name}-short",
        {},
        metric=None,
        mode=None,
        num_samples=lw.trials,
        searcher=searcher,
        parent_run_id=s.parent,
        uri=s.uri,
        max_steps=lw.short_steps,
        verbose=0,
        log=s.log,
    )
    rows = []
    for r in grid:
        cfg, last = r.config, (r.metrics or {})
        if r.error or last.get("over_budget") or not isinstance(last.get("eval_loss"), (int, float)):
            continue
        rows.append(
            {
                "trial": last.get("trial_id"),
                "layers": L.from_point(cfg),
                "memory_bytes": cfg["memory_bytes"],
                "short_eval_loss": last["eval_loss"],
            }
        )
    return rows


def _full_trials(s: _Search, rows: list[dict], front: list[dict]) -> tuple[list[dict], dict | None, dict]:
    """Promote the best few to full-length trials, plus the reference: the baseline, or without one the
    largest uniform plan within budget (what one would train without the search), so the search never
    returns a plan worse than it. Returns (promoted, reference, chosen)."""
    spec, lw = s.spec, s.spec.tune.layerwise
    promoted = sorted(front, key=lambda r: r["short_eval_loss"])[: lw.promote]
    uniform = [r for r in rows if L.is_uniform(r["layers"])]
    reference = next((r for r in rows if r["layers"] == s.baseline), None)
    if reference is None and uniform:
        reference = max(uniform, key=lambda r: (r["memory_bytes"], -r["short_eval_loss"]))
    if reference is not None and all(p["layers"] != reference["layers"] for p in promoted):
        promoted.append(reference)
    long_space = {
        "plan": tune.grid_search(
            [
                {
                    **L.plan_fields(p["layers"], s.mem.targets),
                    **L.to_point(p["layers"]),
                    "memory_bytes": p["memory_bytes"],
                }
                for p in promoted
            ]
        )
    }
    grid2, _ = run_trials(
        spec,
        f"{s.name}-long",
        long_space,
        metric=None,
        mode=None,
        num_samples=1,
        parent_run_id=s.parent,
        uri=s.uri,
        max_steps=spec.train.max_steps,
        verbose=0,
        log=s.log,
    )
    for r in grid2:
        layers = L.from_point(r.config["plan"])
        for p in promoted:
            if p["layers"] == layers and isinstance((r.metrics or {}).get("eval_loss"), (int, float)):
                p["eval_loss"] = r.metrics["eval_loss"]
                p["exact_match"] = r.metrics.get("exact_match")
    finished = [p for p in promoted if "eval_loss" in p]
    chosen = min(finished or promoted, key=lambda p: p.get("eval_loss", p["short_eval_loss"]))
    if reference is not None:
        reference = next(p for p in promoted if p["layers"] == reference["layers"])
        if chosen["layers"] == reference["layers"]:
            s.log(
                f"[raypeft] no searched plan beat the uniform reference ({describe(reference['layers'])}) after "
                f"{spec.train.max_steps} steps: choosing it"
            )
    return promoted, reference, chosen


def _outputs(s: _Search, rows, front, promoted, reference, chosen, out: str | None) -> Path:
    """Phase 3: the front's table and plot and the chosen plan's spec, to MLflow and to ``out``."""
    spec, budget, c, parent = s.spec, s.budget, s.client, s.parent
    table = front_table(front + [p for p in promoted if p not in front], chosen, budget, reference)
    print(table, flush=True)
    plan_spec = _with(spec, L.plan_fields(chosen["layers"], s.mem.targets))
    out_path = Path(out or f"{spec.name}-layerwise.yaml")
    header = (
        f"# written by `raypeft layerwise` ({s.name}): {describe(chosen['layers'])}\n"
        f"# memory {chosen['memory_bytes'] / MIB:.2f} MiB of a {budget / MIB:.2f} MiB budget; "
        f"eval_loss {chosen.get('eval_loss', chosen['short_eval_loss']):.4f}\n"
    )
    out_path.write_text(header + yaml.safe_dump(plan_spec.model_dump(mode="json", exclude={"tune"}), sort_keys=False))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "pareto_front.md").write_text(table + "\n")
        c.log_artifact(parent, str(Path(tmp) / "pareto_front.md"))
        c.log_artifact(parent, str(front_png(rows, front, chosen, budget, Path(tmp) / "pareto_front.png")))
        c.log_artifact(parent, str(out_path))
    c.log_batch(
        parent,
        metrics=metric_batch(
            {
                "chosen_memory_bytes": chosen["memory_bytes"],
                "chosen_eval_loss": chosen.get("eval_loss", PENALTY),
                "chosen_short_eval_loss": chosen["short_eval_loss"],
                "plans_trained": len(rows),
                "pareto_size": len(front),
                **({"reference_eval_loss": reference["eval_loss"]} if reference and "eval_loss" in reference else {}),
                **({"reference_memory_bytes": reference["memory_bytes"]} if reference else {}),
            }
        ),
    )
    c.set_tag(parent, "raypeft.baseline", spec.tune.layerwise.baseline)
    c.set_tag(parent, "raypeft.plan", describe(chosen["layers"]))
    c.set_terminated(parent, "FINISHED")
    s.log(
        f"[raypeft] chosen plan: {describe(chosen['layers'])}, {chosen['memory_bytes'] / MIB:.2f} MiB, "
        f"eval_loss {chosen.get('eval_loss', chosen['short_eval_loss']):.4f} → {out_path}  (train it: raypeft train {out_path})"
    )
    return out_path


def front_table(
    front: list[dict[str, Any]], chosen: dict[str, Any], budget: int, reference: dict[str, Any] | None = None
) -> str:
    """The Pareto front (and any promoted plan off it, such as the uniform reference) as a markdown table."""
    lines = ["| plan | memory (MiB) | % of budget | short eval_loss | full eval_loss |", "|---|---|---|---|---|"]
    for r in sorted(front, key=lambda r: r["memory_bytes"]):
        mark = (" **(chosen)**" if r is chosen else "") + (" (uniform reference)" if r is reference else "")
        full = f"{r['eval_loss']:.4f}" if "eval_loss" in r else "—"
        lines.append(
            f"| {describe(r['layers'])}{mark} | {r['memory_bytes'] / MIB:.2f} | {100 * r['memory_bytes'] / budget:.0f}% "
            f"| {r['short_eval_loss']:.4f} | {full} |"
        )
    return "\n".join(lines)


def front_png(rows, front, chosen, budget: int, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(
        [r["memory_bytes"] / MIB for r in rows],
        [r["short_eval_loss"] for r in rows],
        c="lightgray",
        label="plans within budget",
    )
    f = sorted(front, key=lambda r: r["memory_bytes"])
    ax.plot([r["memory_bytes"] / MIB for r in f], [r["short_eval_loss"] for r in f], "o-", label="Pareto front")
    ax.scatter(
        [chosen["memory_bytes"] / MIB],
        [chosen["short_eval_loss"]],
        marker="*",
        s=200,
        c="red",
        label="chosen",
        zorder=3,
    )
    ax.axvline(budget / MIB, ls="--", c="k", lw=1, label="budget")
    ax.set_xlabel("memory (MiB), as the budget counts it (tune.layerwise.memory)")
    ax.set_ylabel("eval loss after the short trial")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out

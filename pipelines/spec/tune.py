"""The ``tune`` section of a job spec: a Ray Tune sweep and the layerwise bit-width × rank search. Every command
that reads a spec file validates it (``load_spec``, ``validate_document``); ``tuning`` runs it.

Pure: no Ray, no torch. The sweep's search space names spec fields by their dotted path::

    tune:
      space:
        train.lr: {loguniform: [1.0e-5, 1.0e-2]}
        method.r: {choice: [4, 8, 16]}
        method.alpha: {grid: [8, 32]}
      scheduler: asha
      num_samples: 8

Every value the space can produce is checked against the job spec before anything starts (choices and
grid values one by one, ranges at both ends), so a bad space fails with the field and the value.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from pipelines.spec.base import SEED_MAX, STEPS_MAX, Float, Int, Section, load_file, set_path, validate_spec
from pipelines.spec.job import JobSpec, Problem, SpecError, resolve_paths, semantic_problems
from pipelines.spec.job import validate as validate_job

Rank = Annotated[Int, Field(ge=0)]

DOMAINS = {
    "choice": "a list of values, sampled uniformly",
    "grid": "a list of values, every one tried (× num_samples)",
    "uniform": "[low, high], a float sampled uniformly",
    "loguniform": "[low, high], a float sampled uniformly in log space (low > 0)",
    "randint": "[low, high], an integer in low..high-1",
}


class LayerwiseSpec(Section):
    budget: Int | str | None = Field(
        None,
        description="Memory budget per worker, in bytes, with a unit (`60MB`, `1.2GiB`) or as a share of the "
        "baseline's (`105%`): what `memory` counts. Default: the baseline's own (`baseline`); required when "
        "`baseline` is `none` (or pass `--budget`).",
    )
    baseline: Literal["qlora_gc", "qlora", "none"] = Field(
        "qlora_gc",
        description="The plan the search must beat, whose settings it searches under. `qlora_gc`: uniform NF4 at "
        "`method.r` with gradient checkpointing (the standard QLoRA recipe): every plan then trains with "
        "checkpointing, and the default budget is this plan's memory. `qlora`: the same without checkpointing. "
        "Either is always trained in full and chosen unless a searched plan beats it; `method.r` joins `ranks`. "
        "`none`: the job's settings "
        "as given, the largest uniform plan within budget as the reference; `budget` required.",
    )
    memory: Literal["peak", "weights"] = Field(
        "peak",
        description="What the budget bounds. `peak`: the training step's peak, as `raypeft plan` models it: weights, "
        "adapter, its gradients and AdamW states, and the activations of `train.micro_batch_size` × `data.max_length` "
        "tokens, which depend on the plan (a layer below every adapter keeps none). `weights`: weights + adapter + "
        "its gradients and AdamW states only (QR-Adaptor's measure).",
    )
    bits: list[Literal[4, 8, 16]] = Field(
        [4, 8, 16],
        min_length=1,
        description="Bit-widths a decoder layer may take: 4 (bnb NF4), 8 (bnb int8), 16 (unquantized).",
    )
    ranks: list[Rank] = Field(
        [0, 4, 8, 16],
        min_length=1,
        description="LoRA ranks a decoder layer may take (0: no adapter; at least one > 0); alpha = 2·rank.",
    )
    calibration_samples: Int = Field(
        16, gt=0, le=100_000, description="Training examples the sensitivity calibration runs on."
    )
    trials: Int = Field(
        24,
        gt=0,
        le=100_000,
        description="Plans NSGA-II proposes. One over budget is repaired to fit (bit-widths down first, then rank) and trained; one no repair fits is not trained.",
    )
    population: Int = Field(
        8, ge=2, le=10_000, description="NSGA-II population size (generations = trials / population)."
    )
    short_steps: Int = Field(10, gt=0, le=STEPS_MAX, description="Training steps of each cheap trial.")
    promote: Int = Field(
        2,
        gt=0,
        le=1000,
        description="Best Pareto plans (by short-trial eval loss) retrained for `train.max_steps` steps.",
    )
    seed: Int = Field(0, ge=0, le=SEED_MAX, description="Sampler seed.")

    @field_validator("ranks")
    @classmethod
    def _some_adapter(cls, v: list[int]) -> list[int]:
        if not any(v):
            raise ValueError(f"needs at least one rank > 0, or no plan has an adapter (got {v})")
        return v


class TuneSpec(Section):
    space: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Search space: dotted spec field → `{choice: [...]}`, `{grid: [...]}`, `{uniform: [lo, hi]}`, "
        "`{loguniform: [lo, hi]}` or `{randint: [lo, hi]}`.",
    )
    searcher: Literal["random", "optuna"] = Field(
        "random", description="`random` (Tune's variant generator, grids included) or `optuna` (TPE)."
    )
    scheduler: Literal["asha", "hyperband", "median", "fifo"] = Field(
        "asha",
        description="Trial scheduler: ASHA, HyperBand, median stopping, or `fifo` (no early stopping). Time is optimizer steps.",
    )
    num_samples: Int = Field(8, gt=0, le=100_000, description="Trials to sample (with grids: samples per grid point).")
    metric: str = Field(
        "eval_loss", min_length=1, description="Metric the scheduler and searcher optimize (reported at every eval)."
    )
    mode: Literal["min", "max"] = Field("min", description="Minimize or maximize `metric`.")
    grace_period: Int | None = Field(
        None, gt=0, le=STEPS_MAX, description="Steps before a trial may be stopped (default: `train.eval_every`)."
    )
    reduction_factor: Float = Field(2.0, gt=1, le=100, description="ASHA / HyperBand reduction factor.")
    max_concurrent_trials: Int | None = Field(
        None,
        gt=0,
        le=10_000,
        description="Trials run at once (default and cap: as many as the cluster's CPUs/GPUs hold, so placement never deadlocks).",
    )
    seed: Int | None = Field(None, ge=0, le=SEED_MAX, description="Searcher seed.")
    layerwise: LayerwiseSpec = Field(
        default_factory=LayerwiseSpec, description="The layerwise bit-width × rank search (`raypeft layerwise`)."
    )


def _domain_values(field: str, dom: Any) -> tuple[list[tuple[str, str]], list[Any]]:
    """(problems, values to check against the job spec) for one search-space entry."""
    where = f"tune.space.{field}"
    if not isinstance(dom, dict) or len(dom) != 1 or next(iter(dom)) not in DOMAINS:
        return [(where, f"expected one of {{{', '.join(DOMAINS)}: ...}} (got {dom!r})")], []
    kind, arg = next(iter(dom.items()))
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            return [(f"{where}.{kind}", f"expected a non-empty list (got {arg!r})")], []
        return [], list(arg)
    ok_num = (
        isinstance(arg, list)
        and len(arg) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in arg)
    )
    if not ok_num or not arg[0] < arg[1]:
        return [(f"{where}.{kind}", f"expected [low, high] with low < high (got {arg!r})")], []
    if kind == "loguniform" and arg[0] <= 0:
        return [(f"{where}.{kind}", f"low must be > 0 (got {arg!r})")], []
    if kind == "randint":
        if not all(isinstance(v, int) for v in arg):
            return [(f"{where}.{kind}", f"expected integers (got {arg!r})")], []
        return [], [arg[0], arg[1] - 1]
    return [], list(arg)


def trial_raw(raw: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The raw job spec of one trial: ``raw`` without its ``tune`` section, with ``config``'s dotted fields set."""
    out = {k: v for k, v in raw.items() if k != "tune"}
    for field, value in config.items():
        out = set_path(out, field, value)
    return out


def space_problems(raw: dict[str, Any], tune: TuneSpec, base_dir=None, check_urls: bool = True) -> list[Problem]:
    """Problems with the sweep: malformed domains, and values the job spec would refuse."""
    out: list[tuple[str, str]] = []
    values: dict[str, list[Any]] = {}
    for field, dom in tune.space.items():
        if field.split(".")[0] in ("tune", "name"):
            out.append((f"tune.space.{field}", f"only job fields can be searched (got {field!r})"))
            continue
        problems, vals = _domain_values(field, dom)
        out += problems
        if vals:
            values[field] = vals
    if tune.searcher == "optuna" and any("grid" in d for d in tune.space.values() if isinstance(d, dict)):
        out.append(
            ("tune.searcher", "optuna samples its own points; use choice instead of grid (got 'optuna' with a grid)")
        )
    combos = list(itertools.islice(itertools.product(*values.values()), 257))
    if len(combos) <= 256:  # small spaces: every combination of the checked values
        checks = [dict(zip(values, c)) for c in combos]
    else:  # large ones: each value alone
        checks = [{f: v} for f, vs in values.items() for v in vs]
    seen: set[tuple[str, str]] = set()
    for config in checks:
        try:
            validate_job(trial_raw(raw, config), base_dir, check_urls)
        except SpecError as e:
            for field, msg in e.problems:
                key = (field, msg)
                if key in seen:
                    continue
                seen.add(key)
                hint = ", ".join(f"{k}={v!r}" for k, v in config.items())
                where = f"tune.space.{field}" if field in values else field
                out.append((where, f"{msg} [trial with {hint}]"))
    if not tune.space:
        out.append(("tune.space", "is empty: name at least one field to search (got {})"))
    return out


class TunedJobSpec(JobSpec):
    """A job spec whose ``tune`` section is validated: what ``raypeft tune`` and ``raypeft layerwise`` run."""

    tune: TuneSpec = Field(
        default_factory=TuneSpec,
        description="Ray Tune sweep (`raypeft tune`) and layerwise search (`raypeft layerwise`); `raypeft train` validates it but does not run it.",
    )


def tune_problems(spec: TunedJobSpec, base_dir=None, check_urls: bool = True) -> list[Problem]:
    """The job's own cross-field checks, plus the sweep's and the layerwise search's."""
    from cluster.memory import parse_bytes

    out = semantic_problems(spec, base_dir, check_urls)
    tune = spec.tune
    if tune.space:
        out += space_problems(spec.model_dump(mode="json", exclude={"tune"}), tune, base_dir, check_urls)
        if tune.scheduler != "fifo" and not spec.train.eval_every:
            out.append(
                (
                    "train.eval_every",
                    f"scheduler {tune.scheduler!r} stops trials on eval results; set eval_every > 0 "
                    "or tune.scheduler fifo (got 0)",
                )
            )
        if tune.grace_period is not None and tune.grace_period > spec.train.max_steps:
            out.append(
                ("tune.grace_period", f"must be <= train.max_steps ({spec.train.max_steps}) (got {tune.grace_period})")
            )
    lw = tune.layerwise
    if lw.budget is not None:
        try:
            budget_share(lw.budget) if str(lw.budget).strip().endswith("%") else parse_bytes(lw.budget)
        except ValueError as e:
            out.append(("tune.layerwise.budget", str(e)))
        if lw.baseline == "none" and str(lw.budget).strip().endswith("%"):
            out.append(
                (
                    "tune.layerwise.budget",
                    f"a share needs a baseline; tune.layerwise.baseline is 'none' (got {lw.budget!r})",
                )
            )
    if lw.baseline != "none" and 4 not in lw.bits:  # the baseline's rank joins the ranks searched
        out.append(("tune.layerwise.bits", f"baseline {lw.baseline!r} is uniform NF4: include 4 (got {lw.bits})"))
    return out


def budget_share(value: str) -> float:
    """``105%`` → 1.05: a budget as a share of the baseline's memory. Raises ValueError naming the form."""
    try:
        share = float(str(value).strip()[:-1]) / 100
    except ValueError:
        share = 0.0
    if not 0 < share <= 100:
        raise ValueError(f"expected a share of the baseline's memory like 100% or 105% (got {value!r})")
    return share


def validate(raw: dict[str, Any], base_dir=None, check_urls: bool = True) -> TunedJobSpec:
    """Validate a job spec with its ``tune`` section (``SpecError`` listing every problem)."""
    return validate_spec(TunedJobSpec, raw, lambda spec: tune_problems(spec, base_dir, check_urls))


def load_spec(path, overrides: list[str] | tuple[str, ...] = (), check_urls: bool = True) -> JobSpec:
    """Read, override, resolve local paths (``resolve_paths``) and validate a job spec file, ``tune`` section
    included (``validate_document``): what every command that reads a spec file does."""
    return load_file(path, overrides, lambda raw: validate_document(resolve_paths(raw), check_urls=check_urls))


def validate_document(raw: dict[str, Any], base_dir=None, check_urls: bool = True) -> JobSpec:
    """``pipelines.spec.job.validate``, and when the document has a ``tune`` section, that section too: the result
    is then a ``TunedJobSpec`` (a ``JobSpec``), so no section of a file goes unchecked."""
    if isinstance(raw, dict) and raw.get("tune"):
        return validate(raw, base_dir, check_urls=check_urls)
    return validate_job(raw, base_dir, check_urls)


def with_tune(job: JobSpec, tune: TuneSpec) -> TunedJobSpec:
    """A validated job spec with a validated ``tune`` section attached (no re-validation)."""
    return TunedJobSpec.model_validate(
        {**job.model_dump(mode="json", exclude={"tune"}), "tune": tune.model_dump(mode="json")}
    )


def job_of(spec: TunedJobSpec) -> JobSpec:
    """The plain job spec of a tuned one (its ``tune`` section dropped): what a trial trains."""
    return JobSpec.model_validate(spec.model_dump(exclude={"tune"}))


def concurrency(cluster: dict[str, float], per_trial: dict[str, float], requested: int | None = None) -> int:
    """Trials that fit on the cluster at once (capped by ``requested``). Each trial's Train workers hold their
    resources for the whole trial, so starting more than fit would leave placement groups waiting forever."""
    needs = {k: v for k, v in per_trial.items() if v > 0}
    fits = min(int(cluster.get(k, 0) // v) for k, v in needs.items()) if needs else (requested or 1)
    if fits < 1:
        raise ValueError(f"one trial needs {needs}, but the cluster has { ({k: cluster.get(k, 0) for k in needs}) }")
    return min(fits, requested) if requested else fits

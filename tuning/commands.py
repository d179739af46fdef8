"""``raypeft tune`` and ``raypeft layerwise``: validate the tuned job spec, run the search, print its result."""

from __future__ import annotations

import json

from pipelines.spec import SpecError
from pipelines.train import load_tuned as load


def validate(args) -> int:
    """``raypeft validate``: every section of a job spec, ``tune`` included, checked as ``raypeft train`` and
    ``raypeft tune`` check it; the resolved spec printed as YAML."""
    from pipelines.tracking import spec_yaml

    print(spec_yaml(load(args.spec, args.overrides)), end="")
    return 0


def tune(args) -> int:
    """Run the spec's Ray Tune sweep; exit 1 if no trial finished."""
    spec = load(args.spec, args.overrides)
    if not spec.tune.space:
        raise SpecError([("tune.space", "is empty: add a tune section naming the fields to search (got {})")])
    from tuning.sweep import sweep

    result = sweep(spec)
    result.pop("rows")
    print(json.dumps(result, default=str), flush=True)
    return 0 if result["best"] else 1


def layerwise(args) -> int:
    """Run the layerwise bit-width × rank search; exit 1 if no plan was found."""
    overrides = list(args.overrides) + ([f"tune.layerwise.budget={args.budget}"] if args.budget else [])
    spec = load(args.spec, overrides)
    from tuning.search import budget_of, search, under_baseline

    budget_of(*under_baseline(spec))  # no budget and no baseline: exit 2 before Ray starts
    result = search(spec, out=args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "front"}, default=str), flush=True)
    return 0 if result.get("plan_spec") else 1

"""What each ``raypeft`` subcommand of the training side runs: the CLI parses the arguments and calls one
of these. Bad input raises ``UserError`` (exit 2, mapped once in ``raypeft.cli``); results go to stdout as
one JSON line where a script would read them, progress to stderr.
"""

from __future__ import annotations

import contextlib
import json
import sys
from functools import partial

from pipelines.spec import UserError


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def methods(args) -> int:
    if args.action == "compare":
        return methods_compare(args)
    from pipelines.model import REGISTRY, method_names

    for name in method_names():
        m = REGISTRY[name]
        print(f"{name:18} {m.summary}")
    from peft import PeftType

    others = sorted(t.name.lower() for t in PeftType if t.name.lower() not in REGISTRY)
    print(f"\nany other PEFT method by name (settings in method.args): {', '.join(others)}")
    return 0


def methods_compare(args) -> int:
    from pathlib import Path

    import yaml

    from pipelines.model.methods.compare import DEFAULT_METHODS, compare, markdown, write

    names = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(DEFAULT_METHODS)
    target = args.target if args.target == "all-linear" or "," not in args.target else args.target.split(",")
    try:
        extra = yaml.safe_load(args.args) if args.args else {}
        if not isinstance(extra, dict):
            raise ValueError
    except (yaml.YAMLError, ValueError):
        raise UserError(f"--args must be a YAML mapping of method → config arguments (got {args.args!r})") from None
    rows = compare(args.model, names, target, r=args.r, args=extra, log=_log)
    print(markdown(rows, args.model))
    paths = write(rows, args.model, Path(args.out))
    print(f"\nwrote {paths['md']}, {paths['csv']}, {paths['png']}", file=sys.stderr)
    return 0 if any(not r.error for r in rows) else 1


def check(args) -> int:
    from pipelines.model import load_base, methods
    from pipelines.train import preflight

    spec = preflight.load_checked_spec(args.spec, args.overrides)
    base, _, _ = load_base(spec, log=_log)
    names = preflight.module_names(base)
    prepared = methods.build(spec, base)
    report = preflight.preflight(spec, prepared, names)
    if report.problems:
        raise UserError(str(preflight.PreflightError(report.problems)))
    print(f"pre-flight ok: {spec.method.name} on {spec.model.base} ({spec.quantization()})")
    print(report.summary())
    return 0


def _register(out_dir: str, name: str, run_name: str, tags: dict, tracking_uri) -> dict:
    from pipelines import tracking

    uri = tracking_uri or tracking.tracking_uri()
    tracking.check_server(uri)
    return tracking.register_directory(uri, out_dir, name, run_name, {k: str(v) for k, v in tags.items()})


def export(args) -> int:
    from pipelines.lifecycle.adapters import export

    report = export(args.ref, args.out, merge=args.merge, dtype=args.dtype, tracking_uri=args.tracking_uri, log=_log)
    if "max_abs_logit_diff" in report:
        print(
            f"[raypeft] merged into the {report['quantization']} base ({report['dequantized_layers']} layers dequantized); "
            f"max |logits(merged) - logits(adapter)| = {report['max_abs_logit_diff']:.3g}",
            file=sys.stderr,
        )
    if args.register:
        report["registry"] = _register(
            args.out,
            args.register,
            "export",
            {"raypeft.source": args.ref, "raypeft.merged": args.merge, "raypeft.dtype": args.dtype},
            args.tracking_uri,
        )
    print(json.dumps(report))
    return 0


def combine(args) -> int:
    from pipelines.lifecycle.adapters import combine

    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        raise UserError(f"--weights must be comma-separated numbers (got {args.weights!r})") from None
    out = args.out or args.name
    report = combine(
        args.adapters, weights, args.method, out, density=args.density, tracking_uri=args.tracking_uri, log=_log
    )
    if not args.no_register:
        report["registry"] = _register(
            out,
            args.name,
            f"combine-{args.name}",
            {
                "raypeft.parents": ",".join(args.adapters),
                "raypeft.weights": args.weights,
                "raypeft.combination": args.method,
            },
            args.tracking_uri,
        )
    print(json.dumps(report))
    return 0


@contextlib.contextmanager
def _missing_is_user_error(what: str):
    """A registered model, version or alias that does not exist is bad input, not a failure."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise UserError(f"{what}: {e.message}") from None
        raise


def _uri(args) -> str:
    from pipelines import tracking

    uri = args.tracking_uri or tracking.tracking_uri()
    tracking.check_server(uri)  # a wrong password: one clear error (exit 2), not a traceback
    return uri


def models(args) -> int:
    from pipelines.lifecycle import registry

    uri = _uri(args)
    with _missing_is_user_error(args.ref or "registry"):
        if args.action == "list":
            rows = registry.list_models(uri)
            print(f"{'name':30} {'versions':>8} {'latest':>6}  aliases")
            for r in rows:
                aliases = ", ".join(f"@{a}→{v}" for a, v in r["aliases"].items())
                print(f"{r['name']:30} {r['versions']:>8} {r['latest'] or '-':>6}  {aliases}")
            return 0
        if not args.ref:
            raise UserError("models show needs NAME, NAME@alias or NAME/version")
        print(json.dumps(registry.show(uri, args.ref), indent=2))
        return 0


def promote(args) -> int:
    from pipelines.lifecycle import registry

    gate = registry.load_gate(args.gate)
    uri = _uri(args)
    try:
        with _missing_is_user_error(f"{args.name}/{args.version}"):
            result = registry.promote(uri, args.name, args.version, args.alias, gate, force=args.force, log=_log)
    except (registry.RegistryError, registry.AliasBusy) as e:  # the registry's state, not bad input: exit 1
        _log(f"error: {e}; {args.name}@{args.alias} did not move")
        return 1
    c, b = result["candidate"][gate.metric], (result["baseline"] or {}).get(gate.metric)
    vs = f" vs {b:.4f} (version {result['previous']})" if b is not None else " (no current holder)"
    if not result["moved"]:
        print(
            f"[raypeft] refused: {args.name}/{args.version} stays off @{args.alias}: " + "; ".join(result["reasons"]),
            file=sys.stderr,
        )
    else:
        print(
            f"[raypeft] {args.name}@{args.alias} → version {args.version} ({result['status']}: {gate.metric} {c:.4f}{vs})",
            file=sys.stderr,
        )
    print(json.dumps(result))
    return 0 if result["moved"] else 1


def rollback(args) -> int:
    from pipelines.lifecycle import registry

    try:
        with _missing_is_user_error(args.name):
            result = registry.rollback(_uri(args), args.name, args.alias)
    except (ValueError, registry.RegistryError, registry.AliasBusy) as e:  # the registry's state, not bad input
        _log(f"error: {e}")
        return 1
    print(f"[raypeft] {args.name}@{args.alias}: version {result['from']} → {result['to']}", file=sys.stderr)
    print(json.dumps(result))
    return 0


def submit(args) -> int:
    from cluster import jobs
    from pipelines.train import load_checked_spec

    # the same validation as a local run, before anything reaches the cluster; data URLs are checked by the
    # job's own driver, which runs where the cluster's credentials are
    spec = load_checked_spec(args.spec, args.overrides, check_urls=False)
    try:
        cmd = jobs.command(args.spec, args.overrides, args.working_dir)  # the spec must travel with the working dir
    except ValueError as e:
        raise UserError(str(e)) from None
    say = partial(print, file=sys.stderr)
    try:
        job_id = jobs.submit(
            args.spec, args.overrides, args.address, args.working_dir, job_id=args.job_id, python=args.python, say=say
        )
    except ConnectionError as e:  # no dashboard there: the cluster's state, not bad input
        print(f"error: {e}", file=sys.stderr)
        return 1
    say(f"[raypeft] submitted {spec.name!r} as {job_id} to {jobs.address(args.address)}: python -m {' '.join(cmd)}")
    if not args.follow:
        print(json.dumps({"job_id": job_id, "address": jobs.address(args.address)}))
        return 0
    final = jobs.follow(job_id, args.address)
    print(json.dumps({"job_id": job_id, "status": final}))
    return 0 if final == "SUCCEEDED" else 1


def plan(args) -> int:
    from cluster.memory import parse_bytes
    from pipelines.lifecycle.plan import CPU_NOTE, breakdown_of, plan_of, render, shape_of
    from pipelines.spec import load_spec

    spec = load_spec(args.spec, args.overrides)
    try:
        budget = parse_bytes(args.gpu_memory) if args.gpu_memory else None
        shape = shape_of(spec)
    except ValueError as e:
        raise UserError(str(e)) from None
    plan = plan_of(spec, args.gpus)
    breakdown = breakdown_of(spec, shape, plan)
    if not spec.scaling.use_gpu:
        breakdown.notes.append(CPU_NOTE)
    text, fits = render(shape, plan, breakdown, budget)
    print(text)
    if args.json:
        print(json.dumps({**{k: v for k, v in breakdown.rows()}, "total": breakdown.total, "fits": fits}))
    return 0 if fits else 1

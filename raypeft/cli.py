"""The ``raypeft`` command: a thin face that parses, validates, and calls one subsystem.

Exit codes: 0 success, 1 runtime failure, 2 bad input (spec, override or arguments).
"""
from __future__ import annotations

import argparse
import sys


def _spec_help() -> str:
    from pipelines.spec import field_reference

    rows = field_reference()
    width = max(len(f) for f, _, _ in rows)
    lines = ["job spec fields (override any with section.field=value):", ""]
    lines += [f"  {f:<{width}}  {d:<16} {desc}" for f, d, desc in rows]
    return "\n".join(lines)


def _cmd_train(args) -> int:
    from pipelines import train

    return train.main([args.spec, *args.overrides])


def _cmd_validate(args) -> int:
    from pipelines import train

    return train.main([args.spec, *args.overrides, "--validate-only"])


def _cmd_methods(args) -> int:
    if args.action == "compare":
        return _cmd_methods_compare(args)
    from pipelines.methods import REGISTRY, method_names

    for name in method_names():
        m = REGISTRY[name]
        print(f"{name:18} {m.summary}")
    from peft import PeftType

    others = sorted(t.name.lower() for t in PeftType if t.name.lower() not in REGISTRY)
    print(f"\nany other PEFT method by name (settings in method.args): {', '.join(others)}")
    return 0


def _cmd_methods_compare(args) -> int:
    from pathlib import Path

    import yaml

    from pipelines.methods.compare import DEFAULT_METHODS, compare, markdown, write

    names = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(DEFAULT_METHODS)
    target = args.target if args.target == "all-linear" or "," not in args.target else args.target.split(",")
    try:
        extra = yaml.safe_load(args.args) if args.args else {}
        if not isinstance(extra, dict):
            raise ValueError
    except (yaml.YAMLError, ValueError):
        print(f"error: --args must be a YAML mapping of method → config arguments (got {args.args!r})", file=sys.stderr)
        return 2
    rows = compare(args.model, names, target, r=args.r, args=extra, log=lambda m: print(m, file=sys.stderr))
    print(markdown(rows, args.model))
    paths = write(rows, args.model, Path(args.out))
    print(f"\nwrote {paths['md']}, {paths['csv']}, {paths['png']}", file=sys.stderr)
    return 0 if any(not r.error for r in rows) else 1


def _cmd_check(args) -> int:
    from pipelines import methods, preflight
    from pipelines.models import load_base
    spec = preflight.load_checked_spec(args.spec, args.overrides)
    base, _, _ = load_base(spec, log=lambda m: print(m, file=sys.stderr))
    names = preflight.module_names(base)
    prepared = methods.build(spec, base)
    report = preflight.preflight(spec, prepared, names)
    if report.problems:
        print(f"error: {preflight.PreflightError(report.problems)}", file=sys.stderr)
        return 2
    print(f"pre-flight ok: {spec.method.name} on {spec.model.base} ({spec.quantization()})")
    print(report.summary())
    return 0


def _register(out_dir: str, name: str, run_name: str, tags: dict, tracking_uri) -> dict:
    from pipelines import tracking

    uri = tracking_uri or tracking.tracking_uri()
    return tracking.register_directory(uri, out_dir, name, run_name, {k: str(v) for k, v in tags.items()})


def _cmd_export(args) -> int:
    import json

    from pipelines.adapters import AdapterError, export

    try:
        report = export(args.ref, args.out, merge=args.merge, dtype=args.dtype, tracking_uri=args.tracking_uri,
                        log=lambda m: print(m, file=sys.stderr))
    except AdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "max_abs_logit_diff" in report:
        print(f"[raypeft] merged into the {report['quantization']} base ({report['dequantized_layers']} layers dequantized); "
              f"max |logits(merged) - logits(adapter)| = {report['max_abs_logit_diff']:.3g}", file=sys.stderr)
    if args.register:
        report["registry"] = _register(args.out, args.register, "export", {
            "raypeft.source": args.ref, "raypeft.merged": args.merge, "raypeft.dtype": args.dtype}, args.tracking_uri)
    print(json.dumps(report))
    return 0


def _cmd_combine(args) -> int:
    import json

    from pipelines.adapters import AdapterError, combine

    try:
        weights = [float(w) for w in args.weights.split(",")]
    except ValueError:
        print(f"error: --weights must be comma-separated numbers (got {args.weights!r})", file=sys.stderr)
        return 2
    out = args.out or args.name
    try:
        report = combine(args.adapters, weights, args.method, out, density=args.density, tracking_uri=args.tracking_uri,
                         log=lambda m: print(m, file=sys.stderr))
    except AdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.no_register:
        report["registry"] = _register(out, args.name, f"combine-{args.name}", {
            "raypeft.parents": ",".join(args.adapters), "raypeft.weights": args.weights,
            "raypeft.combination": args.method}, args.tracking_uri)
    print(json.dumps(report))
    return 0


def _cmd_serve(args) -> int:
    import time

    from serving import spec as serve_spec

    spec = serve_spec.load(args.spec, args.overrides)
    from ray import serve

    from pipelines.train import init_ray
    from serving.app import build_app

    init_ray()
    d = spec.deployment
    serve.start(http_options={"host": d.host, "port": d.port})
    serve.run(build_app(spec), name=spec.name, route_prefix="/")
    url = f"http://{d.host}:{d.port}"
    print(f"[raypeft] serving {spec.base_name()} at {url}/v1 (models: {url}/v1/models)", flush=True)
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(spec.name)
        return 0


def _uri(args) -> str:
    from pipelines import tracking

    return args.tracking_uri or tracking.tracking_uri()


def _cmd_models(args) -> int:
    import json

    from pipelines import registry

    uri = _uri(args)
    try:
        if args.action == "list":
            rows = registry.list_models(uri)
            print(f"{'name':30} {'versions':>8} {'latest':>6}  aliases")
            for r in rows:
                aliases = ", ".join(f"@{a}→{v}" for a, v in r["aliases"].items())
                print(f"{r['name']:30} {r['versions']:>8} {r['latest'] or '-':>6}  {aliases}")
            return 0
        if not args.ref:
            print("error: models show needs NAME, NAME@alias or NAME/version", file=sys.stderr)
            return 2
        print(json.dumps(registry.show(uri, args.ref), indent=2))
        return 0
    except Exception as e:  # noqa: BLE001 - MLflow raises its own types for a missing model/alias/version
        print(f"error: {args.ref or 'registry'}: {e}", file=sys.stderr)
        return 2


def _cmd_promote(args) -> int:
    import json

    from pipelines import registry

    gate = registry.load_gate(args.gate)
    uri = _uri(args)
    try:
        result = registry.promote(uri, args.name, args.version, args.alias, gate, force=args.force,
                                  log=lambda m: print(m, file=sys.stderr))
    except Exception as e:  # noqa: BLE001 - a missing model or version is bad input
        if "RESOURCE_DOES_NOT_EXIST" in str(e) or "not found" in str(e).lower():
            print(f"error: {args.name}/{args.version}: {e}", file=sys.stderr)
            return 2
        raise
    c, b = result["candidate"][gate.metric], (result["baseline"] or {}).get(gate.metric)
    vs = f" vs {b:.4f} (version {result['previous']})" if b is not None else " (no current holder)"
    if result["status"] == "failed":
        print(f"[raypeft] refused: {args.name}/{args.version} stays off @{args.alias}: " + "; ".join(result["reasons"]), file=sys.stderr)
    else:
        print(f"[raypeft] {args.name}@{args.alias} → version {args.version} ({result['status']}: {gate.metric} {c:.4f}{vs})",
              file=sys.stderr)
    print(json.dumps(result))
    return 0 if result["moved"] else 1


def _cmd_rollback(args) -> int:
    import json

    from pipelines import registry

    try:
        result = registry.rollback(_uri(args), args.name, args.alias)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"[raypeft] {args.name}@{args.alias}: version {result['from']} → {result['to']}", file=sys.stderr)
    print(json.dumps(result))
    return 0


def _cmd_submit(args) -> int:
    import json

    from cluster import jobs
    from pipelines.preflight import load_checked_spec

    try:  # the same validation as a local run, before anything reaches the cluster
        spec = load_checked_spec(args.spec, args.overrides)
        entry = jobs.entrypoint(args.spec, args.overrides, args.working_dir)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    job_id = jobs.submit(args.spec, args.overrides, args.address, args.working_dir, job_id=args.job_id)
    print(f"[raypeft] submitted {spec.name!r} as {job_id} to {jobs.address(args.address)}: {entry}", file=sys.stderr)
    if not args.follow:
        print(json.dumps({"job_id": job_id, "address": jobs.address(args.address)}))
        return 0
    final = jobs.follow(job_id, args.address)
    print(json.dumps({"job_id": job_id, "status": final}))
    return 0 if final == "SUCCEEDED" else 1


def _cmd_status(args) -> int:
    import json

    from cluster import jobs

    st = jobs.status(args.address)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"cluster {st['address']}")
    for k, v in sorted(st.get("resources", {}).items()):
        print(f"  {k:14} {v}" if k == "error" else f"  {k:14} {v['used']:g} / {v['total']:g} used")
    print(f"jobs ({len(st['jobs'])}):")
    for j in sorted(st["jobs"], key=lambda j: j["start"] or 0):
        print(f"  {j['id']:32} {j['status']:10} {j['entrypoint']}")
    print("serve applications:" + ("" if st["serve"] else " none"))
    for name, status in st["serve"].items():
        print(f"  {name:32} {status}")
    return 0


def _cmd_plan(args) -> int:
    import json

    from cluster.memory import parse_bytes
    from pipelines.plan import CPU_NOTE, breakdown_of, plan_of, render, shape_of
    from pipelines.spec import load_spec

    try:
        spec = load_spec(args.spec, args.overrides)
        budget = parse_bytes(args.gpu_memory) if args.gpu_memory else None
        shape = shape_of(spec)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    plan = plan_of(spec, args.gpus)
    breakdown = breakdown_of(spec, shape, plan)
    if not spec.scaling.use_gpu:
        breakdown.notes.append(CPU_NOTE)
    text, fits = render(shape, plan, breakdown, budget)
    print(text)
    if args.json:
        print(json.dumps({**{k: v for k, v in breakdown.rows()}, "total": breakdown.total, "fits": fits}))
    return 0 if fits else 1


def _cmd_tune(args) -> int:
    import json

    from pipelines.preflight import load_checked_spec
    from pipelines.spec import SpecError

    spec = load_checked_spec(args.spec, args.overrides)
    if not spec.tune.space:
        raise SpecError([("tune.space", "is empty: add a tune section naming the fields to search (got {})")])
    from tuning.sweep import sweep

    result = sweep(spec)
    result.pop("rows")
    print(json.dumps(result, default=str), flush=True)
    return 0 if result["best"] else 1


def _cmd_layerwise(args) -> int:
    import json

    from cluster.memory import parse_bytes
    from pipelines.preflight import load_checked_spec
    from pipelines.spec import SpecError

    overrides = list(args.overrides) + ([f"tune.layerwise.budget={args.budget}"] if args.budget else [])
    spec = load_checked_spec(args.spec, overrides)
    if spec.tune.layerwise.budget is None:
        raise SpecError([("tune.layerwise.budget", "required: pass --budget 60MB or set it in the spec (got None)")])
    budget = parse_bytes(spec.tune.layerwise.budget)
    from tuning.search import search

    result = search(spec, budget, out=args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "front"}, default=str), flush=True)
    return 0 if result.get("plan_spec") else 1


def _cmd_spec_reference(args) -> int:
    from pipelines.spec import reference_markdown

    print(reference_markdown() if args.markdown else _spec_help())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raypeft", description="Parameter-efficient fine-tuning on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser(
        "train", help="train an adapter from a job spec", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train an adapter on Ray Train. Prints one JSON object as the last stdout line.",
        epilog=_spec_help().replace("%", "%%"),
    )
    t.add_argument("spec", help="job spec YAML")
    t.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.lr=1e-4 method.r=16")
    t.set_defaults(fn=_cmd_train)

    v = sub.add_parser("validate", help="validate a job spec (exit 2 listing every problem) and print it resolved")
    v.add_argument("spec")
    v.add_argument("overrides", nargs="*")
    v.set_defaults(fn=_cmd_validate)

    m = sub.add_parser("methods", help="list the fine-tuning methods, or compare their parameter budgets")
    m.add_argument("action", nargs="?", choices=["list", "compare"], default="list")
    m.add_argument("--model", default="smollm2-135m", help="compare: base model (built-in name, local dir or hub id)")
    m.add_argument("--methods", default="", help="compare: comma-separated method names (default: the LoRA family and PEFT's main methods)")
    m.add_argument("--target", default="all-linear", help="compare: target_modules, all-linear or comma-separated suffixes")
    m.add_argument("--r", type=int, default=16, help="compare: rank for methods that have one")
    m.add_argument("--args", default="", help="compare: YAML mapping of per-method config arguments, e.g. '{vblora: {vector_length: 64}}'")
    m.add_argument("--out", default="methods-compare", help="compare: folder for methods.md, methods.csv, methods.png")
    m.set_defaults(fn=_cmd_methods)

    c = sub.add_parser("check", help="pre-flight checks on the model a spec builds (no training)")
    c.add_argument("spec")
    c.add_argument("overrides", nargs="*")
    c.set_defaults(fn=_cmd_check)

    e = sub.add_parser("export", help="export an adapter, or merge it into its (dequantized) base as an HF model")
    e.add_argument("ref", help="adapter directory or MLflow URI (models:/name@alias, models:/name/version)")
    e.add_argument("out", help="output directory (must be empty or new)")
    e.add_argument("--merge", action="store_true", help="merge into the base; 4-/8-bit bases are dequantized first")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the merged weights")
    e.add_argument("--register", metavar="NAME", help="register the export as a new version of this MLflow model")
    e.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local SQLite)")
    e.set_defaults(fn=_cmd_export)

    k = sub.add_parser("combine", help="weighted combination of LoRA adapters, written and registered as a new adapter")
    k.add_argument("adapters", nargs="+", help="adapter directories or MLflow URIs")
    k.add_argument("--weights", required=True, help="one weight per adapter, e.g. 0.7,0.3")
    k.add_argument("--method", default="linear", help="linear, cat, ties, dare_linear, dare_ties or svd (PEFT add_weighted_adapter)")
    k.add_argument("--density", type=float, default=0.5, help="ties / dare: fraction of weights kept")
    k.add_argument("--name", required=True, help="name of the new adapter (and of its registered model)")
    k.add_argument("--out", help="output directory (default: NAME)")
    k.add_argument("--no-register", action="store_true", help="write the adapter only; do not register it")
    k.add_argument("--tracking-uri", help="MLflow tracking URI")
    k.set_defaults(fn=_cmd_combine)

    md = sub.add_parser("models", help="registered adapters: versions, aliases, metrics, lineage")
    md.add_argument("action", choices=["list", "show"])
    md.add_argument("ref", nargs="?", help="show: NAME, NAME@alias or NAME/version")
    md.add_argument("--tracking-uri", help="MLflow tracking URI")
    md.set_defaults(fn=_cmd_models)

    pr = sub.add_parser("promote", help="move an alias to a version if it passes the evaluation gate")
    pr.add_argument("name", help="registered model")
    pr.add_argument("--version", required=True, help="candidate version")
    pr.add_argument("--alias", default="champion", help="alias to move (default: champion)")
    pr.add_argument("--gate", help="gate YAML: metric, mode, margin, bound, data (default: eval_loss, min, 0 margin, the shipped task)")
    pr.add_argument("--force", action="store_true", help="move the alias even if the gate fails (recorded as forced)")
    pr.add_argument("--tracking-uri", help="MLflow tracking URI")
    pr.set_defaults(fn=_cmd_promote)

    rb = sub.add_parser("rollback", help="move an alias back to its previous holder")
    rb.add_argument("name")
    rb.add_argument("--alias", default="champion")
    rb.add_argument("--tracking-uri", help="MLflow tracking URI")
    rb.set_defaults(fn=_cmd_rollback)

    sb = sub.add_parser("submit", help="submit a training job to a Ray cluster (JobSubmissionClient)")
    sb.add_argument("spec")
    sb.add_argument("overrides", nargs="*")
    sb.add_argument("--address", help="dashboard address (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    sb.add_argument("--working-dir", default=".", help="folder shipped to the workers (default: . = the repo)")
    sb.add_argument("--job-id", help="submission id (default: generated)")
    sb.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 1 unless it succeeded")
    sb.set_defaults(fn=_cmd_submit)

    st = sub.add_parser("status", help="jobs, Serve applications and resources of a Ray cluster")
    st.add_argument("--address")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=_cmd_status)

    pl = sub.add_parser("plan", help="estimate per-GPU memory of a job and whether it fits (exit 1 if not)")
    pl.add_argument("spec")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--gpus", type=int, help="GPUs (default: scaling.num_workers)")
    pl.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GB or 24GiB; prints a verdict and fixes")
    pl.add_argument("--json", action="store_true", help="also print the breakdown as JSON")
    pl.set_defaults(fn=_cmd_plan)

    sv = sub.add_parser("serve", help="serve the base and its adapters over an OpenAI-compatible HTTP API (Ray Serve)")
    sv.add_argument("spec", help="serving spec YAML (see serving/configs/demo.yaml)")
    sv.add_argument("overrides", nargs="*", help="section.field=value overrides")
    sv.add_argument("--detach", action="store_true", help="return after deploying (with RAY_ADDRESS set to a running cluster)")
    sv.set_defaults(fn=_cmd_serve)

    tn = sub.add_parser("tune", help="Ray Tune sweep over the spec's tune.space (ASHA / HyperBand / median, random / Optuna)")
    tn.add_argument("spec", help="job spec YAML with a tune section")
    tn.add_argument("overrides", nargs="*", help="section.field=value overrides (tune.* included)")
    tn.set_defaults(fn=_cmd_tune)

    lw = sub.add_parser("layerwise", help="search per-layer bit-widths and LoRA ranks under a memory budget (QR-Adaptor style)")
    lw.add_argument("spec", help="job spec YAML")
    lw.add_argument("overrides", nargs="*", help="section.field=value overrides (tune.layerwise.* included)")
    lw.add_argument("--budget", help="memory budget per worker, e.g. 1.5GB (tune.layerwise.budget): the training peak, or with "
                    "tune.layerwise.memory=weights the weights + adapter + its optimizer states")
    lw.add_argument("--out", help="where to write the chosen plan as a job spec (default: <name>-layerwise.yaml)")
    lw.set_defaults(fn=_cmd_layerwise)

    r = sub.add_parser("spec", help="print the job spec reference (every field, default and meaning)")
    r.add_argument("--markdown", action="store_true", help="as a markdown table (the README reference)")
    r.set_defaults(fn=_cmd_spec_reference)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from pipelines.spec import SpecError

    try:
        return args.fn(args)
    except SpecError as e:  # every bad spec, override, gate or budget: named field, exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

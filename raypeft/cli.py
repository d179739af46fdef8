"""The ``raypeft`` command: a thin face. Each subcommand parses its arguments and calls one entry point
in its package (``pipelines.commands``, ``tuning.commands``, ``serving.commands``, ``cluster.jobs``).

Exit codes: 0 success, 1 runtime failure, 2 bad input (``UserError``: spec, override, argument, or a
registry entry that does not exist), mapped here in one place.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback


def _spec_help() -> str:
    from pipelines.spec import field_reference
    from tuning.spec import TunedJobSpec

    rows = field_reference(TunedJobSpec)
    width = max(len(f) for f, _, _ in rows)
    lines = ["job spec fields (override any with section.field=value):", ""]
    lines += [f"  {f:<{width}}  {d:<16} {desc}" for f, d, desc in rows]
    return "\n".join(lines)


def spec_reference(args) -> int:
    from pipelines.spec import reference_markdown
    from tuning.spec import TunedJobSpec

    print(reference_markdown(TunedJobSpec) if args.markdown else _spec_help())
    return 0


def _spec_args(p: argparse.ArgumentParser, what: str = "job spec YAML") -> None:
    p.add_argument("spec", help=what)
    p.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.lr=1e-4 method.r=16")


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
    t.set_defaults(fn="pipelines.train:command")

    v = sub.add_parser("validate", help="validate a job spec (exit 2 listing every problem) and print it resolved")
    _spec_args(v)
    v.set_defaults(fn="pipelines.train:validate_command")

    m = sub.add_parser("methods", help="list the fine-tuning methods, or compare their parameter budgets")
    m.add_argument("action", nargs="?", choices=["list", "compare"], default="list")
    m.add_argument("--model", default="smollm2-135m", help="compare: base model (built-in name, local dir or hub id)")
    m.add_argument("--methods", default="", help="compare: comma-separated method names (default: the LoRA family and PEFT's main methods)")
    m.add_argument("--target", default="all-linear", help="compare: target_modules, all-linear or comma-separated suffixes")
    m.add_argument("--r", type=int, default=16, help="compare: rank for methods that have one")
    m.add_argument("--args", default="", help="compare: YAML mapping of per-method config arguments, e.g. '{vblora: {vector_length: 64}}'")
    m.add_argument("--out", default="methods-compare", help="compare: folder for methods.md, methods.csv, methods.png")
    m.set_defaults(fn="pipelines.commands:methods")

    c = sub.add_parser("check", help="pre-flight checks on the model a spec builds (no training)")
    _spec_args(c)
    c.set_defaults(fn="pipelines.commands:check")

    e = sub.add_parser("export", help="export an adapter, or merge it into its (dequantized) base as an HF model")
    e.add_argument("ref", help="adapter directory or MLflow URI (models:/name@alias, models:/name/version)")
    e.add_argument("out", help="output directory (must be empty or new)")
    e.add_argument("--merge", action="store_true", help="merge into the base; 4-/8-bit bases are dequantized first")
    e.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="dtype of the merged weights")
    e.add_argument("--register", metavar="NAME", help="register the export as a new version of this MLflow model")
    e.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local SQLite)")
    e.set_defaults(fn="pipelines.commands:export")

    k = sub.add_parser("combine", help="weighted combination of LoRA adapters, written and registered as a new adapter")
    k.add_argument("adapters", nargs="+", help="adapter directories or MLflow URIs")
    k.add_argument("--weights", required=True, help="one weight per adapter, e.g. 0.7,0.3")
    k.add_argument("--method", default="linear", help="linear, cat, ties, dare_linear, dare_ties or svd (PEFT add_weighted_adapter)")
    k.add_argument("--density", type=float, default=0.5, help="ties / dare: fraction of weights kept")
    k.add_argument("--name", required=True, help="name of the new adapter (and of its registered model)")
    k.add_argument("--out", help="output directory (default: NAME)")
    k.add_argument("--no-register", action="store_true", help="write the adapter only; do not register it")
    k.add_argument("--tracking-uri", help="MLflow tracking URI")
    k.set_defaults(fn="pipelines.commands:combine")

    md = sub.add_parser("models", help="registered adapters: versions, aliases, metrics, lineage")
    md.add_argument("action", choices=["list", "show"])
    md.add_argument("ref", nargs="?", help="show: NAME, NAME@alias or NAME/version")
    md.add_argument("--tracking-uri", help="MLflow tracking URI")
    md.set_defaults(fn="pipelines.commands:models")

    pr = sub.add_parser("promote", help="move an alias to a version if it passes the evaluation gate")
    pr.add_argument("name", help="registered model")
    pr.add_argument("--version", required=True, help="candidate version")
    pr.add_argument("--alias", default="champion", help="alias to move (default: champion)")
    pr.add_argument("--gate", help="gate YAML: metric, mode, margin, bound, data (default: eval_loss, min, 0 margin, the shipped task)")
    pr.add_argument("--force", action="store_true", help="move the alias even if the gate fails (recorded as forced)")
    pr.add_argument("--tracking-uri", help="MLflow tracking URI")
    pr.set_defaults(fn="pipelines.commands:promote")

    rb = sub.add_parser("rollback", help="move an alias back to its previous holder")
    rb.add_argument("name")
    rb.add_argument("--alias", default="champion")
    rb.add_argument("--tracking-uri", help="MLflow tracking URI")
    rb.set_defaults(fn="pipelines.commands:rollback")

    sb = sub.add_parser("submit", help="submit a training job to a Ray cluster (JobSubmissionClient)")
    _spec_args(sb)
    sb.add_argument("--address", help="dashboard address (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
    sb.add_argument("--working-dir", default=".", help="folder shipped to the workers (default: . = the repo)")
    sb.add_argument("--job-id", help="submission id (default: generated)")
    sb.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 1 unless it succeeded")
    sb.set_defaults(fn="pipelines.commands:submit")

    st = sub.add_parser("status", help="jobs, Serve applications and resources of a Ray cluster")
    st.add_argument("--address")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn="cluster.jobs:status_command")

    pl = sub.add_parser("plan", help="estimate per-GPU memory of a job and whether it fits (exit 1 if not)")
    _spec_args(pl)
    pl.add_argument("--gpus", type=int, help="GPUs (default: scaling.num_workers)")
    pl.add_argument("--gpu-memory", help="memory per GPU, e.g. 80GB or 24GiB; prints a verdict and fixes")
    pl.add_argument("--json", action="store_true", help="also print the breakdown as JSON")
    pl.set_defaults(fn="pipelines.commands:plan")

    sv = sub.add_parser("serve", help="serve the base and its adapters over an OpenAI-compatible HTTP API (Ray Serve)")
    sv.add_argument("spec", help="serving spec YAML (see serving/configs/demo.yaml)")
    sv.add_argument("overrides", nargs="*", help="section.field=value overrides")
    sv.add_argument("--detach", action="store_true", help="return after deploying (with RAY_ADDRESS set to a running cluster)")
    sv.set_defaults(fn="serving.commands:serve")

    tn = sub.add_parser("tune", help="Ray Tune sweep over the spec's tune.space (ASHA / HyperBand / median, random / Optuna)")
    tn.add_argument("spec", help="job spec YAML with a tune section")
    tn.add_argument("overrides", nargs="*", help="section.field=value overrides (tune.* included)")
    tn.set_defaults(fn="tuning.commands:tune")

    lw = sub.add_parser("layerwise", help="search per-layer bit-widths and LoRA ranks under a memory budget (QR-Adaptor style)")
    lw.add_argument("spec", help="job spec YAML")
    lw.add_argument("overrides", nargs="*", help="section.field=value overrides (tune.layerwise.* included)")
    lw.add_argument("--budget", help="memory budget per worker, e.g. 1.5GB (tune.layerwise.budget): the training peak, or with "
                    "tune.layerwise.memory=weights the weights + adapter + its optimizer states")
    lw.add_argument("--out", help="where to write the chosen plan as a job spec (default: <name>-layerwise.yaml)")
    lw.set_defaults(fn="tuning.commands:layerwise")

    r = sub.add_parser("spec", help="print the job spec reference (every field, default and meaning)")
    r.add_argument("--markdown", action="store_true", help="as a markdown table (the README reference)")
    r.set_defaults(fn="raypeft.cli:spec_reference")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines.specbase import UserError

    module, function = args.fn.split(":")
    try:
        return getattr(importlib.import_module(module), function)(args)
    except UserError as e:  # every bad spec, override, argument, gate or budget: exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:  # a runtime failure: the traceback, exit 1
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())

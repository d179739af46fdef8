"""The ``raypeft`` command: a thin face. Each subcommand parses its arguments and calls one entry point
in its package (``pipelines.lifecycle.commands``, ``tuning.commands``, ``serving.commands``, ``cluster.jobs``).

Exit codes: 0 success, 1 runtime failure, 2 bad input (``UserError``: spec, override, argument, or a
registry entry that does not exist), mapped here in one place.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback


def _spec_help() -> str:
    from pipelines.spec import TunedJobSpec, field_reference

    rows = field_reference(TunedJobSpec)
    width = max(len(f) for f, _, _ in rows)
    lines = ["job spec fields (override any with section.field=value):", ""]
    lines += [f"  {f:<{width}}  {d:<16} {desc}" for f, d, desc in rows]
    return "\n".join(lines)


def spec_reference(args) -> int:
    from pipelines.spec import TunedJobSpec, reference_markdown

    print(reference_markdown(TunedJobSpec) if args.markdown else _spec_help())
    return 0


JOB = "job spec YAML"
OVERRIDES = "section.field=value overrides, e.g. train.lr=1e-4 method.r=16"
TRACKING = ("--tracking-uri", "MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the local SQLite)", {})
ADDRESS = ("--address", "dashboard address (default: $RAY_ADDRESS or http://127.0.0.1:8265)", {})

# name, "module:function" it runs, help, positional spec (help text) or None, then (flag, help, argparse kwargs)
# fmt: off
COMMANDS = [
    ("train", "pipelines.train.driver:command", "train an adapter from a job spec (prints one JSON line)", JOB, []),
    ("validate", "tuning.commands:validate", "validate a job spec, tune section included (exit 2 on problems)", JOB, []),
    ("methods", "pipelines.lifecycle.commands:methods", "list the fine-tuning methods, or compare their parameter budgets", None, [
        ("action", "list, or compare", {"nargs": "?", "choices": ["list", "compare"], "default": "list"}),
        ("--model", "compare: base model (built-in name, local dir or hub id)", {"default": "smollm2-135m"}),
        ("--methods", "compare: comma-separated methods (default: LoRA family, PEFT's main ones)", {"default": ""}),
        ("--target", "compare: target_modules, all-linear or comma-separated suffixes", {"default": "all-linear"}),
        ("--r", "compare: rank for methods that have one", {"type": int, "default": 16}),
        ("--args", "compare: YAML mapping of per-method config arguments, e.g. '{vblora: {vector_length: 64}}'",
         {"default": ""}),
        ("--out", "compare: folder for methods.md, methods.csv, methods.png", {"default": "methods-compare"}),
    ]),
    ("check", "pipelines.lifecycle.commands:check", "pre-flight checks on the model a spec builds (no training)", JOB, []),
    ("export", "pipelines.lifecycle.commands:export", "export an adapter, or merge it into its (dequantized) base", None, [
        ("ref", "adapter directory or MLflow URI (models:/name@alias, models:/name/version)", {}),
        ("out", "output directory (must be empty or new)", {}),
        ("--merge", "merge into the base; 4-/8-bit bases are dequantized first", {"action": "store_true"}),
        ("--dtype", "dtype of the merged weights", {"choices": ["fp32", "bf16", "fp16"], "default": "fp32"}),
        ("--register", "register the export as a new version of this MLflow model", {"metavar": "NAME"}),
        TRACKING,
    ]),
    ("combine", "pipelines.lifecycle.commands:combine", "weighted combination of LoRA adapters, registered as a new one", None, [
        ("adapters", "adapter directories or MLflow URIs", {"nargs": "+"}),
        ("--weights", "one weight per adapter, e.g. 0.7,0.3", {"required": True}),
        ("--method", "linear, cat, ties, dare_linear, dare_ties or svd (PEFT add_weighted_adapter)",
         {"default": "linear"}),
        ("--density", "ties / dare: fraction of weights kept", {"type": float, "default": 0.5}),
        ("--name", "name of the new adapter (and of its registered model)", {"required": True}),
        ("--out", "output directory (default: NAME)", {}),
        ("--no-register", "write the adapter only; do not register it", {"action": "store_true"}),
        TRACKING,
    ]),
    ("models", "pipelines.lifecycle.commands:models", "registered adapters: versions, aliases, metrics, lineage", None, [
        ("action", "list or show", {"choices": ["list", "show"]}),
        ("ref", "show: NAME, NAME@alias or NAME/version", {"nargs": "?"}),
        TRACKING,
    ]),
    ("promote", "pipelines.lifecycle.commands:promote", "move an alias to a version if it passes the evaluation gate", None, [
        ("name", "registered model", {}),
        ("--version", "candidate version", {"required": True}),
        ("--alias", "alias to move (default: champion)", {"default": "champion"}),
        ("--gate", "gate YAML: metric, mode, margin, bound, data, seed (default: eval_loss, min, 0 margin)", {}),
        ("--force", "move the alias even if the gate fails (recorded as forced)", {"action": "store_true"}),
        TRACKING,
    ]),
    ("rollback", "pipelines.lifecycle.commands:rollback", "move an alias back to its previous holder", None, [
        ("name", "registered model", {}),
        ("--alias", "alias to move back (default: champion)", {"default": "champion"}),
        TRACKING,
    ]),
    ("submit", "pipelines.lifecycle.commands:submit", "submit a training job to a Ray cluster (JobSubmissionClient)", JOB, [
        ADDRESS,
        ("--working-dir", "folder shipped to the workers (default: . = the repo)", {"default": "."}),
        ("--job-id", "submission id (default: generated)", {}),
        ("--python", "the job's interpreter on the cluster (default: the Python Ray runs its workers with)", {}),
        ("--follow", "stream the job's logs until it ends; exit 1 unless it succeeded", {"action": "store_true"}),
    ]),
    ("status", "cluster.jobs:status_command", "jobs, Serve applications and resources of a Ray cluster", None, [
        ADDRESS,
        ("--json", "print JSON", {"action": "store_true"}),
    ]),
    ("plan", "pipelines.lifecycle.commands:plan", "estimate per-GPU memory of a job and whether it fits (exit 1 if not)", JOB, [
        ("--gpus", "GPUs (default: scaling.num_workers)", {"type": int}),
        ("--gpu-memory", "memory per GPU, e.g. 80GB or 24GiB; prints a verdict and fixes", {}),
        ("--json", "also print the breakdown as JSON", {"action": "store_true"}),
    ]),
    ("serve", "serving.commands:serve", "serve the base and adapters over an OpenAI-compatible API", "serving spec YAML", [
        ("--detach", "return after deploying (with RAY_ADDRESS set to a running cluster)", {"action": "store_true"}),
    ]),
    ("tune", "tuning.commands:tune", "Ray Tune sweep over the spec's tune.space (ASHA / HyperBand / median)", JOB, []),
    ("layerwise", "tuning.commands:layerwise", "search per-layer bit-widths and LoRA ranks under a memory budget", JOB, [
        ("--budget", "memory budget per worker, e.g. 1.5GB or 105%% of the baseline's (default: the baseline's; "
         "tune.layerwise.budget, .baseline, .memory)", {}),
        ("--out", "where to write the chosen plan as a job spec (default: <name>-layerwise.yaml)", {}),
    ]),
    ("spec", "raypeft.cli:spec_reference", "print the job spec reference (every field, default and meaning)", None, [
        ("--markdown", "as a markdown table (the docs' reference)", {"action": "store_true"}),
    ]),
]
# fmt: on


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raypeft", description="Parameter-efficient fine-tuning on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, fn, help, spec, arguments in COMMANDS:
        extra = {"epilog": _spec_help().replace("%", "%%")} if name == "train" else {}
        c = sub.add_parser(
            name, help=help, description=help, formatter_class=argparse.RawDescriptionHelpFormatter, **extra
        )
        c.set_defaults(fn=fn)
        if spec:
            c.add_argument("spec", help=spec)
            c.add_argument("overrides", nargs="*", help=OVERRIDES)
        for flag, text, kwargs in arguments:
            c.add_argument(flag, help=text, **kwargs)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipelines.spec import UserError

    module, function = args.fn.split(":")
    try:
        return getattr(importlib.import_module(module), function)(args)
    except UserError as e:  # every bad spec, override, argument, gate or budget: exit 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception:  # noqa: BLE001 - a runtime failure: the traceback, exit 1
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())

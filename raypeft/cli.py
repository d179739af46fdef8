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
    from pipelines.methods import REGISTRY, method_names

    for name in method_names():
        m = REGISTRY[name]
        print(f"{name:18} {m.summary}")
    from peft import PeftType

    others = sorted(t.name.lower() for t in PeftType if t.name.lower() not in REGISTRY)
    print(f"\nany other PEFT method by name (settings in method.args): {', '.join(others)}")
    return 0


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

    m = sub.add_parser("methods", help="list the fine-tuning methods")
    m.set_defaults(fn=_cmd_methods)

    r = sub.add_parser("spec", help="print the job spec reference (every field, default and meaning)")
    r.add_argument("--markdown", action="store_true", help="as a markdown table (the README reference)")
    r.set_defaults(fn=_cmd_spec_reference)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

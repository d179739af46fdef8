"""Compare methods' parameter budgets on one base: trainable and total parameters, % trainable.

    raypeft methods compare --model smollm2-135m --methods lora,dora,adalora,loha,lokr,hra,ia3,vera

Each method is built by its registered builder (exactly what training would build) on a
fresh copy of the base, and counted. Writes ``methods.md``, ``methods.csv`` and a bar
chart ``methods.png``.
"""

from __future__ import annotations

import copy
import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_METHODS = (
    "lora",
    "rslora",
    "dora",
    "adalora",
    "loha",
    "lokr",
    "hra",
    "ia3",
    "vera",
    "vblora",
    "waveft",
    "fourierft",
)


@dataclass
class Row:
    method: str
    trainable: int | None
    total: int | None
    error: str | None = None

    @property
    def percent(self) -> float | None:
        return None if self.trainable is None or not self.total else 100.0 * self.trainable / self.total


def count(model) -> tuple[int, int]:
    """(trainable, total) parameters. Pure."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def compare(
    base: str,
    methods: list[str],
    target: Any = "all-linear",
    r: int = 16,
    args: dict[str, dict] | None = None,
    log=print,
) -> list[Row]:
    """Build each method on ``base`` and count its parameters. A method that cannot be built gets its error."""
    from pipelines.model import methods as registry
    from pipelines.model.loading import load_base
    from pipelines.spec.job import SpecError, validate

    args = args or {}
    base_spec = validate({"model": {"base": base, "quantization": "none"}, "method": {"name": "lora"}})
    model, _, _ = load_base(base_spec, log=log)
    rows = []
    for name in methods:
        try:
            spec = validate(
                {
                    "model": {"base": base, "quantization": "none"},
                    "method": {"name": name, "r": r, "target_modules": target, "args": args.get(name, {})},
                }
            )
            prepared = registry.build(spec, copy.deepcopy(model))
            rows.append(Row(name, *count(prepared.model)))
        except SpecError as e:
            rows.append(Row(name, None, None, "; ".join(f"{f}: {m}" for f, m in e.problems)))
        except Exception as e:  # noqa: BLE001 - one method's failure is a row, not the end of the table
            rows.append(Row(name, None, None, f"{type(e).__name__}: {e}"[:200]))
    return rows


def markdown(rows: list[Row], base: str) -> str:
    lines = [
        f"Parameter budgets on `{base}`",
        "",
        "| method | trainable | total | % trainable |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.method} | – | – | {r.error.replace('|', '/')} |")
        else:
            lines.append(f"| {r.method} | {r.trainable:,} | {r.total:,} | {r.percent:.4f}% |")
    return "\n".join(lines)


def write(rows: list[Row], base: str, out: Path) -> dict[str, Path]:
    """methods.md, methods.csv and methods.png in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "methods.md", "csv": out / "methods.csv", "png": out / "methods.png"}
    paths["md"].write_text(markdown(rows, base) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "trainable", "total", "percent_trainable", "error"])
        for r in rows:
            w.writerow(
                [r.method, r.trainable, r.total, f"{r.percent:.6f}" if r.percent is not None else "", r.error or ""]
            )
    ok = [r for r in rows if not r.error]
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(ok) + 2), 4))
    bars = ax.bar([r.method for r in ok], [r.trainable for r in ok], color="#4C72B0")
    ax.set_yscale("log")
    ax.set_ylabel("trainable parameters (log)")
    ax.set_title(f"Trainable parameters per method on {base}")
    for b, r in zip(bars, ok):
        ax.annotate(
            f"{r.percent:.3g}%", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=8
        )
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=100)
    plt.close(fig)
    return paths

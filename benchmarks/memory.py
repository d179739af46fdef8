"""The memory planner against memory measured on this machine (CPU), side by side. Not a timed test.

    python -m benchmarks.memory                 # tiny model and SmolLM2, LoRA and QLoRA
    python -m benchmarks.memory --child SPEC    # (internal) one measurement in a fresh process

Each case runs in a fresh process: import the libraries, note the resident set (the baseline), load
the base and build the method, reset the kernel's peak-RSS counter (``/proc/self/clear_refs``), run a
few training steps on full-length batches (the AdamW states exist after the first; the loss is the
engines' own, ``train.loss_chunk_tokens`` included), and read the peak
(``VmHWM``). Measured = weights + adapter + training peak = (RSS after load − baseline) + (peak −
RSS after load). The planner's figure is ``raypeft plan`` for the same spec (fp32 on CPU).

Each case is measured twice. First with glibc told to give freed blocks back to the kernel at once
(``MALLOC_MMAP_THRESHOLD_=65536``): the resident set then tracks the live tensors, which is what the
planner models (and what ``torch.cuda.max_memory_allocated`` reports on a GPU). Then with glibc's
defaults, which keep freed blocks of up to 32 MiB for reuse: the extra is allocator slack, shown
in its own column.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CASES = [
    ("tiny", "lora", 8, 256),
    ("tiny", "qlora", 8, 256),
    ("smollm2-135m", "lora", 4, 256),
    ("smollm2-135m", "qlora", 4, 256),
    ("smollm2-135m", "lora", 8, 128),
]


def _status_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(raw: dict) -> dict:
    import gc

    import bitsandbytes  # noqa: F401  (its import is part of the baseline)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from pipelines.model import load_base, methods
    from pipelines.spec import validate
    from pipelines.train import token_loss_sum

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 2))  # 2 unless set (the tests: 1 per xdist worker)
    spec = validate(raw)
    gc.collect()
    baseline = _status_kb("VmRSS") * 1024
    model, tok, _ = load_base(spec, log=lambda *_: None)
    prepared = methods.build(spec, model)
    gc.collect()
    loaded = _status_kb("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
        f.write("5")
    b, s = spec.train.micro_batch_size, spec.data.max_length
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(tok.vocab_size, 5000), (b, s), generator=g)
    model = prepared.model
    model.train()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    for _ in range(3):  # the loss raypeft's engines compute (train.loss_chunk_tokens)
        loss = token_loss_sum(model, model, batch, spec.train.loss_chunk_tokens) / ids.numel()
        loss.backward()
        prepared.optimizer.step()
        prepared.optimizer.zero_grad(set_to_none=True)
    peak = _status_kb("VmHWM") * 1024
    return {"baseline": baseline, "model": loaded - baseline, "training": peak - loaded, "measured": peak - baseline}


# glibc hands freed blocks back at once: the resident set tracks the live tensors
LIVE_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _measure(raw: dict, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.memory", "--child", json.dumps(raw)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "MALLOC_ARENA_MAX": "2", **env},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def planned(raw: dict) -> int:
    from pipelines.lifecycle import breakdown_of, plan_of, shape_of
    from pipelines.spec import validate

    spec = validate(raw)
    shape = shape_of(spec)
    return int(breakdown_of(spec, shape, plan_of(spec)).total)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    tmp = tempfile.mkdtemp(prefix="bench-mem-")
    from pipelines.model import tiny_llama

    tiny = str(tiny_llama(os.path.join(tmp, "tiny"), vocab_size=4096, hidden=256, layers=4))
    rows = []
    for base, method, b, s in CASES:
        raw = {
            "model": {"base": tiny if base == "tiny" else base},
            "method": {"name": method, "r": 16, "dropout": 0.0},
            "data": {"max_length": s},
            "train": {"micro_batch_size": b},
        }
        m = _measure(raw, LIVE_MALLOC)
        glibc = _measure(raw, {})["measured"]
        est = planned(raw)
        rows.append(
            {
                "base": base,
                "method": method,
                "batch": f"{b}×{s}",
                **m,
                "glibc_default": glibc,
                "planned": est,
                "ratio": est / m["measured"],
            }
        )
        print(
            f"{base} {method} {b}×{s}: measured {m['measured'] / 2**20:.0f} MiB (glibc defaults {glibc / 2**20:.0f}), "
            f"planned {est / 2**20:.0f} MiB ({est / m['measured']:.2f}×)",
            file=sys.stderr,
        )
    print(
        "\n| base | method | batch × tokens | measured (MiB) | planned (MiB) | planned / measured | glibc defaults (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['base']} | {r['method']} | {r['batch']} | {r['measured'] / 2**20:.0f} | {r['planned'] / 2**20:.0f} | "
            f"**{r['ratio']:.2f}** | {r['glibc_default'] / 2**20:.0f} |"
        )
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

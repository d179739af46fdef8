"""The serving engine's multi-LoRA product, strategy against strategy, for one decode step. Not a timed test.

    python -m benchmarks.lora_product [--random-base smollm2-135m] [--rows 8] [--adapters 8] [--rank 16]
                                      [--repeats 3] [--gpu] [--sides in_place,gather,grouped]

One decode step's adapter work: every adapted linear of every layer of the shape (``--random-base``: q, k, v, o,
gate, up, down), each a ``serving.lora_batch.MultiLoraLinear`` with its own stacks of ``--adapters`` rank-``--rank``
adapters, multiplying ``--rows`` rows of one token each, row ``i`` through adapter ``i % adapters``:

* ``in_place``: the engine's decode path (``MultiLoraLinear._in_place``): two matmuls over the rows' whole slot
  range straight from the stacks, a mask keeping each row's own slot (forced here even for ranges the engine
  would gather, ``IN_PLACE_MAX_SPAN``);
* ``gather``: the engine's general path (``MultiLoraLinear._per_row``): each row's ``A`` and ``B`` gathered, two
  batched matmuls (``bmm``) over per-row matrices;
* ``grouped``: rows sorted by adapter, two matmuls per adapter group over its rows (a segment-grouped product,
  as S-LoRA/Punica's SGMV does in one kernel), scattered back.

Only the adapter product is timed (the base layer's ``W x`` is the same for all three). Each side runs in a fresh
process, the sides alternate, ``--repeats`` times each; the clock covers ``--iters`` steps after ``--warmup``,
synchronized on a GPU. Every side's outputs must equal ``in_place``'s (1e-5 in fp32; 2e-2 in bf16) or it fails.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from types import SimpleNamespace

from benchmarks.children import run_child
from benchmarks.random_base import SHAPES

SIDES = ("in_place", "gather", "grouped")


def linears(shape: str) -> list[tuple[int, int]]:
    """``(in, out)`` of every adapted linear of a decode step, in order. Pure."""
    hidden, inter, layers, heads, kv, _, _ = SHAPES[shape]
    d = hidden // heads
    per_layer = [(hidden, hidden), (hidden, kv * d), (hidden, kv * d), (hidden, hidden)]
    per_layer += [(hidden, inter), (hidden, inter), (inter, hidden)]
    return per_layer * layers


def child(side: str, args) -> dict:
    import torch

    from serving import lora_batch
    from serving.lora_batch import BatchContext, MultiLoraLinear

    device = torch.device("cuda:0" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    slots = args.adapters + 1  # slot 0 is the bare base
    rows = [1 + i % args.adapters for i in range(args.rows)]
    if side == "in_place":  # read in place whatever the range: the engine's own cap (IN_PLACE_MAX_SPAN) lifted
        lora_batch.IN_PLACE_MAX_SPAN[device.type] = lora_batch.IN_PLACE_TOKEN_SLOTS
    ctx = BatchContext(device, dtype)
    ctx.set(rows, ranks=dict.fromkeys(range(1, slots), args.rank))
    if side == "gather":
        ctx.onehot = None  # the per-row gather, whatever the slot range
    layers, xs, ys = [], {}, {}
    for i, o in linears(args.random_base):
        # the base layer is never called (only the adapter product is timed): its shape and device suffice
        base = SimpleNamespace(in_features=i, out_features=o, weight=torch.empty(0, device=device))
        lin = MultiLoraLinear(base, ctx, slots, args.rank, dtype)
        lin.A = (torch.randn(slots, args.rank, i, generator=g) / i**0.5).to(device, dtype)
        lin.B = (torch.randn(o, slots, args.rank, generator=g) / args.rank).to(device, dtype)
        lin.A[0].zero_()
        lin.B[:, 0].zero_()
        layers.append(lin)
        xs.setdefault(i, torch.randn(args.rows, i, generator=g).to(device, dtype))
        ys.setdefault(o, torch.zeros(args.rows, o, device=device, dtype=dtype))
    # ``grouped``: the rows' order by adapter and each group's slice, made once per step on the host
    order = sorted(range(args.rows), key=lambda r: rows[r])
    groups, start = [], 0
    for s in sorted(set(rows)):
        n = rows.count(s)
        groups.append((s, start, start + n))
        start += n
    perm = torch.tensor(order, device=device)
    back = torch.argsort(perm)

    def grouped(lin, x, y):
        xs_ = x.index_select(0, perm)
        parts = [(xs_[a:b] @ lin.A[s].T) @ lin.B[:, s].T for s, a, b in groups]
        return y + torch.cat(parts).index_select(0, back)

    def one_step():
        outs = []
        for lin in layers:
            x, y = xs[lin.in_features], ys[lin.out_features]
            if side == "in_place":
                outs.append(lin._in_place(x, y))
            elif side == "gather":
                outs.append(lin._per_row(x[:, None], y[:, None])[:, 0])
            else:
                outs.append(grouped(lin, x, y))
        return outs

    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    with torch.no_grad():
        for _ in range(args.warmup):
            one_step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            outs = one_step()
        sync()
    ms = (time.perf_counter() - t0) / args.iters * 1000
    check = torch.cat([o.float().flatten()[::31] for o in outs[:: max(1, len(outs) // 16)]])
    return {"side": side, "ms": ms, "out": check.tolist()}


def _run(side: str, argv: list[str]) -> dict:
    return run_child("benchmarks.lora_product", side, argv)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lora_product", description=__doc__.split("\n\n")[0])
    p.add_argument("--random-base", default="smollm2-135m", choices=list(SHAPES), metavar="SHAPE")
    p.add_argument("--rows", type=int, default=8, help="decoding rows, one token each")
    p.add_argument("--adapters", type=int, default=8, help="distinct adapters among them (row i: adapter i % n)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--gpu", action="store_true", help="bf16 on cuda:0")
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    sides = [s for s in args.sides.split(",") if s]
    if set(sides) - set(SIDES) or "in_place" not in sides:
        p.error(f"--sides: a subset of {','.join(SIDES)} that includes in_place (the reference)")
    if not 1 <= args.adapters <= args.rows:
        p.error("--adapters: between 1 and --rows")
    passed = list(argv if argv is not None else sys.argv[1:])
    print(
        f"{args.random_base} multi-LoRA product, {'bf16 on cuda:0' if args.gpu else f'fp32 CPU, {args.threads} threads'}: "
        f"{args.rows} rows over {args.adapters} rank-{args.rank} adapters, {len(linears(args.random_base))} linears "
        f"a step, {args.iters} steps per run",
        flush=True,
    )
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for i in range(args.repeats):
        for side in sides if i % 2 == 0 else sides[::-1]:
            r = _run(side, passed)
            runs[side].append(r)
            print(f"  run {i + 1} {side:8s} {r['ms']:9.3f} ms per step", flush=True)
    bound = 2e-2 if args.gpu else 1e-5
    ref = runs["in_place"][0]["out"]
    result: dict = {
        "shape": args.random_base,
        "rows": args.rows,
        "adapters": args.adapters,
        "rank": args.rank,
        "device": "cuda" if args.gpu else "cpu",
        "repeats": args.repeats,
    }
    ok = True
    for side, rs in runs.items():
        ms = [r["ms"] for r in rs]
        gap = max(abs(a - b) for a, b in zip(rs[0]["out"], ref, strict=True))
        ok &= gap <= bound
        print(
            f"{side:8s} ms median {statistics.median(ms):.3f} (min {min(ms):.3f}, max {max(ms):.3f}); "
            f"largest difference from in_place {gap:.1e} (bound {bound:g})"
        )
        result[f"{side}_ms"] = round(statistics.median(ms), 4)
    result["fastest"] = min(sides, key=lambda s: result[f"{s}_ms"])
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

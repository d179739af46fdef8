"""Attention for one padding-free micro-batch, kernel against kernel. Not a timed test.

    python -m benchmarks.attention [--random-base smollm2-135m] [--examples 8] [--prefix 50] [--repeats 3]
                                   [--forward-only] [--gpu] [--sides varlen,flex,padded]

One micro-batch of ``--examples`` examples (own lengths drawn from ``--lengths``, seed 0) that share a
``--prefix``-token prompt, through one attention call per layer for every layer of the shape (``--random-base``:
its heads, key/value heads and head size), forward and backward:

* ``varlen``: raypeft's per-example SDPA (``pipelines.train.attention.varlen_sdpa``, today's padding-free path):
  the row with the prefix once, one SDPA call per example per layer;
* ``flex``: one compiled ``flex_attention`` call per layer over the same row, with one block mask per micro-batch
  (built inside the span) from each position's example id and the prefix length:
  ``(kv <= q) & ((doc[q] == doc[kv]) | (kv < P))``;
* ``padded``: one SDPA call per layer over the padded batch, every example with its own copy of the prefix and a
  key-padding mask (what a bare PEFT loop's model runs).

Each side runs in a fresh process, the sides alternate, ``--repeats`` times each; the clock covers
``--iters`` micro-batches after ``--warmup`` (compiling included in the warm-up only), synchronized on a GPU.
The outputs of the row's tokens must equal ``padded``'s (5e-5 in fp32; 2e-2 in bf16) or the side fails. A
side that cannot run here (FlexAttention has no backward on a CPU in torch 2.13) reports why. Ends with one
JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from types import SimpleNamespace

from benchmarks.children import run_child
from benchmarks.random_base import SHAPES

SIDES = ("varlen", "flex", "padded")


def layout(args):
    """``(prefix, own lengths)`` of the micro-batch's examples."""
    lo, hi = (int(x) for x in args.lengths.split("-"))
    r = random.Random(0)
    return args.prefix, [r.randint(lo, hi) for _ in range(args.examples)]


def tensors(args, device, dtype):
    import torch

    hidden, _, layers, heads, kv, _, _ = SHAPES[args.random_base]
    d = hidden // heads
    prefix, own = layout(args)
    n = prefix + max(own)
    g = torch.Generator().manual_seed(0)
    # one example's q/k/v per position: the prefix's states are the same for every example (causal model)
    q = torch.randn(len(own), heads, n, d, generator=g)
    k = torch.randn(len(own), kv, n, d, generator=g)
    v = torch.randn(len(own), kv, n, d, generator=g)
    q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix] = q[:1, :, :prefix], k[:1, :, :prefix], v[:1, :, :prefix]
    padded = [t.to(device, dtype) for t in (q, k, v)]
    # the padding-free row: the prefix once, then every example's own tokens
    pieces = [slice(0, prefix + own[0])] + [slice(prefix, prefix + m) for m in own[1:]]
    row = [torch.cat([t[i : i + 1, :, s] for i, s in enumerate(pieces)], dim=2) for t in padded]
    positions = torch.cat([torch.arange(prefix + own[0])] + [torch.arange(prefix, prefix + m) for m in own[1:]])
    doc = torch.cat(
        [torch.zeros(prefix + own[0], dtype=torch.int32)]
        + [torch.full((m,), i, dtype=torch.int32) for i, m in enumerate(own[1:], 1)]
    )
    return layers, heads // kv, padded, row, positions[None].to(device), doc.to(device), prefix, own


def child(side: str, args) -> dict:
    import torch
    import torch.nn.functional as F

    from pipelines.train import attention

    device = torch.device("cuda:0" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    torch.set_num_threads(args.threads)
    layers, groups, padded, row, positions, doc, prefix, own = tensors(args, device, dtype)
    module = SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=True)
    grad = not args.forward_only
    inputs = [t.detach().clone().requires_grad_(grad) for t in (padded if side == "padded" else row)]

    state: dict = {}
    if side == "varlen":

        def one(q, k, v):  # a fresh position tensor per micro-batch: its segments are read once per forward
            return attention.varlen_sdpa(module, q, k, v, None, position_ids=state["pos"])[0]  # [1, tokens, H, d]
    elif side == "padded":
        lengths = torch.tensor([prefix + m for m in own], device=device)
        keep = torch.arange(padded[0].shape[2], device=device)[None] < lengths[:, None]
        mask = (torch.ones(keep.shape[1], keep.shape[1], dtype=torch.bool, device=device).tril() & keep[:, None, :])[
            :, None
        ]

        def one(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    else:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        total = row[0].shape[2]

        def mask_mod(b, h, q, kv):
            return (kv <= q) & ((doc[q] == doc[kv]) | (kv < prefix))

        def one(q, k, v):
            if "mask" not in state:  # once per micro-batch, shared by its layers
                state["mask"] = create_block_mask(mask_mod, None, None, total, total, device=device)
            return flex(q, k, v, block_mask=state["mask"], enable_gqa=True).transpose(1, 2)

    def micro_batch():
        state.clear()
        state["pos"] = positions.clone()
        outs = [one(*inputs) for _ in range(layers)]
        if grad:
            sum(o.float().sum() for o in outs).backward()
        return outs[0]

    try:
        for _ in range(args.warmup):
            out = micro_batch()
    except (NotImplementedError, RuntimeError) as e:
        return {"side": side, "error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        out = micro_batch()
    sync()
    ms = (time.perf_counter() - t0) / args.iters * 1000
    # the row's tokens in the padded batch's layout, for the check against ``padded``
    if side != "padded":
        pieces, s = [], 0
        for i, m in enumerate(own):
            n = prefix + m if i == 0 else m
            pieces.append(out[0, s : s + n])
            s += n
        out = [pieces[0]] + [pieces[i] for i in range(1, len(own))]
    else:
        out = [out[0, : prefix + own[0]]] + [out[i, prefix : prefix + m] for i, m in enumerate(own) if i]
    return {"side": side, "ms": ms, "out": torch.cat(out).float().flatten()[::97].tolist()}


def _run(side: str, argv: list[str]) -> dict:
    return run_child("benchmarks.attention", side, argv)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--random-base", default="smollm2-135m", choices=list(SHAPES), metavar="SHAPE")
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--prefix", type=int, default=50, help="tokens every example shares before its own")
    p.add_argument("--lengths", default="40-80", help="each example's own tokens, drawn from LO-HI")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--forward-only", action="store_true")
    p.add_argument("--gpu", action="store_true", help="bf16 on cuda:0")
    p.add_argument("--sides", default=",".join(SIDES))
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    sides = [s for s in args.sides.split(",") if s]
    if set(sides) - set(SIDES) or "padded" not in sides:
        p.error(f"--sides: a subset of {','.join(SIDES)} that includes padded (the reference)")
    passed = list(argv if argv is not None else sys.argv[1:])
    prefix, own = layout(args)
    print(
        f"{args.random_base} attention, {'bf16 on cuda:0' if args.gpu else f'fp32 CPU, {args.threads} threads'}: "
        f"{len(own)} examples of {prefix} shared + {min(own)}-{max(own)} own tokens, every layer, "
        f"{'forward' if args.forward_only else 'forward and backward'}, {args.iters} micro-batches per run",
        flush=True,
    )
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    for i in range(args.repeats):
        for side in sides if i % 2 == 0 else sides[::-1]:
            r = _run(side, passed)
            runs[side].append(r)
            print(
                f"  run {i + 1} {side:7s} " + (f"{r['ms']:9.2f} ms per micro-batch" if "ms" in r else r["error"]),
                flush=True,
            )
    bound = 2e-2 if args.gpu else 5e-5
    ref = runs["padded"][0]["out"]
    result: dict = {"repeats": args.repeats, "gpu": args.gpu, "forward_only": args.forward_only}
    ok = True
    for side, rs in runs.items():
        if "error" in rs[0]:
            print(f"{side:7s} cannot run here: {rs[0]['error']}")
            result[f"{side}_ms"] = None
            continue
        ms = [r["ms"] for r in rs]
        gap = max(abs(a - b) for a, b in zip(rs[0]["out"], ref, strict=True))
        ok &= gap <= bound
        print(
            f"{side:7s} ms median {statistics.median(ms):.2f} (min {min(ms):.2f}, max {max(ms):.2f}); "
            f"largest difference from padded {gap:.1e} (bound {bound:g})"
        )
        result[f"{side}_ms"] = round(statistics.median(ms), 3)
    for side in ("varlen", "flex"):
        if result.get(f"{side}_ms"):
            result[f"{side}_over_padded_time"] = round(result[f"{side}_ms"] / result["padded_ms"], 3)
    print(json.dumps(result))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""The serving engine's decode step, eager against ``torch.compile`` (inductor). Not a timed test.

    python -m benchmarks.compile_decode [--random-base smollm2-135m] [--tokens 32] [--repeats 2] [--gpu]

8 requests over 8 distinct rank-16 LoRA adapters (``benchmarks.serving``'s), greedy, each generating ``--tokens``
tokens, on one engine (``serving.engine.Engine``, 9 slots). Two sides, each in a fresh process, alternating,
``--repeats`` times each:

* ``eager``: the engine as it ships;
* ``compiled``: ``Engine(compile_decode=True)`` (serve spec ``limits.compile_decode``): decode-only passes run
  the model through ``torch.compile`` (inductor, dynamic sizes), every row down one LoRA path; prompt passes
  stay eager. ``Engine.warm`` compiles it before the batch, as a replica does before it reports ready
  (``compile_s``).

Each run serves the batch twice: the first (``first_batch_s``: the prefill included) and the second, whose
decode-only steps give ``decode_step_p50_ms``. The compiled side must generate exactly the
eager side's tokens (fp32) or the benchmark fails. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.children import run_child
from benchmarks.random_base import SHAPES

SIDES = ("eager", "compiled")
PROMPTS = [f"Request {i}: name the city where the {w} was built." for i, w in enumerate("abcdefgh")]


def child(side: str, args) -> dict:
    import torch
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.engine import Engine, Request
    from serving.lora_batch import MultiLoraModel

    torch.set_num_threads(args.threads)
    device, dtype = ("cuda", torch.bfloat16) if args.gpu else ("cpu", torch.float32)
    tok = AutoTokenizer.from_pretrained(args.base_path)
    model = AutoModelForCausalLM.from_pretrained(args.base_path, dtype=dtype).eval().to(device)
    dirs = sorted(Path(args.adapters).iterdir())
    engine = Engine(
        MultiLoraModel(model, slots=9, r_max=16),
        tok,
        lambda name: str(dirs[int(name)]),
        max_batch=8,
        compile_decode=side == "compiled",
    )
    for i in range(8):
        engine.add_adapter(str(i))
    compile_s = engine.warm()  # what a replica does before it reports ready (0 on the eager side)
    sync = torch.cuda.synchronize if args.gpu else (lambda: None)

    def batch() -> tuple[list[list[int]], float, list[float]]:
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
        reqs = [engine.submit(Request(ids[i], str(i), args.tokens, ignore_eos=True)) for i in range(8)]
        t0, steps = time.perf_counter(), []
        while not all(r.finish_reason for r in reqs):
            decoding = all(r.out_ids for r in reqs)  # every row past its prompt: a decode-only step
            s = time.perf_counter()
            engine.step()
            sync()
            if decoding:
                steps.append((time.perf_counter() - s) * 1000)
        return [r.out_ids for r in reqs], time.perf_counter() - t0, steps

    _, first_s, _ = batch()
    tokens, _, steps = batch()
    return {
        "side": side,
        "compile_s": compile_s,
        "first_batch_s": first_s,
        "decode_step_p50_ms": statistics.median(steps),
        "graphs": counters["stats"].get("unique_graphs", 0),
        "tokens": tokens,
    }


def _run(side: str, argv: list[str], extra: list[str]) -> dict:
    return run_child("benchmarks.compile_decode", side, [*argv, *extra])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.compile_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--random-base", default="smollm2-135m", choices=list(SHAPES), metavar="SHAPE")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--gpu", action="store_true", help="bf16 on cuda:0")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--base-path", help=argparse.SUPPRESS)
    p.add_argument("--adapters", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return 0
    from benchmarks.random_base import build
    from benchmarks.serving import make_adapters

    base = str(build(args.random_base, "cuda:0" if args.gpu else "cpu"))
    passed = list(argv if argv is not None else sys.argv[1:])
    print(
        f"{args.random_base} engine decode, {'bf16 on cuda:0' if args.gpu else f'fp32 CPU, {args.threads} threads'}: "
        f"8 requests over 8 rank-16 adapters, {args.tokens} tokens each, {args.repeats} runs per side",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="raypeft-compile-decode-") as tmp:
        for d in make_adapters(base, 16, Path(tmp) / "made")[:8]:
            (Path(tmp) / "lora").mkdir(exist_ok=True)
            d.rename(Path(tmp) / "lora" / d.name)
        extra = ["--base-path", base, "--adapters", str(Path(tmp) / "lora")]
        runs: dict[str, list[dict]] = {s: [] for s in SIDES}
        for i in range(args.repeats):
            for side in SIDES if i % 2 == 0 else SIDES[::-1]:
                r = _run(side, passed, extra)
                runs[side].append(r)
                print(
                    f"  run {i + 1} {side:8s} decode step p50 {r['decode_step_p50_ms']:8.2f} ms; first batch "
                    f"{r['first_batch_s']:7.1f} s; compiled {r['graphs']} graph(s) in {r['compile_s']:.1f} s",
                    flush=True,
                )
    same = all(r["tokens"] == runs["eager"][0]["tokens"] for rs in runs.values() for r in rs)
    result: dict = {"shape": args.random_base, "device": "cuda" if args.gpu else "cpu", "repeats": args.repeats}
    for side, rs in runs.items():
        ms, first = [r["decode_step_p50_ms"] for r in rs], [r["first_batch_s"] for r in rs]
        comp = [r["compile_s"] for r in rs]
        print(
            f"{side:8s} decode step p50 ms median {statistics.median(ms):.2f} (min {min(ms):.2f}, max {max(ms):.2f}); "
            f"first batch s median {statistics.median(first):.1f}; compile s {min(comp):.1f}-{max(comp):.1f}"
        )
        result[f"{side}_decode_step_p50_ms"] = round(statistics.median(ms), 3)
        result[f"{side}_first_batch_s"] = round(statistics.median(first), 2)
        result[f"{side}_compile_s"] = round(statistics.median(comp), 1)
    result["compiled_graphs"] = max(r["graphs"] for r in runs["compiled"])
    result["compiled_over_eager_speed"] = round(
        result["eager_decode_step_p50_ms"] / result["compiled_decode_step_p50_ms"], 3
    )
    result["same_tokens"] = same
    print(f"the compiled side generated {'exactly' if same else 'NOT'} the eager side's tokens")
    print(json.dumps(result))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

"""Multi-adapter serving, measured fairly: each side in a fresh process, sides alternating, repeated.

    python -m benchmarks.serving [--base smollm2-135m] [--rank 16] [--tokens 32] [--repeats 3]
                                 [--prefill-chunk 256] [--sides a,b,…] [--gpu] [--compile-decode]
                                 [--random-base smollm2-135m|llama-1b|llama-8b]

``--random-base SHAPE`` serves a random-init base of that shape instead of ``--base``
(``benchmarks/random_base.py``, built once on the benchmark's device, no download); its greedy
tokens are noise, but every side generates the same ``--tokens`` of them.

Sides (every one on SmolLM2 with the same prompts, greedy, ``ignore_eos``/``min_new_tokens`` so
every request generates ``--tokens`` tokens; the clock covers submit → last token, prefill included):

* ``engine_mixed``: raypeft's engine, 8 requests, one per adapter (8 distinct rank-16 adapters,
  every linear layer), all resident;
* ``engine_base``: the same engine and requests with base-only rows (the adapter cost, nothing else);
* ``hf_base``: HF ``generate`` on the bare base, the same left-padded batch;
* ``peft_names``: PEFT with the 8 adapters, ``generate(..., adapter_names=[...])``;
* ``engine_mixed32`` / ``peft_grouped32``: 32 requests over the 8 adapters, in one engine vs
  PEFT batches of 4 per adapter, one adapter after another (``set_adapter`` + ``generate``);
* ``scale_1000`` / ``scale_8``: 64 requests drawn by Zipf (α = 1) popularity from 1,000 registered
  adapters, or from 8, on an engine with 8 active slots and 64 in the CPU tier. The 1,000 are
  hard links to the 8 adapters' files: each is read and stacked as its own adapter (from the page
  cache), without 20 GB of disk;
* ``cold_load``: read an adapter whose files are not in the page cache (fresh copies, then
  ``posix_fadvise(DONTNEED)``), prepare it (a DoRA adapter's output scales; the engine does both on
  its read thread) and stack it into a slot (on the decode loop), LoRA and DoRA alternating; the
  p50 of the whole, of each kind, and of the part on the decode loop;
* ``itl``: 4 rows decoding; the inter-token latency p50 with nothing arriving, and the p99 while
  1,024-token prompts keep arriving (one whenever the last has started decoding; at least 40
  steps and 3 prompts' first tokens), after a warm-up that includes one long prompt (so the KV
  cache has grown to its working size once, as on a server that has been up a while).

``--compile-decode`` runs every engine side with ``limits.compile_decode`` (its two graphs compiled before
the clock starts). The table gives the median and the spread (min–max) over the repeats; the last line is
one JSON object, with ``device``, ``base`` and ``decode_step_p50_ms`` (the median decode-only step of
``engine_mixed``: 8 rows over 8 adapters, every row past its prompt). Not a timed test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.random_base import SHAPES

PROMPTS = [
    "Extract the person as JSON: Ana Silva, 41, is a teacher in Lisbon.",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "List three prime numbers.",
    "Translate 'good morning' to Spanish.",
    "Explain what a LoRA adapter is in one sentence.",
    "Give me a name for a cat.",
    "What is 12 times 11?",
]
SIDES = [
    "engine_mixed",
    "engine_base",
    "hf_base",
    "peft_names",
    "engine_mixed32",
    "peft_grouped32",
    "scale_1000",
    "scale_8",
    "cold_load",
    "itl",
]


# --------------------------------------------------------------------------- set-up (parent process)


def make_adapters(base_path: str, rank: int, out: Path) -> list[Path]:
    """8 distinct LoRA adapters (small random deltas) and, for the cold loads, 8 DoRA ones."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for i in range(16):
        torch.manual_seed(1000 + i)
        cfg = LoraConfig(
            task_type="CAUSAL_LM",
            r=rank,
            lora_alpha=2 * rank,
            target_modules="all-linear",
            init_lora_weights=False,
            use_dora=i >= 8,
        )
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_path), cfg)
        with torch.no_grad():  # distinct adapters that still produce text
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.01)
        d = out / (f"dora{i - 8}" if i >= 8 else f"adapter{i}")
        model.save_pretrained(d)
        dirs.append(d)
    many = out / "many"
    for j in range(1000):  # 1,000 names over the 8 LoRA adapters' files
        d = many / f"a{j}"
        d.mkdir(parents=True)
        for f in dirs[j % 8].iterdir():
            os.link(f, d / f.name)
    return dirs


# --------------------------------------------------------------------------- sides (child processes)


def _load(args):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if args.gpu else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.base_path, dtype=dtype).eval()
    return model.to("cuda") if args.gpu else model


def _sync(args):
    if args.gpu:
        import torch

        torch.cuda.synchronize()


COMPILE_S: list[float] = []  # each engine's warm-up (0 unless --compile-decode)


def _engine(args, tok, resolve, *, slots=9, max_batch=8, cpu_items=64):
    from serving.engine import Engine
    from serving.lora_batch import MultiLoraModel

    multi = MultiLoraModel(_load(args), slots=slots, r_max=args.rank)
    engine = Engine(
        multi,
        tok,
        resolve,
        max_batch=max_batch,
        cpu_cache_items=cpu_items,
        prefill_chunk_tokens=args.prefill_chunk,
        prefill_slowdown=args.prefill_slowdown or None,
        compile_decode=args.compile_decode,
    )
    # --compile-decode: compiled here, before any clock starts, as a replica does before it reports ready
    COMPILE_S.append(engine.warm())
    return engine


def _ids(tok, prompt):
    return tok(prompt, add_special_tokens=False)["input_ids"]


def _drive(engine, reqs, args, steps: list[float] | None = None) -> tuple[int, float]:
    """Submit, step until done; (tokens generated, seconds). ``steps`` gets each decode-only step's milliseconds
    (every row past its prompt, nothing waiting: the step a decode token costs)."""
    _sync(args)
    t0 = time.perf_counter()
    for r in reqs:
        engine.submit(r)
    while not all(r.finish_reason for r in reqs):
        decoding = steps is not None and engine.rows and engine.n == len(engine.rows) and not engine.waiting
        s = time.perf_counter()
        if not engine.step():
            time.sleep(0.001)
        if decoding:
            _sync(args)  # the step already read its tokens back: this waits for nothing more
            steps.append((time.perf_counter() - s) * 1000)
    _sync(args)
    return sum(len(r.out_ids) for r in reqs), time.perf_counter() - t0


def side_engine(args, tok, dirs, n_requests: int, adapters: bool) -> dict:
    from serving.engine import Request

    engine = _engine(args, tok, lambda name: str(dirs[int(name)]), max_batch=n_requests)
    for i in range(8):
        engine.add_adapter(str(i))

    def reqs():
        return [
            Request(_ids(tok, PROMPTS[i % 8]), str(i % 8) if adapters else None, args.tokens, ignore_eos=True)
            for i in range(n_requests)
        ]

    _drive(engine, reqs(), args)  # warm-up
    steps: list[float] = []
    n, dt = _drive(engine, reqs(), args, steps)
    return {"tok_s": n / dt, "decode_step_p50_ms": statistics.median(steps), "compile_s": sum(COMPILE_S)}


def side_hf(args, tok, dirs, mode: str) -> dict:
    import torch
    from peft import PeftModel

    model = _load(args)
    names = [f"a{i}" for i in range(8)]
    if mode != "base":
        model = PeftModel.from_pretrained(model, dirs[0], adapter_name=names[0])
        for name, d in zip(names[1:], dirs[1:8]):
            model.load_adapter(d, adapter_name=name)
        model.eval()
    gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    tok.padding_side = "left"
    dev = "cuda" if args.gpu else "cpu"

    def batch(prompts, **kw):
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
        out = model.generate(**enc, **gen, **kw)
        return (out.shape[1] - enc["input_ids"].shape[1]) * len(prompts)

    def once():
        _sync(args)
        t0 = time.perf_counter()
        with torch.no_grad():
            if mode == "grouped32":  # 32 requests: 4 per adapter, one adapter's batch after another
                n = 0
                for i, name in enumerate(names):
                    model.set_adapter(name)
                    n += batch([PROMPTS[(i + 8 * k) % 8] for k in range(4)])
            else:
                n = batch(PROMPTS, **({"adapter_names": names} if mode == "names" else {}))
        _sync(args)
        return n, time.perf_counter() - t0

    once()
    n, dt = once()
    return {"tok_s": n / dt}


def side_scale(args, tok, dirs, registered: int) -> dict:
    from serving.engine import Request

    many = Path(dirs[0]).parent / "many"
    engine = _engine(args, tok, lambda name: str(many / name))
    rng = random.Random(0)
    weights = [1 / (k + 1) for k in range(registered)]  # Zipf, α = 1
    names = [f"a{j}" for j in range(registered)]
    picks = rng.choices(names, weights=weights, k=64)
    reqs = [Request(_ids(tok, PROMPTS[i % 8]), name, args.tokens, ignore_eos=True) for i, name in enumerate(picks)]
    warm = [Request(_ids(tok, PROMPTS[0]), None, 4, ignore_eos=True)]
    _drive(engine, warm, args)
    n, dt = _drive(engine, reqs, args)
    return {"tok_s": n / dt, "distinct_adapters": len(set(picks))}


def side_cold_load(args, tok, dirs) -> dict:
    from serving.lora_batch import AdapterWeights, MultiLoraModel

    multi = MultiLoraModel(_load(args), slots=2, r_max=args.rank)
    times = []
    with tempfile.TemporaryDirectory(dir=Path(dirs[0]).parent) as tmp:
        for k in range(16):
            src = dirs[k // 2 + (8 if k % 2 else 0)]  # LoRA, DoRA, LoRA, …
            d = Path(tmp) / f"fresh{k}"
            shutil.copytree(src, d)
            for f in d.iterdir():  # written, flushed, and dropped from the page cache
                fd = os.open(f, os.O_RDONLY)
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            _sync(args)
            t0 = time.perf_counter()
            weights = multi.prepare(AdapterWeights.from_dir(f"fresh{k}", d))  # the engine's read thread
            _sync(args)
            t1 = time.perf_counter()
            multi.load(1, weights)  # on the decode loop
            _sync(args)
            t2 = time.perf_counter()
            times.append((k % 2, t2 - t0, t2 - t1))

    def p50(kind, i):
        return statistics.median(t[i] for t in times if kind is None or t[0] == kind) * 1000

    return {
        "p50_ms": p50(None, 1),
        "lora_p50_ms": p50(0, 1),
        "dora_p50_ms": p50(1, 1),
        "lora_loop_p50_ms": p50(0, 2),
        "dora_loop_p50_ms": p50(1, 2),
    }


def side_itl(args, tok, dirs) -> dict:
    from serving.engine import Request

    engine = _engine(args, tok, lambda name: str(dirs[int(name)]))
    for i in range(4):
        engine.add_adapter(str(i))
    # when each token of each running row arrived (per token, not per streamed text event: the detokenizer
    # holds a token back while it is an incomplete character, which would read as a two-step gap)
    stamps: dict[int, list[float]] = {i: [] for i in range(4)}
    rows = [engine.submit(Request(_ids(tok, PROMPTS[i]), str(i), 1000, ignore_eos=True)) for i in range(4)]

    def step():
        seen = [len(r.out_ids) for r in rows]
        engine.step()
        now = time.perf_counter()
        for i, r in enumerate(rows):
            stamps[i] += [now] * (len(r.out_ids) - seen[i])

    long_ids = (_ids(tok, " ".join(PROMPTS)) * 64)[:1024]

    ttft = []

    def gaps(steps, arrivals: bool):
        """Step ``steps`` times; with arrivals, also until 3 long prompts have had their first token."""
        for s in stamps.values():
            s.clear()
        incoming, since, done = None, 0.0, 0
        while done < steps or (arrivals and len(ttft) < 3 and done < 2000):
            done += 1
            if arrivals and (incoming is None or incoming.out_ids):
                if incoming is not None:
                    ttft.append(time.perf_counter() - since)
                    engine.cancel(incoming)
                incoming = engine.submit(Request(long_ids, "4", max_tokens=2, ignore_eos=True))
                since = time.perf_counter()
            step()
        if incoming is not None:
            engine.cancel(incoming)
        return [b - a for s in stamps.values() for a, b in zip(s, s[1:])]

    engine.add_adapter("4")
    gaps(10, False)  # warm-up
    warm = engine.submit(Request(long_ids, "4", max_tokens=2, ignore_eos=True))  # the KV cache grows to its size
    while not warm.finish_reason:
        step()
    ttft.clear()
    steady = gaps(40, False)
    loaded = gaps(40, True)
    for r in rows:
        engine.cancel(r)
    p50 = statistics.median(steady)
    p99 = sorted(loaded)[int(0.99 * (len(loaded) - 1))]
    return {
        "steady_p50_ms": p50 * 1000,
        "loaded_p99_ms": p99 * 1000,
        "ratio": p99 / p50,
        "long_prompt_ttft_ms": statistics.median(ttft) * 1000 if ttft else None,
    }


def run_side(args) -> dict:
    import torch

    from pipelines.model import load_tokenizer

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.base_path)
    dirs = [Path(args.adapter_root) / f"adapter{i}" for i in range(8)]
    dirs += [Path(args.adapter_root) / f"dora{i}" for i in range(8)]
    side = args.side
    if side.startswith("engine_"):
        return side_engine(args, tok, dirs, 32 if side == "engine_mixed32" else 8, side != "engine_base")
    if side in ("hf_base", "peft_names", "peft_grouped32"):
        return side_hf(args, tok, dirs, {"hf_base": "base", "peft_names": "names", "peft_grouped32": "grouped32"}[side])
    if side.startswith("scale_"):
        return side_scale(args, tok, dirs, int(side.split("_")[1]))
    if side == "cold_load":
        return side_cold_load(args, tok, dirs)
    return side_itl(args, tok, dirs)


# --------------------------------------------------------------------------- the parent


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="smollm2-135m")
    p.add_argument(
        "--random-base", choices=list(SHAPES), metavar="SHAPE", help=f"instead of --base: {', '.join(SHAPES)}"
    )
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--gpu", action="store_true", help="bf16 on cuda:0")
    p.add_argument(
        "--prefill-chunk", type=int, default=256, help="the engine's prefill_chunk_tokens (the serving spec's default)"
    )
    p.add_argument(
        "--prefill-slowdown",
        type=float,
        default=1.8,
        help="the engine's prefill_slowdown (the serving spec's default); 0: off, every step prefills --prefill-chunk",
    )
    p.add_argument(
        "--compile-decode",
        action="store_true",
        help="the engine's decode-only steps through torch.compile (limits.compile_decode), compiled before timing",
    )
    p.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset")
    p.add_argument("--side", help=argparse.SUPPRESS)
    p.add_argument("--base-path", help=argparse.SUPPRESS)
    p.add_argument("--adapter-root", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.side:
        print(json.dumps(run_side(args)))
        return 0

    from pipelines.model import resolve_base
    from pipelines.spec import validate

    if args.random_base:
        from benchmarks.random_base import build

        base_path = build(args.random_base, "cuda:0" if args.gpu else "cpu")
        args.base = f"random {args.random_base}"
    else:
        base_path = resolve_base(validate({"model": {"base": args.base}}).model)
    sides = [s for s in args.sides.split(",") if s]
    unknown = set(sides) - set(SIDES)
    if unknown:
        p.error(f"unknown sides {sorted(unknown)}; choose from {SIDES}")
    results: dict[str, list[dict]] = {s: [] for s in sides}
    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing 16 adapters (rank {args.rank}) and 1,000 linked ones under {tmp}", file=sys.stderr)
        make_adapters(base_path, args.rank, Path(tmp))
        for rep in range(args.repeats):
            order = sides if rep % 2 == 0 else sides[::-1]  # alternate the order
            for side in order:
                cmd = [sys.executable, "-m", "benchmarks.serving", "--side", side, "--base-path", str(base_path)]
                cmd += ["--adapter-root", tmp, "--rank", str(args.rank), "--tokens", str(args.tokens)]
                cmd += ["--threads", str(args.threads), "--prefill-chunk", str(args.prefill_chunk)]
                cmd += ["--prefill-slowdown", str(args.prefill_slowdown)]
                cmd += ["--gpu"] if args.gpu else []
                cmd += ["--compile-decode"] if args.compile_decode else []
                t0 = time.perf_counter()
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.stderr.write(out.stderr[-4000:])
                    raise SystemExit(f"side {side} failed (exit {out.returncode})")
                results[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(
                    f"repeat {rep + 1}/{args.repeats} {side}: {results[side][-1]} ({time.perf_counter() - t0:.0f} s)",
                    file=sys.stderr,
                )

    def med(side, key="tok_s"):
        return statistics.median(r[key] for r in results[side]) if results.get(side) else None

    def ratio(a, b):
        return round(med(a) / med(b), 3) if med(a) and med(b) else None

    summary = {
        "mixed_over_engine_base": ratio("engine_mixed", "engine_base"),
        "mixed_over_hf_base": ratio("engine_mixed", "hf_base"),
        "mixed_over_peft": ratio("engine_mixed", "peft_names"),
        "mixed_over_grouped": ratio("engine_mixed32", "peft_grouped32"),
        "scale_1000_over_8": ratio("scale_1000", "scale_8"),
        "cold_load_p50_ms": round(med("cold_load", "p50_ms"), 2) if results.get("cold_load") else None,
        "itl_p99_over_p50_long_prompts": round(med("itl", "ratio"), 2) if results.get("itl") else None,
        # one decode-only step of engine_mixed: 8 rows, 8 adapters
        "decode_step_p50_ms": round(med("engine_mixed", "decode_step_p50_ms"), 3)
        if results.get("engine_mixed")
        else None,
    }
    print(
        f"{args.base} {'bf16 cuda' if args.gpu else f'fp32 CPU, {args.threads} threads'}: {args.tokens} greedy "
        f"tokens per request, rank-{args.rank} adapters on every linear layer, median (min–max) of {args.repeats} "
        "fresh-process runs, sides alternating"
    )
    rates = [side for side in sides if "tok_s" in results[side][0]]
    if rates:
        print("| side | tokens/s |")
        print("| --- | ---: |")
    for side in rates:
        print(f"| {side} | {_spread([r['tok_s'] for r in results[side]])} |")
    if results.get("cold_load"):
        for key in ("p50_ms", "lora_p50_ms", "dora_p50_ms", "lora_loop_p50_ms", "dora_loop_p50_ms"):
            print(f"cold load {key}: {_spread([r[key] for r in results['cold_load']])}")
    if results.get("itl"):
        for key in ("steady_p50_ms", "loaded_p99_ms", "ratio", "long_prompt_ttft_ms"):
            print(f"itl {key}: {_spread([r[key] for r in results['itl']])}")
    print(
        json.dumps(
            {
                **summary,
                "device": "cuda" if args.gpu else "cpu",
                "base": args.base,
                "compile_decode": args.compile_decode,
                "repeats": args.repeats,
                "gpu": args.gpu,
                "prefill_chunk": args.prefill_chunk,
                "prefill_slowdown": args.prefill_slowdown,
                "raw": results,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

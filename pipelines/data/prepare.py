"""Data preparation on Ray Data: tokenize once across the cluster, write memory-mappable shards, reuse them.

``prepare(spec)`` runs in the driver (``raypeft train``, the Tune driver, each trial) with Ray up:

1. The sources are cut into chunks: byte ranges of a JSONL file (no driver pass over the data),
   row groups of a Parquet file, row ranges of a ``save_to_disk`` directory, a JSON file whole.
2. ``map_batches`` runs one task per chunk on the cluster's CPUs (every node): it reads its records,
   formats and tokenizes them in batch, and writes the token ids as ``.npy`` shards under the cache.
   Each record's position (file and line, or row) travels with it, so bad data is named exactly.
3. The driver writes per-record lengths and offsets, then the *layout* of this run: the train/eval
   split, and best-fit-decreasing packing when ``data.packing``.

The shards are keyed by the dataset bytes' hash, the tokenizer's hash (chat template included), the
format, ``max_length`` and ``skip_invalid``; a layout adds the seed, the eval split, packing and the task
samples. A rerun, a resume, every Tune trial and every worker reuse them: a cache hit re-tokenizes
nothing. Workers open them with ``open_layout`` and memory-map: a worker's memory does not grow with the
dataset, and batches stay a pure function of ``(seed, step)`` through ``data.Sharder``.
"""

from __future__ import annotations

import array
import filecmp
import hashlib
import json
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.data import records as D

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import JobSpec

FORMAT_VERSION = 1
CHUNK_BYTES = 32 << 20  # a task's share of a large file
MIN_CHUNK_BYTES = 64 << 10  # below this, one task per file is cheaper than more
# local inputs of at most this size are tokenized in the driver: Ray Data's start (its executor, a task's
# worker, the tokenizer shipped to it) costs about 2 s, and a 64 KiB file tokenizes in well under that
LOCAL_MAX_BYTES = MIN_CHUNK_BYTES
MAX_ERRORS = 5  # bad records quoted in an error


# ---------------------------------------------------------------- chunks of a source


def _kind(path: str) -> str:
    bare = path.split("?", 1)[0]
    if bare.endswith(".jsonl"):
        return "jsonl"
    if bare.endswith(".parquet"):
        return "parquet"
    if "://" not in path and Path(path).is_dir():
        return "arrow"
    return "json"


def _size(path: str) -> int:
    if "://" in path:
        import fsspec

        fs, p = fsspec.core.url_to_fs(path)
        return int(fs.info(p)["size"])
    return os.path.getsize(path)


def _open(path: str, mode: str = "rb"):
    if "://" in path:
        import fsspec

        return fsspec.open(path, mode).open()
    return open(path, mode)


def plan_chunks(source: str, split: str, target_chunks: int, name: str | None = None) -> list[dict[str, Any]]:
    """The chunks one source is read in: ``target_chunks`` or more for a large file, never tiny ones.
    ``split`` is the role (``train``/``eval``), ``name`` the split read from a source that has named splits
    (``data.train_split``/``data.eval_split``): one it lacks is refused here, on the driver."""
    path = os.path.expanduser(D.resolve_source(source, split))
    kind = _kind(path)
    base = {"split": split, "name": name or split, "kind": kind, "path": path}
    if kind in ("arrow", "json"):
        D.check_split(source, base["name"], _field(split))
    if kind == "jsonl":
        size = _size(path)
        step = max(MIN_CHUNK_BYTES, min(CHUNK_BYTES, -(-size // max(1, target_chunks))))
        return [{**base, "start": s, "end": min(s + step, size), "first_row": 0} for s in range(0, max(size, 1), step)]
    if kind == "parquet":
        import pyarrow.parquet as pq

        with _open(path) as f:
            md = pq.ParquetFile(f).metadata
        rows = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        out, first = [], 0
        for i, n in enumerate(rows):
            out.append({**base, "start": i, "end": i + 1, "first_row": first})
            first += n
        return out
    if kind == "arrow":
        n = len(_load_arrow(path, base["name"], source, _field(split)))
        step = max(1, -(-n // max(1, target_chunks)))
        return [{**base, "start": s, "end": min(s + step, n), "first_row": s} for s in range(0, max(n, 1), step)]
    return [{**base, "start": 0, "end": 0, "first_row": 0}]


def _field(split: str) -> str:
    return "data.eval" if split == "eval" else "data.train"


def _load_arrow(path: str, name: str, source: str, field: str):
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(path)
    return D.pick_split(ds, name, source, field) if isinstance(ds, DatasetDict) else ds


def read_chunk(chunk: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for each record of a chunk, in order; ``record`` is a ``DataError`` for a line
    that is not a JSON object, and ``None`` for a blank line (counted, not a record). ``where`` is chunk-local (``line N`` / ``row N``, 1-based, counted from
    the chunk's start) except for whole-file kinds, where it is already global."""
    kind, path = chunk["kind"], chunk["path"]
    if kind == "jsonl":
        with _open(path, "rb") as f:
            start, end = chunk["start"], chunk["end"]
            if start > 0:  # the line that straddles the boundary belongs to the previous chunk
                f.seek(start - 1)
                f.readline()
            line_no = 0
            while f.tell() < end:
                raw = f.readline()
                if not raw:
                    break
                line_no += 1
                if not raw.strip():
                    yield f"line {line_no}", None  # counted for line numbers, not a record
                    continue
                try:
                    rec = json.loads(raw)
                except ValueError as e:
                    yield f"line {line_no}", D.DataError(f"not valid JSON ({e})")
                    continue
                if not isinstance(rec, dict):
                    yield f"line {line_no}", D.DataError(f"a record must be a JSON object (got {str(rec)[:80]})")
                    continue
                yield f"line {line_no}", rec
        return
    if kind == "parquet":
        import pyarrow.parquet as pq

        with _open(path) as f:
            rows = pq.ParquetFile(f).read_row_group(chunk["start"]).to_pylist()
        for i, rec in enumerate(rows):
            yield f"row {i + 1}", rec
        return
    if kind == "arrow":
        ds = _load_arrow(path, chunk["name"], path, _field(chunk["split"]))
        rows = ds.select(range(chunk["start"], chunk["end"])).to_list()
        for i, rec in enumerate(rows):
            yield f"row {i + 1}", rec
        return
    with _open(path, "rb") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except ValueError as e:
        where = f"line {e.lineno}" if hasattr(e, "lineno") else "line 1"
        yield where, D.DataError(f"not valid JSON ({e})")
        return
    if isinstance(data, dict):
        data = D.pick_split(data, chunk["name"], path, _field(chunk["split"]))  # plan_chunks checked it exists
    if not isinstance(data, list):
        yield "line 1", D.DataError("a .json dataset must be a list of records or a {split: [records]} mapping")
        return
    for i, rec in enumerate(data):
        yield (
            (f"record {i + 1}", rec)
            if isinstance(rec, dict)
            else (
                f"record {i + 1}",
                D.DataError(f"a record must be a JSON object (got {str(rec)[:80]})"),
            )
        )


def _global_where(chunk: dict[str, Any], where: str, lines_before: int) -> str:
    """A chunk-local position made global: ``path:line N`` or ``path row N``."""
    unit, n = where.split(" ")
    if chunk["kind"] == "jsonl":
        return f"{chunk['path']}:{int(n) + lines_before}"
    if unit == "line":
        return f"{chunk['path']}:{n}"
    offset = chunk["first_row"] if chunk["kind"] in ("parquet", "arrow") else 0
    return f"{chunk['path']} {unit} {int(n) + offset}"


# ---------------------------------------------------------------- the Ray Data task


@dataclass(frozen=True)
class _Job:
    """What every chunk task needs: how to format and where to write. ``tokenizer`` is the driver's own,
    the one the cache key hashed, pickled to the tasks: a task then imports no torch and loads no files,
    which is what HF ``datasets.map``'s forked workers get by inheriting theirs."""

    tokenizer: Any
    fmt: str
    max_length: int
    staging: str


def tokenize_chunk(chunk: dict[str, Any], job: _Job) -> dict[str, Any]:
    """Read, format and tokenize one chunk; write its shard; return its figures and bad records."""
    import numpy as np
    import ray

    t0 = time.perf_counter()
    tok = job.tokenizer
    lens: list[int] = []
    masked: list[int] = []
    ids = array.array("i")  # int32, compact: a chunk's tokens, back to back
    errors: list[tuple[str, str]] = []
    n_empty = n_lines = 0
    batch: list[dict] = []
    where_of: list[str] = []

    def flush() -> None:
        nonlocal n_empty
        try:
            encoded = D.encode_ids(batch, job.fmt, tok, job.max_length)
        except D.FormatError:  # find the records the format cannot read, one by one
            encoded = []
            for rec, where in zip(batch, where_of):
                try:
                    encoded += D.encode_ids([rec], job.fmt, tok, job.max_length)
                except D.FormatError as e:
                    errors.append((where, str(e)))
                    encoded.append(None)
        for enc in encoded:
            if enc is None or enc[1] == len(enc[0]):  # unreadable, or no completion token survived truncation
                n_empty += enc is not None
                lens.append(0)
                masked.append(0)
                continue
            lens.append(len(enc[0]))
            masked.append(enc[1])
            ids.extend(enc[0])
        batch.clear()
        where_of.clear()

    for where, rec in read_chunk(chunk):
        n_lines = max(n_lines, int(where.split(" ")[1]))
        if rec is None:
            continue
        if isinstance(rec, D.DataError):
            errors.append((where, str(rec)))
            lens.append(0)
            masked.append(0)
            continue
        batch.append(rec)
        where_of.append(where)
        if len(batch) >= 512:
            flush()
    flush()
    n_invalid = len(errors)
    name = f"{chunk['split']}-{chunk['chunk']:05d}"
    staging = Path(job.staging)
    flat = np.frombuffer(ids, dtype=np.int32)
    np.save(staging / f"{name}-ids.npy", flat)
    np.save(staging / f"{name}-lens.npy", np.asarray(lens, dtype=np.int32))
    np.save(staging / f"{name}-masked.npy", np.asarray(masked, dtype=np.int32))
    return {
        "chunk": chunk["chunk"],
        "records": len(lens),
        "tokens": int(flat.size),
        "lines": n_lines,
        "invalid": n_invalid,
        "empty": n_empty,
        "errors": json.dumps(errors[:MAX_ERRORS]),  # the count is "invalid"
        "node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local",
        "seconds": time.perf_counter() - t0,
        "bytes": chunk["end"] - chunk["start"] if chunk["kind"] == "jsonl" else 0,
    }


def _map_chunks(batch: dict[str, Any], job: _Job) -> dict[str, Any]:
    """``map_batches`` adapter: one chunk per batch (``batch_size=1``)."""
    import numpy as np

    chunk = {k: (v[0].item() if hasattr(v[0], "item") else v[0]) for k, v in batch.items()}
    out = tokenize_chunk(chunk, job)
    return {k: np.asarray([v]) for k, v in out.items()}


# ---------------------------------------------------------------- cache keys


def tokenizer_hash(tok) -> str:
    """sha256 of what decides token ids: the tokenizer's serialized state, chat template and special tokens."""
    h = hashlib.sha256(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: the files it was loaded from
        d = Path(getattr(tok, "name_or_path", ""))
        for f in sorted(d.glob("*token*")) if d.is_dir() else []:
            h.update(f.read_bytes())
    h.update(str(getattr(tok, "chat_template", None)).encode())
    h.update(json.dumps([tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]).encode())
    return h.hexdigest()


def _stamp(source: str, split: str) -> tuple[list[Path], str]:
    """A local source's files and what identifies their state: (path, size, mtime) of each."""
    p = Path(os.path.expanduser(D.resolve_source(source, split)))
    files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
    return files, json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def source_fingerprint(source: str | None, split: str, memo: Path | None = None) -> str:
    """sha256 of a source's bytes (files in name order), remembered by (path, size, mtime) in ``memo`` so
    that the next run, trial or resume does not read a large dataset again. URLs: ``data.url_fingerprint``."""
    if source is None:
        return "none"
    if "://" in source:
        return D.url_fingerprint(source)
    files, stamp = _stamp(source, split)
    known = json.loads(memo.read_text()) if memo and memo.is_file() else {}
    if stamp in known:
        return known[stamp]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    digest = "sha256:" + h.hexdigest()
    if memo:
        known[stamp] = digest
        _atomic_write(memo, json.dumps(known))
    return digest


def _same_records(train: str, evals: str, train_fp: str, eval_fp: str) -> bool:
    """Whether two local sources hold the same bytes: a file and its copy under another name (whose
    fingerprints differ by the name), or directories with the same fingerprint."""
    a, b = (Path(os.path.expanduser(x)) for x in (train, evals))
    if "://" in train or "://" in evals:
        return False
    if a.is_file() and b.is_file():
        return a.stat().st_size == b.stat().st_size and filecmp.cmp(a, b, shallow=False)
    return train_fp == eval_fp


def eval_source(spec: JobSpec) -> str | None:
    """The source of the eval split when it is not held out of ``data.train``."""
    d = spec.data
    return d.eval if d.eval is not None else (d.train if d.train.startswith("builtin:") else None)


def dataset_hash(spec: JobSpec) -> str:
    """The lineage tag of a job's data: sha256 over its sources' fingerprints (remembered, see above)."""
    memo = cache_root(spec) / "fingerprints.json"
    memo.parent.mkdir(parents=True, exist_ok=True)
    parts = [source_fingerprint(spec.data.train, "train", memo), source_fingerprint(eval_source(spec), "eval", memo)]
    return "sha256:" + hashlib.sha256(" ".join(parts).encode()).hexdigest()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------- prepare


@dataclass
class Prepared:
    """A prepared dataset and one run's layout of it. ``layout`` is what workers open."""

    shards: str
    layout: str
    cache_hit: bool
    stats: dict[str, float] = field(default_factory=dict)


def cache_root(spec: JobSpec) -> Path:
    """``<checkpoint.storage>/data-cache`` (storage every node sees, like the checkpoints), or under
    ``$RAYPEFT_HOME`` when the checkpoint storage is a URL (workers memory-map local files)."""
    from pipelines.spec import raypeft_home, storage_dir

    storage = storage_dir(spec)
    return Path(storage) / "data-cache" if "://" not in storage else raypeft_home() / "data-cache"


def prepare(spec: JobSpec, log=print, progress_every_s: float = 5.0, local_max_bytes: int | None = None) -> Prepared:
    """Tokenize ``spec.data`` once (a cache hit re-tokenizes nothing) and lay out this run. Ray must be up.
    Local sources of at most ``local_max_bytes`` in all (default ``LOCAL_MAX_BYTES``; -1: none) are tokenized
    in this process, larger ones and URLs on Ray Data. Bad data raises ``DataError`` naming the file and line
    (or row) before any training starts."""
    from pipelines.model import load_tokenizer, resolve_base

    t0 = time.perf_counter()
    root = cache_root(spec)
    root.mkdir(parents=True, exist_ok=True)
    d = spec.data
    memo = root / "fingerprints.json"
    evals = eval_source(spec)
    tok = load_tokenizer(resolve_base(spec.model, log), spec.model.revision)
    key_parts = {
        "version": FORMAT_VERSION,
        "train": source_fingerprint(d.train, "train", memo),
        "eval": source_fingerprint(evals, "eval", memo),
        "tokenizer": tokenizer_hash(tok),
        "format": d.format,
        "max_length": d.max_length,
        "skip_invalid": d.skip_invalid,
        "splits": [d.train_split, d.eval_split],
    }
    if evals is not None and evals == d.eval and _same_records(d.train, d.eval, key_parts["train"], key_parts["eval"]):
        if D.split_names(d.eval) is None or d.eval_split == d.train_split:  # a copy of the training records
            raise D.DataError(
                f"data.eval: {d.eval!r} holds the same records as data.train ({d.train!r}); evaluating on them "
                "would report training figures as eval figures: name another split (data.eval_split) or source, "
                "or leave data.eval unset to hold out data.eval_fraction"
            )
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:24]
    shards = root / key
    hit = (shards / "meta.json").is_file()
    if hit:
        log(f"[raypeft] data: cache hit {shards} (no tokenization)")
    else:
        limit = LOCAL_MAX_BYTES if local_max_bytes is None else local_max_bytes
        _tokenize(spec, tok, evals, shards, key_parts, log, progress_every_s, limit)
    meta = json.loads((shards / "meta.json").read_text())
    layout = _layout(spec, shards, meta, evals is not None, log)
    stats = {
        **{f"data_{k}": v for k, v in meta["stats"].items()},
        **{f"data_{k}": v for k, v in json.loads((layout / "layout.json").read_text())["stats"].items()},
        "data_cache_hit": float(hit),
        "data_prepare_s": time.perf_counter() - t0,
    }
    return Prepared(str(shards), str(layout), hit, stats)


def _tokenize(
    spec: JobSpec,
    tok,
    eval_source: str | None,
    out: Path,
    key_parts: dict,
    log,
    progress_every_s: float,
    local_max_bytes: int,
) -> None:
    import ray

    d = spec.data
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    chunks = plan_chunks(d.train, "train", 8 * cpus, d.train_split)
    if eval_source is not None:
        chunks += plan_chunks(eval_source, "eval", 8 * cpus, d.eval_split)
    for i, c in enumerate(chunks):
        c["chunk"] = i
    staging = out.parent / f".staging-{out.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    job = _Job(tok, d.format, d.max_length, str(staging))
    size = _input_bytes(chunks)
    if size is not None and size <= local_max_bytes:
        log(f"[raypeft] data: tokenizing {size:,} bytes in this process (under Ray Data's start-up cost) → {out}")
        rows: Iterator[dict[str, Any]] = (tokenize_chunk(c, job) for c in chunks)
    else:
        log(f"[raypeft] data: tokenizing {len(chunks)} chunk(s) on Ray Data ({cpus} CPU(s)) → {out}")
        rows = _on_ray_data(chunks, job)
    try:
        results, stats = _run_chunks(rows, chunks, d, log, progress_every_s)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds, records = stats["tokenize_s"], int(stats["records"])
    if stats["skipped_records"]:
        shown = _bad_records(chunks, results, d)
        log(f"[raypeft] data: skipped {int(stats['skipped_records'])} invalid record(s) (data.skip_invalid): {shown}")
    splits = _merge_splits(staging, chunks, results)
    meta = {"key": key_parts, "splits": splits, "stats": stats, "chunks": chunks, "created": time.time()}
    (staging / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(staging, out)  # atomic: a concurrent trial's identical result may have won
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    log(
        f"[raypeft] data: {records:,} records → {int(stats['tokens']):,} tokens in {seconds:.1f}s "
        f"({stats['records_per_s']:,.0f} records/s on {int(stats['nodes'])} node(s))"
    )


def _input_bytes(chunks: list[dict[str, Any]]) -> int | None:
    """The size of the chunks' sources on local disk (a directory's files summed; a ``file://`` URL is a local
    path too), or None when one is remote (any other URL)."""
    from urllib.parse import unquote, urlparse

    total = 0
    for path in {c["path"] for c in chunks}:
        if path.startswith("file://"):
            path = unquote(urlparse(path).path)
        elif "://" in path:
            return None
        p = Path(path)
        total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return total


def _on_ray_data(chunks: list[dict[str, Any]], job: _Job) -> Iterator[dict[str, Any]]:
    """One Ray Data task per chunk; its results as they arrive, in chunk order."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ds = ray.data.from_items(chunks, override_num_blocks=len(chunks)).map_batches(
        _map_chunks, batch_size=1, fn_kwargs={"job": job}, num_cpus=1
    )
    for row in ds.iter_rows():
        yield {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


def _run_chunks(
    rows: Iterator[dict[str, Any]], chunks: list[dict], d, log, progress_every_s: float
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Each chunk's result (``rows``), in chunk order, with progress every ``progress_every_s``; the run's
    stats. Invalid records end it (``DataError``) unless ``data.skip_invalid``."""
    total_bytes = sum(c["end"] - c["start"] for c in chunks if c["kind"] == "jsonl")
    t0 = last = time.perf_counter()
    results: list[dict[str, Any]] = []
    done_bytes = records = 0
    for r in rows:
        results.append(r)
        records += r["records"]
        done_bytes += r["bytes"]
        if r["invalid"] and not d.skip_invalid:
            raise _bad_records(chunks, results, d)
        now = time.perf_counter()
        if now - last >= progress_every_s:
            last = now
            rate = records / (now - t0)
            frac = done_bytes / total_bytes if total_bytes else len(results) / len(chunks)
            eta = (now - t0) * (1 - frac) / frac if frac > 0 else 0
            log(
                f"[raypeft] data: {len(results)}/{len(chunks)} chunks, {records:,} records, "
                f"{rate:,.0f} records/s, ETA {eta:.0f}s"
            )
    seconds = time.perf_counter() - t0
    results.sort(key=lambda r: r["chunk"])
    stats: dict[str, float] = {
        "records": float(records),
        "tokens": float(sum(r["tokens"] for r in results)),
        "skipped_records": float(sum(r["invalid"] for r in results)),
        "no_completion_records": float(sum(r["empty"] for r in results)),
        "tokenize_s": seconds,
        "records_per_s": records / max(seconds, 1e-9),
        "nodes": float(len({r["node"] for r in results})),
    }
    return results, stats


def _merge_splits(staging: Path, chunks: list[dict], results: list[dict]) -> dict[str, Any]:
    """Each split's per-chunk lengths and masks joined into one array each, with the offsets; its token shards
    stay one file per chunk."""
    import numpy as np

    splits: dict[str, Any] = {}
    for split in ("train", "eval"):
        mine = [r for r in results if chunks[r["chunk"]]["split"] == split]
        if not mine:
            continue
        names = [f"{split}-{r['chunk']:05d}" for r in mine]
        lens = np.concatenate([np.load(staging / f"{n}-lens.npy") for n in names])
        masked = np.concatenate([np.load(staging / f"{n}-masked.npy") for n in names])
        offsets = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        np.save(staging / f"{split}-lens.npy", lens)
        np.save(staging / f"{split}-masked.npy", masked)
        np.save(staging / f"{split}-offsets.npy", offsets)
        for n in names:
            (staging / f"{n}-lens.npy").unlink()
            (staging / f"{n}-masked.npy").unlink()
        splits[split] = {
            "shards": [f"{n}-ids.npy" for n in names],
            "shard_tokens": [r["tokens"] for r in mine],
            "records": int(len(lens)),
            "usable": int((lens > 0).sum()),
        }
    return splits


def _bad_records(chunks: list[dict], results: list[dict], d) -> D.DataError:
    """A ``DataError`` quoting the first bad records with global positions (chunks arrive in order)."""
    lines_before: dict[int, int] = {}
    running: dict[tuple[str, str], int] = {}
    for r in sorted(results, key=lambda r: r["chunk"]):
        c = chunks[r["chunk"]]
        lines_before[r["chunk"]] = running.get((c["split"], c["path"]), 0)
        running[(c["split"], c["path"])] = lines_before[r["chunk"]] + r["lines"]
    found, fields = [], []
    for r in sorted(results, key=lambda r: r["chunk"]):
        c = chunks[r["chunk"]]
        for where, msg in json.loads(r["errors"]):
            found.append(f"{_global_where(c, where, lines_before[r['chunk']])}: {msg}")
            fields.append("data.eval" if c["split"] == "eval" and d.eval is not None else "data.train")
    n = sum(r["invalid"] for r in results)
    field_name = fields[0] if fields else "data.train"
    more = f" (and {n - len(found[:MAX_ERRORS])} more)" if n > len(found[:MAX_ERRORS]) else ""
    hint = "" if d.skip_invalid else "; fix the data or set data.skip_invalid: true to skip such records"
    return D.DataError(f"{field_name}: bad record(s): " + "; ".join(found[:MAX_ERRORS]) + more + hint)


# ---------------------------------------------------------------- the run's layout


def _layout(spec: JobSpec, shards: Path, meta: dict, has_eval_source: bool, log) -> Path:
    """Split and pack for this run (cached by its own key under the shards)."""
    import numpy as np

    d = spec.data
    lkey = hashlib.sha256(
        json.dumps([spec.train.seed, d.eval_fraction, d.packing, d.task, d.eval_task_samples, has_eval_source]).encode()
    ).hexdigest()[:16]
    out = shards / f"layout-{lkey}"
    if (out / "layout.json").is_file():
        return out
    lens = np.load(shards / "train-lens.npy")
    n = len(lens)
    counts = meta["splits"]["train"]
    if has_eval_source:
        train_idx = np.arange(n)
        eval_lens = np.load(shards / "eval-lens.npy")
        eval_idx = np.flatnonzero(eval_lens > 0)
        eval_split = "eval"
    else:  # the split train_eval_records makes: the same records, so the gate sees the same eval set
        order = list(range(n))
        random.Random(spec.train.seed).shuffle(order)
        n_eval = max(1, int(n * d.eval_fraction)) if d.eval_fraction > 0 else 0
        is_eval = np.zeros(n, dtype=bool)
        is_eval[order[:n_eval]] = True
        train_idx = np.flatnonzero(~is_eval)
        eval_idx = np.flatnonzero(is_eval & (lens > 0))
        eval_split = "train"
    train_idx = train_idx[lens[train_idx] > 0]
    if len(train_idx) == 0:
        st = meta["stats"]
        raise D.DataError(
            f"data.train: no usable examples in {d.train!r}: {counts['records']} record(s) read, "
            f"{int(st['skipped_records'])} invalid, {int(st['no_completion_records'])} with no completion token "
            f"left after truncation to data.max_length {d.max_length}, "
            f"{counts['records'] - len(np.flatnonzero(lens > 0))} unusable in all"
        )
    stats: dict[str, float] = {"train_examples": float(len(train_idx)), "eval_examples": float(len(eval_idx))}
    if d.packing:
        bins = D.pack_bfd(lens[train_idx].tolist(), d.max_length)
        items = np.concatenate([train_idx[np.asarray(b)] for b in bins])
        ptr = np.zeros(len(bins) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in bins], out=ptr[1:])
        stats["row_fill"] = float(lens[train_idx].sum()) / (len(bins) * d.max_length)
        stats["train_rows"] = float(len(bins))
        log(
            f"[raypeft] data: packed {len(train_idx):,} examples into {len(bins):,} rows of ≤ {d.max_length} "
            f"tokens (best-fit decreasing, rows {stats['row_fill']:.1%} full); micro-batches are padding-free"
        )
    else:
        items, ptr = train_idx, None
        stats["train_rows"] = float(len(train_idx))
    task_records: list[dict] = []
    if d.task != "none" and len(eval_idx):
        wanted = eval_idx[: d.eval_task_samples or len(eval_idx)]
        task_records = _records_at(meta["chunks"], eval_split, wanted)
    staging = shards / f".staging-{out.name}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    np.save(staging / "train-items.npy", items.astype(np.int64))
    if ptr is not None:
        np.save(staging / "train-ptr.npy", ptr)
    np.save(staging / "eval-items.npy", eval_idx.astype(np.int64))
    (staging / "task_records.json").write_text(json.dumps(task_records))
    (staging / "layout.json").write_text(
        json.dumps({"eval_split": eval_split, "packed": d.packing, "stats": stats}, indent=1)
    )
    try:
        os.rename(staging, out)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _records_at(chunks: list[dict], split: str, wanted) -> list[dict]:
    """The raw records at sorted record indices ``wanted`` of a split (read from the start, stopping early)."""
    want = [int(i) for i in wanted]
    out: list[dict] = []
    i = 0
    for c in chunks:
        if c["split"] != split or len(out) == len(want):
            continue
        for _, rec in read_chunk(c):
            if rec is None:
                continue
            if len(out) < len(want) and i == want[len(out)]:
                out.append(rec)
            i += 1
    return out


# ---------------------------------------------------------------- workers: lazy, memory-mapped rows


class Rows:
    """Examples (or packed rows) of a prepared split, read from memory-mapped shards on access.

    ``rows[i]`` is a dict like ``data.encode``'s (``input_ids``, ``labels``; ``segments`` when packed)."""

    def __init__(self, shards: Path, split: str, items, ptr=None):
        import numpy as np

        meta = json.loads((shards / "meta.json").read_text())["splits"][split]
        self.lens = np.load(shards / f"{split}-lens.npy", mmap_mode="r")
        self.masked = np.load(shards / f"{split}-masked.npy", mmap_mode="r")
        self.offsets = np.load(shards / f"{split}-offsets.npy", mmap_mode="r")
        self.ids = [
            np.load(shards / f, mmap_mode="r") if t else np.zeros(0, np.int32)
            for f, t in zip(meta["shards"], meta["shard_tokens"])
        ]
        self.starts = np.concatenate([[0], np.cumsum(meta["shard_tokens"])]).astype(np.int64)
        self.items, self.ptr = items, ptr

    def __len__(self) -> int:
        return len(self.items) if self.ptr is None else len(self.ptr) - 1

    def _example(self, r: int) -> tuple[list[int], list[int]]:
        import numpy as np

        o, n, m = int(self.offsets[r]), int(self.lens[r]), int(self.masked[r])
        s = int(np.searchsorted(self.starts, o, side="right")) - 1
        ids = self.ids[s][o - self.starts[s] : o - self.starts[s] + n].tolist()
        return ids, [D.IGNORE] * m + ids[m:]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        if self.ptr is None:
            ids, labels = self._example(int(self.items[i]))
            return {"input_ids": ids, "labels": labels}
        row = {"input_ids": [], "labels": [], "segments": []}
        for r in self.items[int(self.ptr[i]) : int(self.ptr[i + 1])]:
            ids, labels = self._example(int(r))
            row["input_ids"] += ids
            row["labels"] += labels
            row["segments"].append(len(ids))
        return row


def open_layout(layout: str | os.PathLike) -> tuple[Rows, Rows, list[dict], dict[str, Any]]:
    """(train rows, eval examples, raw eval records for the task metric, layout info) of a prepared run."""
    import numpy as np

    out = Path(layout)
    info = json.loads((out / "layout.json").read_text())
    ptr = np.load(out / "train-ptr.npy", mmap_mode="r") if info["packed"] else None
    train = Rows(out.parent, "train", np.load(out / "train-items.npy", mmap_mode="r"), ptr)
    evals = Rows(out.parent, info["eval_split"], np.load(out / "eval-items.npy", mmap_mode="r"))
    return train, evals, json.loads((out / "task_records.json").read_text()), info

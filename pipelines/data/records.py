"""Data: load records, format them into token ids + labels, pack, and shard deterministically.

Formats:
  * ``text``: the record's ``text``; loss on every token.
  * ``instruction``: alpaca ``instruction`` / ``input`` / ``output``; loss on ``output`` only.
  * ``chat``: ``messages`` rendered with the tokenizer's chat template; loss on the
    final assistant turn only.

Batches are a pure function of ``(seed, global micro-step)``: global micro-step
``k`` covers positions ``[k*G, (k+1)*G)`` of an endless stream of per-epoch
permutations, where ``G = micro_batch_size × num_workers``, and rank ``r`` takes
its own slice. Resuming at step ``s`` therefore needs only ``s``: no sampler
state to save, and the global batch is what the spec says for any worker count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.spec import UserError

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.spec import DataSpec

IGNORE = -100
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


# ---------------------------------------------------------------- loading


def resolve_source(source: str, split: str = "train") -> str:
    if source.startswith("builtin:"):
        from pipelines.datasets import builtin_path

        return str(builtin_path(source.split(":", 1)[1], split))
    return source


def split_names(source: str) -> list[str] | None:
    """The named splits of a local source: a ``save_to_disk`` DatasetDict directory (from its
    ``dataset_dict.json``) or a ``{split: [records]}`` JSON file; None for a source of plain records (a list
    JSON, JSONL, Parquet, a single saved Dataset), a ``builtin:`` one or a URL."""
    if source.startswith("builtin:") or "://" in source:
        return None
    p = Path(os.path.expanduser(source))
    if p.is_dir():
        marker = p / "dataset_dict.json"
        return list(json.loads(marker.read_text())["splits"]) if marker.is_file() else None
    if p.suffix == ".json" and p.is_file():
        with open(p) as f:
            data = json.load(f)
        return list(data) if isinstance(data, dict) else None
    return None


def pick_split(splits, name: str, source: str, field: str):
    """The one rule for a source with named splits, for the trainer and the gate alike: the split named by
    ``data.train_split`` / ``data.eval_split``, or a ``DataError`` naming the splits there are. Never a
    fallback to another split: that would evaluate on training data without anyone asking for it."""
    if name in splits:
        return splits[name]
    setting = "data.eval_split" if field == "data.eval" else "data.train_split"
    raise DataError(
        f"{setting}: {field} {source!r} has no split of this name; its splits are {sorted(splits)}: name the one "
        f"to use, e.g. {setting}={sorted(splits)[0]} (got {name!r})"
    )


def check_split(source: str, name: str, field: str) -> None:
    """``pick_split``'s rule applied to a source's split names alone (no records read): a ``DataError`` when
    ``source`` has named splits and none is ``name``."""
    names = split_names(source)
    if names is not None:
        pick_split(dict.fromkeys(names), name, source, field)


def eval_is_train_problem(data: DataSpec) -> str | None:
    """``data.eval`` naming the very records ``data.train`` trains on (the same source and split, or the same
    file of plain records): the job would report eval figures on its training data."""
    if data.eval is None or "://" in data.eval or data.eval.startswith("builtin:"):
        return None
    same = Path(os.path.expanduser(data.eval)).resolve() == Path(os.path.expanduser(data.train)).resolve()
    if same and (split_names(data.eval) is None or data.eval_split == data.train_split):
        where = f"split {data.eval_split!r} of " if split_names(data.eval) is not None else ""
        return (
            f"evaluates on {where}the records data.train trains on: name another split (data.eval_split) or "
            f"source, or leave data.eval unset to hold out data.eval_fraction (got {data.eval!r})"
        )
    return None


def load_records(source: str, split: str = "train", field: str = "data.train") -> list[dict[str, Any]]:
    """Read a .jsonl/.json/.parquet file, a ``save_to_disk`` directory, or a ``builtin:`` dataset. ``split``
    names the split of a source that has them (``pick_split``); a builtin's file is chosen by ``field``."""
    path = os.path.expanduser(resolve_source(source, "eval" if field == "data.eval" else "train"))
    if "://" in path:
        import fsspec

        if path.split("?", 1)[0].endswith(".parquet"):
            import pyarrow.parquet as pq

            with fsspec.open(path, "rb") as f:
                return pq.read_table(f).to_pylist()
        with fsspec.open(path, "rt") as f:
            data = [json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl") else json.load(f)
        return data if isinstance(data, list) else pick_split(data, split, source, field)
    p = Path(path)
    if p.is_dir():
        from datasets import DatasetDict, load_from_disk

        ds = load_from_disk(str(p))
        if isinstance(ds, DatasetDict):
            ds = pick_split(ds, split, source, field)
        return ds.to_list()
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(p).to_pylist()
    if p.suffix == ".jsonl":
        with open(p) as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(p) as f:
        data = json.load(f)
    return data if isinstance(data, list) else pick_split(data, split, source, field)


SMALL_URL_BYTES = 64 << 20


def url_fingerprint(url: str) -> str:
    """A remote source's identity through fsspec: the content hash of a small file (≤ 64 MiB); for a large
    one its size plus the ETag and modification time the store reports, so no large download happens."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    info = fs.info(path)
    if info.get("size") is not None and info["size"] <= SMALL_URL_BYTES:
        with fs.open(path, "rb") as f:
            return f"{url} sha256:{hashlib.sha256(f.read()).hexdigest()}"
    stamp = {
        k: str(info.get(k)) for k in ("size", "ETag", "etag", "mtime", "LastModified", "last_modified") if info.get(k)
    }
    return f"{url} {json.dumps(stamp, sort_keys=True)}"


def train_eval_records(data: DataSpec, seed: int) -> tuple[list[dict], list[dict]]:
    problem = eval_is_train_problem(data)
    if problem:
        raise DataError(f"data.eval: {problem}")
    train = load_records(data.train, data.train_split, "data.train")
    if data.eval is not None:
        return train, load_records(data.eval, data.eval_split, "data.eval")
    if data.train.startswith("builtin:"):
        return train, load_records(data.train, data.eval_split, "data.eval")
    rng = random.Random(seed)
    idx = list(range(len(train)))
    rng.shuffle(idx)
    n_eval = max(1, int(len(train) * data.eval_fraction)) if data.eval_fraction > 0 else 0
    eval_idx = set(idx[:n_eval])
    return [r for i, r in enumerate(train) if i not in eval_idx], [r for i, r in enumerate(train) if i in eval_idx]


# ---------------------------------------------------------------- formatting


class FormatError(ValueError):
    pass


class DataError(UserError):
    """Bad training data (a malformed line, a missing field, nothing usable): exit code 2, before training."""


def prompt_and_completion(record: dict[str, Any], fmt: str, tokenizer) -> tuple[str, str]:
    """Split a record into (prompt text, completion text). ``text`` has an empty prompt."""
    try:
        if fmt == "text":
            return "", record["text"]
        if fmt == "instruction":
            tmpl = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
            return tmpl.format(instruction=record["instruction"], input=record.get("input", "")), record["output"]
        messages = record["messages"]
    except KeyError as e:
        raise FormatError(
            f"record has no {e.args[0]!r} field needed by data.format {fmt!r}: {str(record)[:120]}"
        ) from None
    if not messages or messages[-1].get("role") != "assistant":
        raise FormatError(f"chat record must end with an assistant message: {str(record)[:120]}")
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to the raw content
        return prompt, messages[-1]["content"] + (tokenizer.eos_token or "")
    return prompt, full[len(prompt) :]


def reference_of(record: dict[str, Any], fmt: str) -> str:
    """The gold completion, as plain text, for task metrics."""
    if fmt == "instruction":
        return record["output"]
    if fmt == "chat":
        return record["messages"][-1]["content"]
    return record["text"]


def task_prompts(records: list[dict[str, Any]], fmt: str, n: int, tokenizer) -> tuple[list[str], list[str]]:
    """The prompts and reference completions of the first ``n`` records (all of them for 0), for a task's
    score by generation."""
    subset = records[: n or len(records)]
    return [prompt_and_completion(r, fmt, tokenizer)[0] for r in subset], [reference_of(r, fmt) for r in subset]


def encode(record: dict[str, Any], fmt: str, tokenizer, max_length: int) -> dict[str, list[int]]:
    """Token ids and labels; prompt tokens are masked with -100 for instruction/chat."""
    prompt, completion = prompt_and_completion(record, fmt, tokenizer)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if fmt != "chat" and tokenizer.eos_token_id is not None:
        c_ids = c_ids + [tokenizer.eos_token_id]
    if fmt == "text" and tokenizer.bos_token_id is not None:
        p_ids = [tokenizer.bos_token_id]
    ids = (p_ids + c_ids)[:max_length]
    labels = ([IGNORE] * len(p_ids) + c_ids)[:max_length]
    if fmt == "text" and p_ids:
        labels[0] = IGNORE
    return {"input_ids": ids, "labels": labels}


def pack(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[int]]]:
    """Whole examples packed into rows of at most ``max_length`` (``pack_bfd``), each row with the lengths
    of its examples as ``segments`` (what ``collate`` turns into per-example positions)."""
    rows = []
    for b in pack_bfd([len(e["input_ids"]) for e in examples], max_length):
        rows.append(
            {
                "input_ids": [t for i in b for t in examples[i]["input_ids"]],
                "labels": [t for i in b for t in examples[i]["labels"]],
                "segments": [len(examples[i]["input_ids"]) for i in b],
            }
        )
    return rows


def prompts_and_completions(records: list[dict[str, Any]], fmt: str, tokenizer) -> list[tuple[str, str]]:
    """``prompt_and_completion`` of many records; chat templates are rendered in two batched calls."""
    if fmt != "chat" or len(records) < 2:
        return [prompt_and_completion(r, fmt, tokenizer) for r in records]
    conversations = []
    for record in records:
        messages = record.get("messages") if isinstance(record, dict) else None
        if (
            not messages
            or not isinstance(messages, list)
            or not isinstance(messages[-1], dict)
            or (messages[-1].get("role") != "assistant")
        ):
            return [prompt_and_completion(r, fmt, tokenizer) for r in records]  # names the bad record
        conversations.append(messages)
    prompts = tokenizer.apply_chat_template([m[:-1] for m in conversations], add_generation_prompt=True, tokenize=False)
    fulls = tokenizer.apply_chat_template(conversations, tokenize=False)
    out = []
    for messages, prompt, full in zip(conversations, prompts, fulls):
        if full.startswith(prompt):
            out.append((prompt, full[len(prompt) :]))
        else:  # the same fallback as prompt_and_completion
            out.append((prompt, messages[-1]["content"] + (tokenizer.eos_token or "")))
    return out


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` without special tokens; a fast tokenizer's Rust batch path, skipping the
    per-encoding Python conversion ``tokenizer(texts)`` does (half its time on short texts)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "split_special_tokens", False):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def encode_batch(records: list[dict[str, Any]], fmt: str, tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    """``encode`` of many records with one batched tokenizer call per side (the fast tokenizer's batch path).
    Equal to ``[encode(r, ...) for r in records]``; a record the format cannot read raises ``FormatError``."""
    return [
        {"input_ids": ids, "labels": [IGNORE] * masked + ids[masked:]}
        for ids, masked in encode_ids(records, fmt, tokenizer, max_length)
    ]


def encode_ids(records: list[dict[str, Any]], fmt: str, tokenizer, max_length: int) -> list[tuple[list[int], int]]:
    """``encode_batch`` without building the labels: ``(input_ids, masked)`` per record, where the labels
    are ``masked`` ignored positions followed by the ids (what preparation stores)."""
    pairs = prompts_and_completions(records, fmt, tokenizer)
    if not pairs:
        return []
    prompts = token_ids(tokenizer, [p for p, _ in pairs])
    completions = token_ids(tokenizer, [c for _, c in pairs])
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    tail = [eos] if fmt != "chat" and eos is not None else []
    out = []
    for (prompt, _), p_ids, c_ids in zip(pairs, prompts, completions):
        if fmt == "text" and bos is not None:
            p_ids = [bos]
        elif not prompt:
            p_ids = []
        ids = (list(p_ids) + list(c_ids) + tail)[:max_length]
        out.append((ids, min(len(p_ids), len(ids))))  # the prompt (or BOS) is never a label
    return out


def pack_bfd(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit-decreasing packing (TRL's default): indices of ``lengths`` grouped into bins of at most
    ``max_length`` tokens, each item placed in the fullest bin it fits. Deterministic: ties keep index order.
    Pure; O(n · max_length / 64) worst case through a bitmap of the free capacities that have open bins."""
    import numpy as np

    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    by_free: list[list[int]] = [[] for _ in range(max_length + 1)]  # free capacity -> open bins (LIFO)
    has = np.zeros(max_length + 1, dtype=bool)
    for i in order:
        n = lengths[i]
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length {max_length}")
        hits = np.flatnonzero(has[n:])
        if hits.size:  # the bin with the least free space that still fits
            free = n + int(hits[0])
            b = by_free[free].pop()
            has[free] = bool(by_free[free])
        else:
            free, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        left = free - n
        if left > 0:
            by_free[left].append(b)
            has[left] = True
    return bins


def encode_all(records: Iterable[dict], data: DataSpec, tokenizer, packing: bool | None = None) -> list[dict]:
    out = [encode(r, data.format, tokenizer, data.max_length) for r in records]
    out = [e for e in out if any(label != IGNORE for label in e["labels"])]
    return pack(out, data.max_length) if (data.packing if packing is None else packing) else out


def shared_prefix(examples: list[tuple[list[int], list[int]]]) -> int:
    """How many leading tokens every ``(input_ids, labels)`` example shares *before its first counted label*
    (0 for fewer than two examples). Each keeps at least one token of its own, and the token after the
    prefix carries no label: in a shared-prefix row it no longer follows the prefix's last token."""
    if len(examples) < 2:
        return 0
    limit = min(len(ids) for ids, _ in examples) - 1
    for _, labels in examples:
        first = next((t for t in range(1, len(labels)) if labels[t] != IGNORE), len(labels))
        limit = min(limit, first - 1)
    first_ids = examples[0][0]
    n = 0
    while n < limit and all(ids[n] == first_ids[n] for ids, _ in examples[1:]):
        n += 1
    return n


def collate(examples: list[dict[str, list[int]]], pad_id: int, padding_free: bool = False, share_prefix: bool = False):
    """Tensors for the model.

    - Unpacked examples: right-padded rows with an ``attention_mask``.
    - Packed rows (with ``segments``, the lengths of the examples in each row), and any examples with
      ``padding_free``: **padding-free**, one row of every example's tokens back to back, ``position_ids``
      restarting at 0 at each example, no pad token and no ``attention_mask``. ``attention.VARLEN`` then
      attends within each example only (one SDPA call each); transformers' other implementations build a
      block-diagonal mask from the positions, or take flash-attention's varlen path. An example's first
      token gets no label, so no example learns to predict its neighbour's first token.
    - ``share_prefix`` too (``attention.VARLEN`` only): the leading tokens all the examples share before
      any label (``shared_prefix``: a chat template's system prompt, a task's instruction) appear once, at
      the row's start; each example follows with only the rest of its tokens, its ``position_ids``
      continuing from the prefix's length, and attends to the prefix and to itself. A causal model's
      prefix states do not depend on what follows them, so the loss and the gradient are those of the
      examples run one by one, with the prefix's compute spent once per micro-batch.
    """
    import torch

    if padding_free or share_prefix or any("segments" in e for e in examples):
        parts = []  # every example, unpacking packed rows: (input_ids, labels)
        for e in examples:
            start = 0
            for length in e.get("segments", [len(e["input_ids"])]):
                parts.append((e["input_ids"][start : start + length], e["labels"][start : start + length]))
                start += length
        p = shared_prefix(parts) if share_prefix else 0
        ids, labels, pos = list(parts[0][0][:p]), [IGNORE] * p, list(range(p))
        for example_ids, example_labels in parts:
            ids += example_ids[p:]
            labels += [IGNORE, *example_labels[p + 1 :]]
            pos += range(p, len(example_ids))
        as_row = lambda xs: torch.tensor([xs], dtype=torch.long)  # noqa: E731
        return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(pos)}
    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# ---------------------------------------------------------------- sharding


@dataclass(frozen=True)
class Sharder:
    """Deterministic, resumable global batching (see module docstring)."""

    n: int
    micro_batch_size: int
    world_size: int
    rank: int
    seed: int

    def _order(self, epoch: int) -> list[int]:
        return _permutation(self.n, self.seed, epoch)

    def indices(self, micro_step: int) -> list[int]:
        """Example indices this rank processes at global micro-step ``micro_step``."""
        g = self.micro_batch_size * self.world_size
        start = micro_step * g + self.rank * self.micro_batch_size
        out = []
        for pos in range(start, start + self.micro_batch_size):
            epoch, i = divmod(pos, self.n)
            out.append(self._order(epoch)[i])
        return out

    def epoch_of(self, micro_step: int) -> float:
        return micro_step * self.micro_batch_size * self.world_size / self.n


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    idx = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(idx)
    return idx


def eval_shard(n: int, rank: int, world_size: int) -> range:
    return range(rank, n, world_size)


def eval_batches(
    examples: list[dict], batch_size: int, pad_id: int, rank: int = 0, world: int = 1, lockstep: bool = False
):
    """This rank's eval batches (``collate``'s padded rows, on the CPU), each with its weight: 1, or 0 for a
    batch run only to keep pace. ``lockstep``: every rank runs as many batches as the largest shard has
    (ZeRO-3 gathers weights collectively in each forward); a rank whose shard ran out repeats one example."""
    shard = [examples[i] for i in eval_shard(len(examples), rank, world)]
    largest = -(-len(examples) // world) if lockstep else len(shard)
    for b in range(-(-largest // batch_size)):
        rows = shard[b * batch_size : (b + 1) * batch_size]
        yield collate(rows or examples[:1], pad_id), (1.0 if rows else 0.0)

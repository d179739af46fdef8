"""Preparation's pure parts: chunked reading, batched encoding, best-fit-decreasing packing, packed rows
that never attend across examples, and the memory-mapped rows workers read (no Ray here)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from pipelines import data as D
from pipelines.data import prepare as P
from pipelines.train.attention import model_inputs


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from pipelines.model import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def _chat(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"{i}+{i}=" * (1 + i % 5)},
            {"role": "assistant", "content": str(2 * i)},
        ]
    }


@pytest.mark.parametrize("url", [False, True], ids=["path", "file-url"])
def test_jsonl_chunks_read_every_line_once_with_global_line_numbers(tmp_path, monkeypatch, url):
    lines = [json.dumps(_chat(i)) if i % 7 else "" for i in range(200)]  # blank lines count, are not records
    lines[123] = "{not json"
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(P, "MIN_CHUNK_BYTES", 1)
    source = f"file://{path}" if url else str(path)  # URLs read their byte ranges through fsspec
    chunks = P.plan_chunks(source, "train", 9)
    assert len(chunks) == 9 and chunks[0]["start"] == 0 and chunks[-1]["end"] == path.stat().st_size
    seen, before, bad = [], 0, []
    for c in chunks:
        n = 0
        for where, rec in P.read_chunk(c):
            n = int(where.split()[1])
            if isinstance(rec, D.DataError):
                bad.append(P._global_where(c, where, before))
            elif rec is not None:
                seen.append(rec)
        before += n
    assert seen == [json.loads(x) for i, x in enumerate(lines) if x and i != 123]
    assert bad == [f"{source}:124"]  # 1-based line of the malformed one


def test_encode_batch_equals_encode(tok):
    recs = [_chat(i) for i in range(20)]
    for fmt, rows in (("chat", recs), ("text", [{"text": f"row {i} " * i} for i in range(9)])):
        assert D.encode_batch(rows, fmt, tok, 24) == [D.encode(r, fmt, tok, 24) for r in rows]


def test_best_fit_decreasing_is_tight_and_loses_nothing():
    r = random.Random(0)
    lengths = [r.randint(10, 200) for _ in range(2000)]
    bins = D.pack_bfd(lengths, 512)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)
    efficiency = sum(lengths) / (512 * len(bins))
    assert efficiency > 0.98, efficiency
    with pytest.raises(ValueError, match="more than max_length"):
        D.pack_bfd([513], 512)


@pytest.mark.parametrize("impl", ["sdpa", "varlen"])
def test_packed_examples_do_not_see_each_other(tiny_model_dir, tok, impl):
    """A padding-free micro-batch of two packed rows: each example's per-token losses equal the example run
    alone (1e-5), through transformers' block-diagonal SDPA mask and through raypeft's per-example SDPA."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.train import attention

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    if impl == "varlen":
        assert attention.enable(model)
    exs = [D.encode(_chat(i), "chat", tok, 64) for i in (3, 11, 24, 7, 30)]
    rows = D.pack(exs, 96)
    assert len(rows) >= 2
    order = [i for b in D.pack_bfd([len(e["input_ids"]) for e in exs], 96) for i in b]
    exs = [exs[i] for i in order]  # the rows' order: longest first
    batch = model_inputs(D.collate(rows, tok.pad_token_id), "cpu")
    n_tokens = sum(len(e["input_ids"]) for e in exs)
    assert batch["input_ids"].shape == (1, n_tokens)  # padding-free: not one pad token
    assert "attention_mask" not in batch
    first = rows[0]["segments"][0]
    assert batch["position_ids"][0].tolist()[: first + 2] == [*range(first), 0, 1]

    def token_losses(logits, labels):
        return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], reduction="none", ignore_index=-100)

    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        start = 0
        for e in exs:
            n = len(e["input_ids"])
            alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
            labels = torch.tensor(e["labels"])
            torch.testing.assert_close(
                token_losses(packed[start : start + n], labels), token_losses(alone, labels), rtol=1e-5, atol=1e-5
            )
            assert batch["labels"][0, start] == D.IGNORE  # no example predicts its neighbour's first token
            start += n
        # without the per-example positions the same row does mix examples: the check above can fail
        mixed = model(input_ids=batch["input_ids"]).logits[0]
        n0, n1 = len(exs[0]["input_ids"]), len(exs[1]["input_ids"])
        lab = torch.tensor(exs[1]["labels"])
        assert not torch.allclose(
            token_losses(mixed[n0 : n0 + n1], lab),
            token_losses(model(input_ids=torch.tensor([exs[1]["input_ids"]])).logits[0], lab),
            atol=1e-4,
        )


def test_varlen_bounds_follow_each_new_batch_even_at_a_reused_address():
    """The per-forward cache of segment bounds is keyed by the tensor itself: the next batch's position ids,
    at the address where the last one's were and with the same length, get their own bounds. (Two tensors
    over one buffer stand in for the allocator reusing freed memory.)"""
    import torch

    from pipelines.train import attention

    buf = bytearray(8 * 5)
    for lengths in ([3, 2], [2, 3], [1, 4], [5]):
        torch.frombuffer(buf, dtype=torch.int64).copy_(torch.tensor([p for n in lengths for p in range(n)]))
        pos = torch.frombuffer(buf, dtype=torch.int64).view(1, 5)  # a new tensor, same address, version 0
        starts = [sum(lengths[:k]) for k in range(len(lengths))]
        assert attention._segments_of(pos) == [(s, s + n, 0) for s, n in zip(starts, lengths)]


def test_varlen_attention_never_attends_beyond_one_example(tiny_model_dir, tok):
    """raypeft's padding-free attention calls SDPA once per example, on that example's tokens only, and
    gives the same loss and gradients as the block-diagonal mask over the whole row (1e-5)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from transformers import AutoModelForCausalLM

    from pipelines.train import attention

    exs = [D.encode(_chat(i), "chat", tok, 64) for i in (3, 11, 24, 7, 30)]
    batch = D.collate(D.pack(exs, 96), tok.pad_token_id)
    longest = max(len(e["input_ids"]) for e in exs)

    class Lengths(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "scaled_dot_product" in func.__name__ and "backward" not in func.__name__:
                self.seen.append(args[0].shape[-2])
            return func(*args, **(kwargs or {}))

    grads, losses, seen = {}, {}, {}
    for impl in ("sdpa", "varlen"):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        if impl == "varlen":
            assert attention.enable(model)
        with Lengths() as mode:
            out = model(**model_inputs(batch, "cpu"))
            out.loss.backward()
        seen[impl] = mode.seen
        losses[impl] = out.loss.detach()
        grads[impl] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert seen["varlen"] and max(seen["varlen"]) == longest  # one example at a time
    assert min(seen["sdpa"]) == batch["input_ids"].shape[1]  # the stock path attends over the whole row
    torch.testing.assert_close(losses["varlen"], losses["sdpa"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["varlen"], grads["sdpa"], rtol=1e-5, atol=1e-5)


def test_padding_free_unpacked_batch_equals_the_padded_batch(tiny_model_dir, tok):
    """Unpacked examples collated padding-free (one row, no pad) give the padded batch's loss and gradients
    (1e-5), with fewer token slots; and a model switched to per-example SDPA still generates exactly what
    stock SDPA generates on a left-padded batch (evaluation's path, with a KV cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.train import attention, label_tokens

    exs = [D.encode(_chat(i), "chat", tok, 64) for i in (3, 11, 24, 7)]
    padded, flat = D.collate(exs, tok.pad_token_id), D.collate(exs, tok.pad_token_id, padding_free=True)
    n_tokens = sum(len(e["input_ids"]) for e in exs)
    assert flat["input_ids"].shape == (1, n_tokens) and n_tokens < padded["input_ids"].numel()
    assert label_tokens(flat["labels"]) == label_tokens(padded["labels"])
    out = {}
    for name, batch in (("padded", padded), ("flat", flat)):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        if name == "flat":
            assert attention.enable(model)
        loss = model(**model_inputs(batch, "cpu")).loss
        loss.backward()
        out[name] = (loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(out["flat"][0], out["padded"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["flat"][1], out["padded"][1], rtol=1e-5, atol=1e-5)

    side, tok.padding_side = tok.padding_side, "left"
    prompts = tok(["1+1=", "12+12=12+12=12+12="], return_tensors="pt", padding=True)
    tok.padding_side = side
    stock = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    varlen = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    assert attention.enable(varlen)
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": tok.pad_token_id}
    assert varlen.generate(**prompts, **kw).tolist() == stock.generate(**prompts, **kw).tolist()


def _instructed(i: int) -> dict:
    """A chat example whose system prompt and opening words every example shares (a task's instruction)."""
    chat = _chat(i)
    chat["messages"][0]["content"] = "Add the numbers: " + chat["messages"][0]["content"]
    return {"messages": [{"role": "system", "content": "You add numbers."}, *chat["messages"]]}


def test_shared_prefix_stops_before_the_first_label_and_leaves_every_example_a_token():
    ex = lambda ids, first: (ids, [D.IGNORE] * first + ids[first:])  # noqa: E731
    assert D.shared_prefix([ex([1, 2, 3, 4, 5], 4), ex([1, 2, 3, 9, 9], 4)]) == 3  # ids part at index 3
    assert D.shared_prefix([ex([1, 2, 3, 4, 5], 2), ex([1, 2, 3, 4, 6], 4)]) == 1  # the token after carries no label
    assert D.shared_prefix([ex([1, 2, 3], 3), ex([1, 2, 3, 4], 4)]) == 2  # the shorter keeps one token
    assert D.shared_prefix([ex([1, 2, 3], 2)]) == 0  # one example: nothing to share
    assert D.shared_prefix([ex([7, 2, 3], 2), ex([1, 2, 3], 2)]) == 0


@pytest.mark.parametrize("packed", [False, True], ids=["examples", "packed-rows"])
def test_shared_prefix_row_gives_the_padded_batch_loss_and_gradients(tiny_model_dir, tok, packed):
    """The examples' common prompt computed once at the row's start (``share_prefix``): the loss and every
    gradient equal the padded batch's (1e-5), with (n - 1) × prefix fewer token slots. Without the prefix
    attention the same row's loss differs, so the check can fail."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.train import attention, label_tokens

    exs = [D.encode(_instructed(i), "chat", tok, 96) for i in (3, 11, 24, 7, 30)]
    p = D.shared_prefix([(e["input_ids"], e["labels"]) for e in exs])
    assert p >= 8, p  # the system prompt and the instruction's first words
    rows = D.pack(exs, 128) if packed else exs
    shared = D.collate(rows, tok.pad_token_id, padding_free=True, share_prefix=True)
    padded = D.collate(exs, tok.pad_token_id)
    n_tokens = sum(len(e["input_ids"]) for e in exs)
    assert shared["input_ids"].shape == (1, n_tokens - (len(exs) - 1) * p)
    assert label_tokens(shared["labels"]) == label_tokens(padded["labels"])
    starts = [s for s, _, q in attention.segments(shared["position_ids"][0].tolist()) if q == p]
    assert len(starts) == len(exs) - 1  # every example but the first continues the prefix

    def run(batch, varlen: bool):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
        if varlen:
            assert attention.enable(model)
        loss = model(**model_inputs(batch, "cpu")).loss
        loss.backward()
        return loss.detach(), torch.cat([w.grad.flatten() for w in model.parameters() if w.grad is not None])

    loss, grads = run(shared, True)
    want_loss, want_grads = run(padded, False)
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads, want_grads, rtol=1e-5, atol=1e-5)
    # the same row through transformers' block-diagonal mask: the later examples lose the prefix
    assert not torch.allclose(run(shared, False)[0], want_loss, atol=1e-4)


def test_varlen_refuses_a_suffix_without_its_prefix():
    from pipelines.train import attention

    assert attention.segments([0, 1, 2, 3, 2, 3]) == [(0, 4, 0), (4, 6, 2)]
    with pytest.raises(ValueError, match="starts at position 3"):
        attention.segments([0, 1, 3, 4])
    with pytest.raises(ValueError, match="starts at position 2"):
        attention.segments([2, 3, 0, 1])


def test_share_prefix_follows_the_spec_and_the_attention():
    from types import SimpleNamespace

    from pipelines.train import attention

    spec = lambda v: SimpleNamespace(data=SimpleNamespace(share_prefix=v))  # noqa: E731
    assert attention.share_prefix(spec(None), True, True) is True
    assert attention.share_prefix(spec(None), True, False) is False  # flash-attention / a mask: not possible, off
    assert attention.share_prefix(spec(None), False, False) is False
    assert attention.share_prefix(spec(False), True, True) is False
    assert attention.share_prefix(spec(True), True, True) is True
    for pf, varlen in ((True, False), (False, False)):
        with pytest.raises(ValueError, match="data.share_prefix: true needs"):
            attention.share_prefix(spec(True), pf, varlen)


def test_a_shared_prefix_is_on_by_default_only_where_no_dropout_acts_on_it(tiny_model_dir, chat_data):
    """Computed once, a shared prefix would get one adapter-dropout mask for all its examples, where a padded
    batch draws one per example: unset ``data.share_prefix`` is off when dropout acts on the prefix's tokens,
    and an explicit ``true`` with dropout is refused, naming both fields."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.model import methods
    from pipelines.spec import SpecError, validate
    from pipelines.train import attention
    from tests.conftest import tiny_spec

    def layout(dropout: float, share=None):
        raw = tiny_spec(tiny_model_dir, chat_data, method={"dropout": dropout}).model_dump(mode="json")
        spec = validate({**raw, "data": {**raw["data"], "share_prefix": share}})
        torch.manual_seed(0)
        model = methods.build(spec, AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))).model
        return attention.batch_layout(spec, model, torch.device("cpu"))

    on = layout(0.0)
    assert on.share_prefix and on.how.endswith("a shared prefix computed once"), on
    off = layout(0.05)
    assert off.padding_free and not off.share_prefix, off
    assert "no shared prefix (dropout acts on its tokens: lora_dropout 0.05)" in off.how
    with pytest.raises(SpecError) as e:
        layout(0.05, share=True)
    assert [f for f, _ in e.value.problems] == ["data.share_prefix"]
    assert "method.dropout is 0.05" in e.value.problems[0][1] and "(got true)" in e.value.problems[0][1]
    assert layout(0.0, share=True).share_prefix


def test_unset_padding_free_pads_on_a_gpu_and_a_set_value_is_kept(tiny_model_dir, chat_data):
    """Defaults per device: per-example SDPA is launch-bound on a GPU (0.28-0.32x a padded loop on an H200,
    issue 33), so unset ``data.padding_free`` pads there; on a CPU it stays padding-free; a set value, or
    ``share_prefix: true``, is what the run gets. Only the decision: nothing runs on the device."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.model import methods
    from pipelines.spec import validate
    from pipelines.train import attention
    from tests.conftest import tiny_spec

    def layout(device: str, **data):
        raw = tiny_spec(tiny_model_dir, chat_data, method={"dropout": 0.0}).model_dump(mode="json")
        spec = validate({**raw, "data": {**raw["data"], **data}})
        model = methods.build(spec, AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))).model
        return attention.batch_layout(spec, model, torch.device(device))

    gpu = layout("cuda")
    assert (gpu.padding_free, gpu.share_prefix) == (False, False) and "launch-bound" in gpu.how, gpu
    assert layout("cpu")[:2] == (True, True)
    assert layout("cuda", padding_free=True)[:2] == (True, True)
    assert layout("cuda", share_prefix=True)[:2] == (True, True)
    assert layout("cuda", packing=True).padding_free


def test_rows_read_back_what_encode_gives(tmp_path, tok):
    """The memory-mapped rows a worker reads equal ``encode``'s output, packed or not, across shards."""
    exs = [D.encode(_chat(i), "chat", tok, 96) for i in range(30)]
    shards = tmp_path / "prep"
    shards.mkdir()
    names = []
    for k, part in enumerate((exs[:13], exs[13:])):
        names.append(f"train-{k:05d}-ids.npy")
        np.save(shards / names[-1], np.concatenate([np.asarray(e["input_ids"], np.int32) for e in part]))
    lens = np.asarray([len(e["input_ids"]) for e in exs], np.int32)
    masked = np.asarray([e["labels"].index(next(t for t in e["labels"] if t != D.IGNORE)) for e in exs], np.int32)
    np.save(shards / "train-lens.npy", lens)
    np.save(shards / "train-masked.npy", masked)
    np.save(shards / "train-offsets.npy", np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
    tokens = [int(lens[:13].sum()), int(lens[13:].sum())]
    (shards / "meta.json").write_text(json.dumps({"splits": {"train": {"shards": names, "shard_tokens": tokens}}}))
    rows = P.Rows(shards, "train", np.arange(30))
    assert [rows[i] for i in range(30)] == exs and rows[-1] == exs[-1] and rows[:2] == exs[:2]
    bins = D.pack_bfd(lens.tolist(), 256)
    ptr = np.concatenate([[0], np.cumsum([len(b) for b in bins])])
    packed = P.Rows(shards, "train", np.concatenate([np.asarray(b) for b in bins]), ptr)
    assert len(packed) == len(bins)
    assert [packed[i] for i in range(len(bins))] == D.pack(exs, 256)


def test_a_file_url_counts_as_local_input_and_a_remote_url_does_not(tmp_path):
    """Small local inputs are tokenized in the driver (prepare.LOCAL_MAX_BYTES): a ``file://`` URL names a local
    file as much as its path does; any other URL may be remote and goes to Ray Data."""
    from pipelines.data.prepare import _input_bytes

    (tmp_path / "a b").mkdir()
    f = tmp_path / "a b" / "chat.jsonl"
    f.write_text('{"text": "x"}\n' * 10)
    size = f.stat().st_size
    assert _input_bytes([{"path": str(f)}]) == size
    assert _input_bytes([{"path": f.as_uri()}]) == size  # percent-encoded space and all
    assert _input_bytes([{"path": str(f.parent)}]) == size  # a folder: its files summed
    assert _input_bytes([{"path": str(f)}, {"path": "s3://bucket/chat.jsonl"}]) is None

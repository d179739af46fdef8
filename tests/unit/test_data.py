"""Data formats, completion-only labels, packing, sharding, and the LR schedule (no Ray)."""

from __future__ import annotations

import json

import pytest

from pipelines import data as D
from pipelines.spec import validate
from pipelines.train import lr_factor


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from pipelines.model import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def _decode_labels(tok, enc):
    return tok.decode([t for t in enc["labels"] if t != D.IGNORE])


def test_chat_loss_only_on_the_assistant_turn(tok):
    rec = {"messages": [{"role": "user", "content": "2+3="}, {"role": "assistant", "content": "5"}]}
    enc = D.encode(rec, "chat", tok, 128)
    assert len(enc["input_ids"]) == len(enc["labels"])
    assert _decode_labels(tok, enc) == "5</s>"
    n_prompt = enc["labels"].index(next(t for t in enc["labels"] if t != D.IGNORE))
    assert tok.decode(enc["input_ids"][:n_prompt]).endswith("<|assistant|>")


def test_instruction_loss_only_on_output(tok):
    rec = {"instruction": "Add", "input": "2 and 3", "output": "5"}
    enc = D.encode(rec, "instruction", tok, 256)
    assert _decode_labels(tok, enc) == "5</s>"
    assert "### Response:" in tok.decode(enc["input_ids"])


def test_text_trains_on_everything_but_bos(tok):
    enc = D.encode({"text": "hello"}, "text", tok, 64)
    assert enc["labels"][0] == D.IGNORE and all(t != D.IGNORE for t in enc["labels"][1:])


def test_truncation_and_missing_fields(tok):
    enc = D.encode({"text": "x" * 500}, "text", tok, 32)
    assert len(enc["input_ids"]) == 32
    with pytest.raises(D.FormatError, match="'output'"):
        D.encode({"instruction": "a"}, "instruction", tok, 32)


def test_packing_keeps_every_token_and_respects_max_length():
    exs = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (5, 7, 3, 9, 2)]
    rows = D.pack(exs, 12)
    assert all(len(r["input_ids"]) <= 12 for r in rows)
    assert sum(len(r["input_ids"]) for r in rows) == 26
    assert [len(r["input_ids"]) for r in rows] == [12, 12, 2]
    assert [r["segments"] for r in rows] == [[9, 3], [7, 5], [2]]  # best fit, longest first


def test_sharder_covers_each_global_batch_once_across_ranks():
    n, mb, world = 10, 2, 2
    shards = [D.Sharder(n, mb, world, r, seed=1) for r in range(world)]
    seen = [i for k in range(5) for s in shards for i in s.indices(k)]  # 5 micro-steps x 4 = 2 epochs
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    # resumable: a fresh sharder gives the same batch for the same step
    assert D.Sharder(n, mb, world, 1, seed=1).indices(3) == shards[1].indices(3)
    assert shards[0].indices(0) != shards[1].indices(0)


def test_eval_split_from_fraction_is_disjoint(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(50)))
    spec = validate({"data": {"train": str(p), "format": "text", "eval_fraction": 0.2}})
    train, ev = D.train_eval_records(spec.data, seed=0)
    assert len(ev) == 10 and len(train) == 40
    assert not {r["text"] for r in train} & {r["text"] for r in ev}


def test_parquet_and_saved_dataset_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    rows = [{"text": f"r{i}"} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    assert D.load_records(str(tmp_path / "d.parquet")) == rows
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    assert D.load_records(str(tmp_path / "saved")) == rows
    spec = validate({"data": {"train": str(tmp_path / "saved"), "format": "text"}})
    assert spec.data.train.endswith("saved")


def test_lr_schedule():
    spec = validate({"train": {"max_steps": 10, "warmup_steps": 2, "scheduler": "cosine"}})
    f = [lr_factor(s, spec) for s in range(10)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3) and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    lin = validate({"train": {"max_steps": 10, "warmup_steps": 0, "scheduler": "linear"}})
    assert lr_factor(5, lin) == pytest.approx(0.5)
    const = validate({"train": {"max_steps": 10, "warmup_steps": 0, "scheduler": "constant"}})
    assert lr_factor(9, const) == 1.0


def _splits_dir(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {s: [{"text": f"{s} {i}"} for i in range(n)] for s, n in (("train", 6), ("validation", 3))}
    DatasetDict({s: Dataset.from_list(r) for s, r in rows.items()}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "dd.json").write_text(json.dumps(rows))
    return rows


@pytest.mark.parametrize("kind", ["dd", "dd.json"])
def test_a_source_with_splits_but_no_eval_split_is_refused_never_read_as_train(tmp_path, kind):
    """A save_to_disk DatasetDict or a {split: [...]} JSON without an `eval` split: refused naming its splits
    and data.eval_split, by the one rule the trainer (prepare) and the gate (train_eval_records) share."""
    from pipelines.data import plan_chunks
    from pipelines.train import split_problems

    rows = _splits_dir(tmp_path)
    src = str(tmp_path / kind)
    spec = validate({"data": {"train": src, "eval": src, "format": "text"}})
    with pytest.raises(D.DataError) as e:
        D.train_eval_records(spec.data, seed=0)
    msg = str(e.value)
    assert msg.startswith("data.eval_split: ") and "['train', 'validation']" in msg and "(got 'eval')" in msg
    with pytest.raises(D.DataError, match="data.eval_split: .*'validation'"):
        plan_chunks(src, "eval", 4, spec.data.eval_split)  # the trainer's path, on the driver
    assert [f for f, _ in split_problems(spec.data)] == ["data.eval_split"]  # and before Ray

    named = validate({"data": {"train": src, "eval": src, "eval_split": "validation", "format": "text"}})
    train, ev = D.train_eval_records(named.data, seed=0)
    assert train == rows["train"] and ev == rows["validation"]
    assert split_problems(named.data) == []
    chunks = plan_chunks(src, "eval", 4, "validation")
    assert {c["name"] for c in chunks} == {"validation"} and {c["split"] for c in chunks} == {"eval"}

    no_train = validate({"data": {"train": src, "train_split": "training", "format": "text"}})
    assert [f for f, _ in split_problems(no_train.data)] == ["data.train_split"]


def test_an_eval_that_is_the_training_records_is_refused(tmp_path):
    from pipelines.train import split_problems

    _splits_dir(tmp_path)
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10)))
    same_file = validate({"data": {"train": str(p), "eval": str(p), "format": "text"}})
    same_split = validate(
        {"data": {"train": str(tmp_path / "dd"), "eval": str(tmp_path / "dd"), "eval_split": "train", "format": "text"}}
    )
    for spec in (same_file, same_split):
        assert [f for f, _ in split_problems(spec.data)] == ["data.eval"]
        with pytest.raises(D.DataError, match="data.eval: evaluates on .*the records data.train trains on"):
            D.train_eval_records(spec.data, seed=0)

"""Data preparation on a real Ray cluster (Ray Data): bad data named before training, skipped records
counted, the cache reused, every source kind equal to the in-process path (both nodes of a two-node
cluster at work: test_two_nodes.py, on its cluster). The inputs here are small, which ``prepare`` would
tokenize in the driver: this module sends them to Ray Data, except where a test says otherwise."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import yaml

from pipelines import data as D
from tests.conftest import tiny_spec, write_chat_data

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _on_ray_data(monkeypatch):
    monkeypatch.setattr(importlib.import_module("pipelines.data.prepare"), "LOCAL_MAX_BYTES", -1)


def _spec(model, data: Path, storage: Path, **data_fields):
    from pipelines.spec import validate

    raw = tiny_spec(model, data, checkpoint={"storage": str(storage)}).model_dump(mode="json")
    raw["data"].update(data_fields)
    return validate(raw)


def _spec_file(spec, path: Path) -> str:
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    return str(path)


def test_a_malformed_line_stops_the_job_before_training_naming_file_and_line(
    local_ray, raypeft_home, tiny_model_dir, tmp_path, capsys
):
    from pipelines.train import main

    data = write_chat_data(tmp_path / "d.jsonl", n=40)
    lines = data.read_text().splitlines()
    lines[16] = '{"messages": [{"role": "user", "content": "1+1="}'  # line 17: cut short
    data.write_text("\n".join(lines) + "\n")
    spec = _spec(tiny_model_dir, data, tmp_path / "store")
    assert main([_spec_file(spec, tmp_path / "job.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"data.train: bad record(s): {data}:17: not valid JSON" in err, err
    assert "data.skip_invalid" in err
    # nothing started: no MLflow run, no Ray Train run directory
    assert not (raypeft_home / "mlflow.db").exists() or not _runs(raypeft_home)
    assert not (tmp_path / "store" / "tiny").exists()


def _runs(home: Path):
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{home}/mlflow.db")
    return [r for e in c.search_experiments() for r in c.search_runs([e.experiment_id])]


def test_a_missing_field_is_named_and_skip_invalid_counts_what_it_skips(local_ray, tiny_model_dir, tmp_path):
    from pipelines.data.prepare import open_layout, prepare

    data = write_chat_data(tmp_path / "d.jsonl", n=40)
    lines = data.read_text().splitlines()
    lines[4] = json.dumps({"msgs": []})
    lines[30] = "[1, 2]"
    data.write_text("\n".join(lines) + "\n")
    with pytest.raises(D.DataError) as e:
        prepare(_spec(tiny_model_dir, data, tmp_path / "store"))
    msg = str(e.value)
    assert f"{data}:5: record has no 'messages' field needed by data.format 'chat'" in msg, msg
    assert f"{data}:31: a record must be a JSON object" in msg, msg

    logs: list[str] = []
    p = prepare(_spec(tiny_model_dir, data, tmp_path / "store", skip_invalid=True), log=logs.append)
    assert p.stats["data_skipped_records"] == 2 and p.stats["data_records"] == 40
    assert any("skipped 2 invalid record(s)" in line for line in logs), logs
    train, evals, _, _ = open_layout(p.layout)
    assert len(train) + len(evals) == 38


def test_nothing_usable_after_truncation_reports_the_counts(local_ray, tiny_model_dir, tmp_path):
    from pipelines.data.prepare import prepare

    data = write_chat_data(tmp_path / "d.jsonl", n=20)
    with pytest.raises(
        D.DataError, match=r"no usable examples .* 20 record\(s\) read, 0 invalid, 20 with no completion"
    ):
        prepare(_spec(tiny_model_dir, data, tmp_path / "store", max_length=9))


def test_an_eval_file_that_copies_the_training_file_is_refused(local_ray, tiny_model_dir, tmp_path):
    """Two paths, the same records (a copy): the content fingerprints match, and the job refuses to report
    training figures as eval figures."""
    import shutil

    from pipelines.data.prepare import prepare

    data = write_chat_data(tmp_path / "d.jsonl", n=20)
    copy = shutil.copy(data, tmp_path / "eval.jsonl")
    with pytest.raises(D.DataError, match=r"data.eval: .*eval.jsonl' holds the same records as data.train"):
        prepare(_spec(tiny_model_dir, data, tmp_path / "store", eval=str(copy)))


def test_the_cache_is_reused_and_a_changed_file_is_tokenized_again(local_ray, tiny_model_dir, tmp_path):
    from pipelines.data.prepare import prepare

    data = write_chat_data(tmp_path / "d.jsonl", n=50)
    spec = _spec(tiny_model_dir, data, tmp_path / "store")
    first = prepare(spec)
    logs: list[str] = []
    again = prepare(spec, log=logs.append)
    assert not first.cache_hit and again.cache_hit and again.layout == first.layout
    assert not any("tokenizing" in line for line in logs), logs
    packed = prepare(_spec(tiny_model_dir, data, tmp_path / "store", packing=True))
    assert packed.cache_hit and packed.shards == first.shards and packed.layout != first.layout  # same tokens
    with open(data, "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "1+2="}, {"role": "assistant", "content": "3"}]}))
    changed = prepare(spec)
    assert not changed.cache_hit and changed.shards != first.shards and changed.stats["data_records"] == 51


@pytest.mark.parametrize("where", ["ray_data", "driver"])
@pytest.mark.parametrize("kind", ["parquet", "save_to_disk", "json"])
def test_every_source_kind_gives_what_the_in_process_path_gives(local_ray, tiny_model_dir, tmp_path, kind, where):
    import datasets

    from pipelines.data.prepare import open_layout, prepare
    from pipelines.model import load_tokenizer

    records = [json.loads(x) for x in write_chat_data(tmp_path / "d.jsonl", n=60).read_text().splitlines()]
    path = tmp_path / {"parquet": "d.parquet", "save_to_disk": "saved", "json": "d.json"}[kind]
    ds = datasets.Dataset.from_list(records)
    if kind == "parquet":
        ds.to_parquet(str(path), batch_size=16)  # several row groups: several chunks
    elif kind == "save_to_disk":
        ds.save_to_disk(str(path))
    else:
        path.write_text(json.dumps(records))
    spec = _spec(tiny_model_dir, path, tmp_path / "store")
    logs: list[str] = []
    prepared = prepare(spec, log=logs.append, local_max_bytes=1 << 20 if where == "driver" else -1)
    said = "in this process" if where == "driver" else "on Ray Data"
    assert any("data: tokenizing" in x and said in x for x in logs), logs
    train, evals, _, _ = open_layout(prepared.layout)
    tok = load_tokenizer(str(tiny_model_dir))
    old_train, old_eval = D.train_eval_records(spec.data, spec.train.seed)
    assert [train[i] for i in range(len(train))] == D.encode_all(old_train, spec.data, tok)
    assert [evals[i] for i in range(len(evals))] == D.encode_all(old_eval, spec.data, tok, packing=False)


@pytest.mark.parametrize("train", ["builtin:json_extract", "held-out"])
def test_the_task_metric_scores_the_eval_records_it_scored_before(local_ray, tiny_model_dir, tmp_path, train):
    """The raw eval records handed to the task metric are the first ``eval_task_samples`` of the same
    eval split the in-process path makes (a builtin's own eval file, or the held-out fraction)."""
    from pipelines.data.prepare import open_layout, prepare
    from pipelines.spec import validate

    if train == "held-out":
        records = [
            json.loads(x)
            for x in (Path(D.resolve_source("builtin:json_extract", "train"))).read_text().splitlines()[:300]
        ]
        (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        train = str(tmp_path / "d.jsonl")
    raw = tiny_spec(tiny_model_dir, Path(train), checkpoint={"storage": str(tmp_path / "store")}).model_dump(
        mode="json"
    )
    raw["data"].update(train=train, task="json_extract", eval_task_samples=16, max_length=256)
    spec = validate(raw)
    _, evals, task_records, _ = open_layout(prepare(spec).layout)
    _, old_eval = D.train_eval_records(spec.data, spec.train.seed)
    assert len(task_records) == 16 and task_records == old_eval[:16]
    assert len(evals) == len(old_eval)

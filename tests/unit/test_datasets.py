"""The shipped builtin ``json_extract`` dataset and its metric (stdlib only: no torch, no ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.datasets import BUILTIN, builtin_path
from pipelines.datasets import json_extract as jx

SHIPPED = Path(BUILTIN["json_extract"])
REF = '{"name": "Maria Lopez", "age": 34, "city": "Lyon", "job": "nurse"}'


def _read(split: str) -> list[dict]:
    with open(builtin_path("json_extract", split), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return _read("train")


@pytest.fixture(scope="module")
def eval_() -> list[dict]:
    return _read("eval")


# ---------------------------------------------------------------- registry


def test_builtin_registry_points_at_shipped_files():
    assert set(BUILTIN) == {"json_extract"}
    assert SHIPPED == Path(jx.__file__).parent / "json_extract"
    assert builtin_path("json_extract", "train") == SHIPPED / "train.jsonl"
    assert builtin_path("json_extract", "eval") == SHIPPED / "eval.jsonl"
    assert builtin_path("json_extract", "train").is_file()
    assert builtin_path("json_extract", "eval").is_file()
    with pytest.raises(KeyError):
        builtin_path("nope", "train")
    with pytest.raises(ValueError):
        builtin_path("json_extract", "test")


def test_import_is_light():
    code = (
        "import sys, pipelines.datasets, pipelines.datasets.json_extract;"
        "heavy = [m for m in ('torch', 'ray', 'transformers', 'datasets', 'numpy') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[2]
    )
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------- shipped files


def test_shipped_files_are_reproducible(tmp_path):
    train_p, eval_p = jx.write(tmp_path)  # defaults: 2000 / 200, seed 1234
    assert train_p.read_bytes() == (SHIPPED / "train.jsonl").read_bytes()
    assert eval_p.read_bytes() == (SHIPPED / "eval.jsonl").read_bytes()


def test_sizes_and_pinned_first_records(train, eval_):
    assert len(train) == 2000
    assert len(eval_) == 200
    first = train[0]
    assert first["input"] == "Grace Silva, 18, moved to Madrid last spring and now works as a firefighter."
    assert first["output"] == '{"name": "Grace Silva", "age": 18, "city": "Madrid", "job": "firefighter"}'
    assert train[1]["input"] == "Noah Dubois, 67, moved to Chicago last spring and now works as an accountant."
    # generate() with the train seed is the train split, record for record
    assert jx.generate(2000, 1234) == train


def test_generate_is_deterministic_and_seed_dependent():
    a = jx.generate(50, 7)
    assert a == jx.generate(50, 7)
    assert a != jx.generate(50, 8)
    assert len({r["input"] for r in a}) == 50
    assert jx.generate(0, 7) == []
    excluded = jx.generate(20, 7, exclude=[a[0]["input"]])
    assert a[0]["input"] not in {r["input"] for r in excluded}


def test_train_and_eval_are_disjoint(train, eval_):
    train_inputs = {r["input"] for r in train}
    eval_inputs = {r["input"] for r in eval_}
    assert len(train_inputs) == len(train)
    assert len(eval_inputs) == len(eval_)
    assert not train_inputs & eval_inputs
    assert not {r["text"] for r in train} & {r["text"] for r in eval_}


def test_record_schema(train, eval_):
    for rec in train + eval_:
        assert list(rec) == ["messages", "instruction", "input", "output", "text"]
        user, assistant = rec["messages"]
        assert user == {"role": "user", "content": f"{jx.INSTRUCTION}\nText: {rec['input']}"}
        assert assistant == {"role": "assistant", "content": rec["output"]}
        assert rec["instruction"] == (
            "Extract name, age, city and job from the text as JSON with keys name, age, city, job."
        )
        assert rec["text"] == f"{user['content']}\nJSON: {rec['output']}"
        target = json.loads(assistant["content"])
        assert list(target) == ["name", "age", "city", "job"]
        assert isinstance(target["age"], int) and 18 <= target["age"] <= 80
        assert target["city"] in jx.CITIES and target["job"] in jx.JOBS
        first, last = target["name"].split(" ")
        assert first in jx.FIRST_NAMES and last in jx.LAST_NAMES
        assert jx.dump_target(target) == assistant["content"]
        # every field is actually stated in the sentence
        for value in target.values():
            assert str(value) in rec["input"]
        assert len(rec["text"]) < 300  # keeps prompt+answer well under 120 BPE tokens


def test_templates_and_vocab_are_varied(train):
    assert len(jx.TEMPLATES) >= 10
    assert len(jx.FIRST_NAMES) == len(set(jx.FIRST_NAMES)) == 40
    assert len(jx.LAST_NAMES) == len(set(jx.LAST_NAMES)) == 40
    assert len(jx.CITIES) == len(set(jx.CITIES)) == 30
    assert len(jx.JOBS) == len(set(jx.JOBS)) == 25
    # every sentence is one of the templates filled with its target, and every template is used
    used = set()
    for rec in train:
        t = json.loads(rec["output"])
        art = lambda w: "an" if w[0] in "aeiou8" or w.startswith("18") else "a"  # noqa: E731
        fields = dict(t, a_job=f"{art(t['job'])} {t['job']}", an_age=f"{art(str(t['age']))} {t['age']}")
        matches = [i for i, tpl in enumerate(jx.TEMPLATES) if tpl.format(**fields) == rec["input"]]
        assert matches, rec["input"]
        used.update(matches)
    assert used == set(range(len(jx.TEMPLATES)))
    assert not any(" a 18-" in r["input"] or " a 80-" in r["input"] or " a architect" in r["input"] for r in train)


# ---------------------------------------------------------------- metric


@pytest.mark.parametrize(
    "prediction",
    [
        REF,
        '{"name":"Maria Lopez","age":34,"city":"Lyon","job":"nurse"}',
        '{"job": "nurse", "city": "Lyon", "age": 34, "name": "Maria Lopez"}',
        f"Sure! Here is the JSON: {REF} Hope that helps.",
        f"```json\n{REF}\n```",
        f"```\n{REF}\n```<|im_end|>",
        f"Fields {{name, age}} follow:\n{REF}",
    ],
)
def test_score_accepts_matching_object(prediction):
    assert jx.score(prediction, REF) == 1.0


@pytest.mark.parametrize(
    "prediction",
    [
        '{"name": "Maria Lopez", "age": 35, "city": "Lyon", "job": "nurse"}',
        '{"name": "Maria Lopez", "age": "34", "city": "Lyon", "job": "nurse"}',
        '{"name": "Maria Lopez", "age": 34, "city": "Lyon"}',
        '{"name": "Maria Lopez", "age": 34, "city": "Lyon", "job": "nurse", "extra": 1}',
        '{"name": "Maria Lopez", "age": 34, "city": "Lyon", "job": "nurse"',
        f'{{"name": "Maria Lopez", "age": 35, "city": "Lyon", "job": "nurse"}} {REF}',
        "",
        "garbage",
        "{{{{",
        "}{",
        "null",
        "{" * 5000,
    ],
)
def test_score_rejects_wrong_or_garbage(prediction):
    assert jx.score(prediction, REF) == 0.0


def test_score_never_raises():
    assert jx.score(None, REF) == 0.0  # type: ignore[arg-type]
    assert jx.score(REF, "not json") == 0.0
    assert jx.score(REF, "") == 0.0
    assert jx.score(REF, None) == 0.0  # type: ignore[arg-type]
    assert jx.score("[1, 2]", "[1, 2]") == 0.0


def test_score_on_shipped_references(eval_):
    for rec in eval_:
        assert jx.score(rec["output"], rec["output"]) == 1.0
        assert jx.score(rec["messages"][-1]["content"], rec["output"]) == 1.0
    other = eval_[1]["output"]
    assert eval_[0]["output"] != other
    assert jx.score(other, eval_[0]["output"]) == 0.0


def test_exact_match_averages():
    wrong = REF.replace("34", "43")
    assert jx.exact_match([REF, wrong, f"```json\n{REF}\n```", ""], [REF] * 4) == 0.5
    assert jx.exact_match([REF], [REF]) == 1.0
    assert jx.exact_match(["x", "y", REF], [REF] * 3) == pytest.approx(1 / 3)
    assert jx.exact_match([], []) == 0.0
    with pytest.raises(ValueError):
        jx.exact_match([REF], [REF, REF])


def test_evaluate_uses_this_metric():
    # pipelines.train.evaluate imports pipelines.data.records (stdlib at import time); the task hook must resolve here
    from pipelines.train import task_metric

    name, fn = task_metric("json_extract")
    assert name == "exact_match"
    assert fn is jx.exact_match

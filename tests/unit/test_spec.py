"""The job spec: the bad-spec corpus, shipped configs, overrides, immutability, derived values, docs.

Fast and Ray-free: nothing here starts a cluster or loads a model. (Validating a
method section imports ``peft`` to check the config class's fields.)
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from pipelines.spec import (
    JobSpec,
    SpecError,
    apply_overrides,
    load_spec,
    parse_override,
    reference_markdown,
    validate,
)

REPO = Path(__file__).resolve().parents[2]
BAD_SPECS = sorted((REPO / "tests" / "bad_specs").glob("*.yaml"))
CONFIGS = sorted((REPO / "pipelines" / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    """Relative data paths in specs resolve against the cwd: run every test from the repo root."""
    monkeypatch.chdir(REPO)


def expected_fields(path: Path) -> list[str]:
    """The ``# expect: <field>`` lines at the top of a bad spec (the first line must be one)."""
    lines = path.read_bytes().decode("utf-8", "replace").splitlines()
    out = []
    for line in lines:
        if not line.startswith("#"):
            break
        if line.startswith("# expect:"):
            out.append(line.split(":", 1)[1].strip())
    return out


def problems_of(fn, *args, **kwargs) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        fn(*args, **kwargs)
    return info.value.problems


# --------------------------------------------------------------------------- the bad-spec corpus


def test_corpus_is_large_and_well_formed():
    assert len(BAD_SPECS) >= 100, f"only {len(BAD_SPECS)} bad specs in tests/bad_specs"
    for path in BAD_SPECS:
        first = path.read_bytes().decode("utf-8", "replace").splitlines()[0]
        assert first.startswith("# expect: "), f"{path.name}: first line must be '# expect: <field>' (got {first!r})"
        assert all(expected_fields(path)), f"{path.name}: empty '# expect:' line"
    multi = [p.name for p in BAD_SPECS if len(expected_fields(p)) >= 2]
    assert len(multi) >= 2, f"need at least two specs with several problems (got {multi})"


@pytest.mark.parametrize("path", BAD_SPECS, ids=[p.stem for p in BAD_SPECS])
def test_bad_spec_is_rejected_naming_the_field(path: Path):
    from pipelines.train import load_checked_spec

    expected = expected_fields(path)
    with pytest.raises(SpecError) as info:
        load_checked_spec(path.relative_to(REPO))
    err = info.value
    fields = [f for f, _ in err.problems]
    for field in expected:
        assert field in fields, f"{path.name}: expected a problem for {field!r}, got {err.problems}"
        messages = [m for f, m in err.problems if f == field]
        assert any("got " in m for m in messages), (
            f"{path.name}: message for {field!r} does not quote the value: {messages}"
        )
    # every problem is listed at once, and the error's text lists them all
    text = str(err)
    assert f"{len(err.problems)} problem(s)" in text
    for field, msg in err.problems:
        assert f"{field}: {msg}" in text


@pytest.mark.parametrize("path", BAD_SPECS, ids=[p.stem for p in BAD_SPECS])
def test_raypeft_train_refuses_the_bad_spec_with_exit_2_and_starts_nothing(path: Path, tmp_path, monkeypatch, capsys):
    """The CLI contract, in-process: exit 2, every expected field named, no traceback, no Ray, nothing written."""
    import ray

    from raypeft.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("RAYPEFT_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["train", str(path.relative_to(REPO))]) == 2
    err = capsys.readouterr().err
    for field in expected_fields(path):
        assert f"- {field}: " in err, f"{path.name}: {field!r} not named in:\n{err}"
    assert "Traceback" not in err
    assert not ray.is_initialized() and not home.exists()


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_validates(path: Path):
    spec = load_spec(path)
    assert isinstance(spec, JobSpec)


def test_default_spec_validates():
    spec = validate({})
    assert spec == JobSpec()
    assert spec.method.name == "lora"


def test_validate_builds_relative_data_paths_against_base_dir(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    raw = {"data": {"train": "train.jsonl", "format": "text"}}
    assert validate(raw, base_dir=tmp_path).data.train == "train.jsonl"
    assert [f for f, _ in problems_of(validate, raw, base_dir=tmp_path / "elsewhere")] == ["data.train"]


def test_load_spec_reads_a_file_and_reports_a_missing_one(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    path = tmp_path / "job.yaml"
    path.write_text(
        f"name: from-file\ndata:\n  train: {tmp_path / 'train.jsonl'}\n  format: text\ntrain:\n  lr: 0.001\n"
    )
    spec = load_spec(path, ["train.max_steps=7", "method.r=4"])
    assert (spec.name, spec.train.lr, spec.train.max_steps, spec.method.r) == ("from-file", 0.001, 7, 4)
    assert [f for f, _ in problems_of(load_spec, tmp_path / "nope.yaml")] == ["<file>"]


# --------------------------------------------------------------------------- overrides


def test_overrides_are_parsed_as_yaml():
    raw = {"train": {"lr": 1}}
    out = apply_overrides(raw, ["train.lr=1e-4", "method.r=8", "method.target_modules=[q_proj, v_proj]"])
    assert raw == {"train": {"lr": 1}}, "apply_overrides must not mutate its input"
    # PyYAML (YAML 1.1) reads `1e-4` (no dot) as a string; pydantic coerces it, so only check the value
    assert float(out["train"]["lr"]) == 1e-4
    assert out["method"]["r"] == 8 and type(out["method"]["r"]) is int
    assert out["method"]["target_modules"] == ["q_proj", "v_proj"]
    spec = validate(out)
    assert spec.train.lr == 1e-4 and type(spec.train.lr) is float
    assert spec.method.r == 8 and spec.method.target_modules == ["q_proj", "v_proj"]


def test_override_value_types():
    out = apply_overrides(
        {},
        [
            "train.lr=0.0001",
            "train.eval_base=false",
            "tracking.registered_model=",
            "method.args={num_virtual_tokens: 8}",
            "name=a=b",
        ],
    )
    assert out["train"]["lr"] == 0.0001 and type(out["train"]["lr"]) is float
    assert out["train"]["eval_base"] is False
    assert out["tracking"]["registered_model"] == ""
    assert out["method"]["args"] == {"num_virtual_tokens": 8}
    assert out["name"] == "a=b"  # split on the first '=' only
    assert parse_override("a.b.c=[1, 2]") == ("a.b.c", [1, 2])


@pytest.mark.parametrize("item", ["train.lr", "train.lr 1e-4", "=1", "train..lr=1", ".lr=1", "train.=1"])
def test_bad_override_raises(item):
    with pytest.raises(SpecError) as info:
        apply_overrides({}, [item])
    assert info.value.problems and info.value.source == "override"


def test_override_of_unknown_key_is_an_unknown_field():
    problems = problems_of(validate, apply_overrides({}, ["train.lrr=1"]))
    assert [f for f, _ in problems] == ["train.lrr"]
    assert "unknown field" in problems[0][1] and "got 1" in problems[0][1]


# --------------------------------------------------------------------------- immutability


def test_validated_spec_is_frozen():
    spec = validate({"train": {"lr": 0.001}})
    with pytest.raises(ValidationError):
        spec.train.lr = 0.5  # type: ignore[misc]
    with pytest.raises(ValidationError):
        spec.train = spec.train  # type: ignore[misc]
    with pytest.raises(ValidationError):
        spec.method.galore.rank = 1  # type: ignore[misc]
    assert spec.train.lr == 0.001


@pytest.mark.parametrize(
    "raw",
    [
        {
            "name": "no-mutation",
            "method": {
                "name": "lora",
                "r": 4,
                "target_modules": ["q_proj", "v_proj"],
                "rank_pattern": {"q_proj": 8},
                "args": {"lora_bias": False},
                "galore": {"rank": 8},
            },
            "train": {"lr": "1e-4", "max_steps": 10},
            "scaling": {"num_workers": 1},
        },
        # failing validation must not touch the input either
        {"method": {"name": "lora", "rank": 8, "args": {"bogus": [1]}}, "train": {"lr": "fast"}},
        {"method": {"name": "galore_layerwise", "galore": {"rank": 4}}, "train": {"grad_accum": 2}},
    ],
    ids=["valid", "schema-error", "semantic-error"],
)
def test_validate_does_not_mutate_its_input(raw):
    before = copy.deepcopy(raw)
    try:
        validate(raw)
    except SpecError:
        pass
    assert raw == before


# --------------------------------------------------------------------------- derived values


def test_derived_quantization():
    assert JobSpec().quantization() == "none"
    assert validate({"method": {"name": "lora"}}).quantization() == "none"
    assert validate({"method": {"name": "qlora"}, "model": {"quantization": "auto"}}).quantization() == "nf4"
    assert validate({"method": {"name": "qdora"}}).quantization() == "nf4"
    assert validate({"method": {"name": "lora"}, "model": {"quantization": "int8"}}).quantization() == "int8"
    spec = validate({"method": {"name": "qlora"}})
    assert spec.model.quantization == "auto", "derived values are never written back into the spec"


def test_derived_rank_and_alpha():
    assert JobSpec().rank() == 16 and JobSpec().alpha() == 32.0
    spec = validate({"method": {"r": 8}})
    assert spec.rank() == 8 and spec.alpha() == 16.0
    assert spec.method.alpha is None
    assert validate({"method": {"r": 8, "alpha": 4}}).alpha() == 4.0


def test_derived_global_batch_size():
    assert JobSpec().global_batch_size() == 8
    spec = validate({"train": {"micro_batch_size": 4, "grad_accum": 3}, "scaling": {"num_workers": 2}})
    assert spec.global_batch_size() == 24


def test_flat_uses_dotted_keys():
    flat = validate({"method": {"r": 8}}).flat()
    assert flat["method.r"] == 8 and flat["train.lr"] == 2e-4 and flat["method.galore.rank"] == 128


# --------------------------------------------------------------------------- docs


def _all_fields(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[str]:
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _all_fields(ann, f"{prefix}{name}.")
        else:
            out.append(f"{prefix}{name}")
    return out


def test_reference_markdown_has_a_row_for_every_field():
    md = reference_markdown()
    fields = _all_fields()
    assert {"train.lr", "method.galore.rank", "tracking.registered_model", "name", "scaling.num_workers"} <= set(fields)
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    documented = [line.split("`")[1] for line in rows]
    assert documented == fields
    for line in rows:
        assert line.count("|") == 5, f"a description's '|' would break the table: {line}"
        assert not line.endswith("|  |"), f"field without a description: {line}"


@pytest.mark.parametrize(
    "name", ["adapter", "team.adapter-v2", "a b", "../x", "x/../y", "/abs", "a/b", "a:b", "./x", "x/", ".", "..x"]
)
def test_registered_model_names_are_refused_exactly_when_mlflow_would_refuse_them(name):
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_name

    try:
        _validate_model_name(name)
        mlflow_refuses = False
    except MlflowException:
        mlflow_refuses = True
    problems = [f for f, _ in semantic_problems_of({"tracking": {"registered_model": name}})]
    assert ("tracking.registered_model" in problems) == mlflow_refuses, (name, problems)


def semantic_problems_of(raw: dict) -> list[tuple[str, str]]:
    try:
        validate(raw)
    except SpecError as e:
        return e.problems
    return []

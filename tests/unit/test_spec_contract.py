"""No bad spec gets past the driver: one real `raypeft train` subprocess per class of malformed spec, and a
property-based test that mutates every field of a valid spec to wrong-type, non-finite, negative and huge
values."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipelines.spec import JobSpec, SpecError, field_reference, validate
from tests.conftest import REPO

BIN = Path(sys.executable).parent
CLASSES = {  # one corpus file per class of problem
    "non-finite": "inf_cpus_per_worker",
    "absurd size": "seed_past_2_32",
    "bool for int": "bool_num_workers",
    "duplicate key": "duplicate_nested_key",
    "binary file": "binary_file",
    "empty file": "empty_file",
    "PEFT would reject": "init_unknown",
    "non-linear target": "target_regex_norms_only",
    "DeepSpeed would reject": "deepspeed_unknown_nested_key",
    "no plan": "qlora_plan_quantizes_nothing",
    "a path as a value": "data_train_nul",
    "a name the registry refuses": "registered_model_traversal",
    "the whole document": "tune_unknown_key_under_train",
    "a tracking URI with no host": "tracking_uri_no_host",
    "records that don't match data.format": "data_records_do_not_match_format",
    "a base whose tokenizer won't load": "model_base_tokenizer_unusable",
}


@pytest.mark.parametrize("name", CLASSES.values(), ids=CLASSES.keys())
def test_raypeft_train_subprocess_exits_2_naming_the_field_and_starts_nothing(name, tmp_path):
    path = REPO / "tests" / "bad_specs" / f"{name}.yaml"
    field = path.read_bytes().decode("utf-8", "replace").splitlines()[0].split(":", 1)[1].strip()
    env = {**os.environ, "RAYPEFT_HOME": str(tmp_path / "home"), "RAY_TMPDIR": str(tmp_path / "ray")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [str(BIN / "raypeft"), "train", str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"- {field}: " in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "home").exists() and not (tmp_path / "ray").exists()  # no run dir, no MLflow, no Ray


def test_a_duplicate_key_names_both_lines(tmp_path):
    from pipelines.spec import read_yaml

    (tmp_path / "s.yaml").write_text("train:\n  lr: 0.1\n  max_steps: 3\n  lr: 0.2\n")
    with pytest.raises(SpecError) as e:
        read_yaml(tmp_path / "s.yaml")
    assert "duplicate key 'lr' on lines 2 and 4" in str(e.value)


def test_a_problem_names_its_line_unless_an_override_set_it(tmp_path):
    from pipelines.spec import load_spec

    (tmp_path / "s.yaml").write_text("name: x\ntrain:\n  max_steps: 10\n  lr: -1\n")
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "s.yaml")
    assert "[s.yaml line 4]" in dict(e.value.problems)["train.lr"]
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "s.yaml", ["train.lr=-2"])
    assert "line" not in dict(e.value.problems)["train.lr"]


# --------------------------------------------------------------------------- property-based

NUMERIC = [
    f for f, _, _ in field_reference(JobSpec) if f.split(".")[0] in ("method", "data", "train", "scaling", "checkpoint")
]
DEMO = yaml.safe_load((REPO / "pipelines" / "configs" / "demo.yaml").read_text())


def _numeric(field: str) -> bool:
    node = JobSpec
    *parents, leaf = field.split(".")
    for p in parents:
        node = node.model_fields[p].annotation
    text = str(node.model_fields[leaf].annotation)
    return ("int" in text or "float" in text) and "dict" not in text and "Literal" not in text


NUMBERS = [f for f in NUMERIC if _numeric(f)]
BAD_NUMBERS = st.one_of(
    st.booleans(),
    st.sampled_from([math.inf, -math.inf, math.nan]),
    st.integers(min_value=10**10, max_value=10**30),
    st.integers(max_value=-2),
    st.text(max_size=5).filter(lambda s: not s.strip().lstrip("-").replace(".", "").isdigit()),
    st.lists(st.integers(), max_size=2),
)
WRONG_TYPE = st.one_of(
    st.lists(st.integers(), min_size=1, max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2),
)


def _set(raw: dict, field: str, value) -> dict:
    from pipelines.spec import set_path

    return set_path(raw, field, value)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(NUMBERS), value=BAD_NUMBERS)
def test_every_numeric_field_refuses_bools_non_finite_huge_and_junk_naming_the_field(field, value):
    if field == "checkpoint.max_failures" and isinstance(value, int) and not isinstance(value, bool) and value < 0:
        return  # -1 means unlimited; -2 and below are covered by the bound
    with pytest.raises(SpecError) as e:
        validate(_set(DEMO, field, value), base_dir=REPO)
    fields = [f for f, _ in e.value.problems]
    assert field in fields, (field, value, e.value.problems)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from([f for f, _, _ in field_reference(JobSpec)]), value=WRONG_TYPE)
def test_every_field_refuses_a_value_of_the_wrong_shape_naming_it(field, value):
    if field in ("method.args", "scaling.deepspeed", "tune", "model.quantization_plan", "method.rank_pattern",
                 "method.alpha_pattern", "method.target_modules") and isinstance(value, dict | list):  # fmt: skip
        return  # mappings (and the target list) by design; their contents are checked elsewhere
    try:
        validate(_set(DEMO, field, value), base_dir=REPO)
    except SpecError as e:
        assert any(f == field or f.startswith(field + ".") for f, _ in e.problems), (
            field,
            value,
            e.problems,
        )
    else:
        raise AssertionError(f"{field}={value!r} was accepted")


# --------------------------------------------------------------------------- paths and names as values

PATHS = ("model.base", "data.train", "data.eval", "checkpoint.storage")
NAMES = ("name", "tracking.experiment", "tracking.registered_model")
CONTROL = st.sampled_from([chr(i) for i in range(32)] + ["\x7f"])
TEXT = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF, exclude_characters="/\\:"), max_size=12)
# each class of bad string, and the fields it is bad for (a '..' path to nowhere is a fine storage location,
# and MLflow takes any experiment name that is not blank)
BAD_STRINGS = {
    "empty or blank": (PATHS + NAMES, st.text(alphabet=" \t\n\r", max_size=4)),
    "a NUL or control character": (PATHS + NAMES, st.builds("{}{}{}".format, TEXT, CONTROL, TEXT)),
    "very long": (PATHS, st.integers(4097, 9000).map(lambda n: "/" + "p" * (n - 1))),
    "a very long name": (NAMES, st.integers(257, 2000).map(lambda n: "n" * n)),
    "'..' segments to nowhere": (
        ("model.base", "data.train", "data.eval", "name", "tracking.registered_model"),
        st.builds(lambda k, s: "../" * k + "raypeft-nowhere-" + s + ".jsonl", st.integers(1, 8), TEXT),
    ),
    "a file where a directory belongs": (
        ("model.base", "checkpoint.storage"),
        st.sampled_from(["pyproject.toml", "README.md", "/dev/null", "pipelines/configs/demo.yaml"]),
    ),
    "a directory where a file belongs": (("data.train", "data.eval"), st.sampled_from(["pipelines", "/tmp", "."])),
}
CASES = st.sampled_from(sorted(BAD_STRINGS)).flatmap(
    lambda c: st.tuples(st.just(c), st.sampled_from(BAD_STRINGS[c][0]), BAD_STRINGS[c][1])
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=CASES)
def test_every_path_and_name_field_refuses_each_class_of_bad_string_naming_the_field(case):
    from pipelines.spec import validate_document

    what, field, value = case
    with pytest.raises(SpecError) as e:
        validate_document(_set(DEMO, field, value), base_dir=REPO)
    assert field in [f for f, _ in e.value.problems], (what, field, value, e.value.problems)


def _one_of_each(what: str, tmp_path: Path) -> dict[str, str]:
    """A value of class ``what`` for every field it is bad for (drawn once, by hand, for the subprocess)."""
    fields, _ = BAD_STRINGS[what]
    value = {
        "empty or blank": " ",
        "a NUL or control character": "bad\x01value",
        "very long": "/" + "p" * 5000,
        "a very long name": "n" * 300,
        "'..' segments to nowhere": "../../raypeft-nowhere.jsonl",
        "a file where a directory belongs": str(REPO / "pyproject.toml"),
        "a directory where a file belongs": str(tmp_path),
    }[what]
    return dict.fromkeys(fields, value)


@pytest.mark.parametrize("what", sorted(BAD_STRINGS))
def test_each_class_of_bad_string_through_the_real_cli_exits_2_naming_every_field(what, tmp_path):
    raw = DEMO
    bad = _one_of_each(what, tmp_path)
    for field, value in bad.items():
        raw = _set(raw, field, value)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "RAYPEFT_HOME": str(tmp_path / "home"), "RAY_TMPDIR": str(tmp_path / "ray")}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [str(BIN / "raypeft"), "train", str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    for field in bad:
        assert f"- {field}: " in proc.stderr, (field, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "home").exists() and not (tmp_path / "ray").exists()

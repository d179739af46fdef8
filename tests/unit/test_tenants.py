"""Tenants: the spec section is validated without revealing keys, a caller is identified by its key, and may
use only what its tenant lists. No Ray, no HTTP (tests/integration/test_serving.py covers those)."""

from __future__ import annotations

import pytest

from pipelines.spec import SpecError
from serving.spec import validate
from serving.tenants import identify, may_use, read_key, tenant


def test_identify_finds_the_tenant_of_the_bearer_key_and_nothing_else():
    a, b = tenant("acme", "key-a", ["acme-*"], False), tenant("globex", "key-b", ["shared"], True)
    assert identify([a, b], "Bearer key-a") is a
    assert identify([a, b], "bearer key-b") is b
    for header in ("", "Bearer", "Bearer ", "Bearer key-c", "Basic key-a", "key-a", "Bearer key-a2"):
        assert identify([a, b], header) is None, header


def test_may_use_reads_names_and_globs_and_the_base_switch():
    a = tenant("acme", "k", ["acme-*", "shared"], False)
    assert may_use(a, "acme-support") and may_use(a, "shared")
    assert not may_use(a, "globex-support") and not may_use(a, "shared2") and not may_use(a, None)
    assert may_use(tenant("b", "k2", [], True), None)


def test_a_tenant_keeps_no_key_and_never_prints_one():
    import dataclasses
    import hashlib

    t = tenant("acme", "super-secret", ["x"], False)
    assert "super-secret" not in repr(t)
    assert t.digest == hashlib.sha256(b"super-secret").digest()  # what it keeps instead of the key
    assert not any("super-secret" in str(v) for v in dataclasses.astuple(t))  # in no field, under any name


def _spec(tenants, **extra):
    return validate({"tenants": tenants, **extra})


def test_keys_come_from_env_or_file(monkeypatch, tmp_path):
    monkeypatch.setenv("ACME_KEY", "  k1\n")
    (tmp_path / "globex.key").write_text("k2\n")
    spec = _spec(
        {
            "acme": {"key_env": "ACME_KEY", "adapters": ["acme-*"]},
            "globex": {"key_file": str(tmp_path / "globex.key"), "base": True},
        }
    )
    assert read_key(spec.tenants["acme"].key_env, None) == "k1"
    assert read_key(None, spec.tenants["globex"].key_file) == "k2"


@pytest.mark.parametrize(
    ("tenants", "extra", "field", "says"),
    [
        ({"a": {"key_env": "NOPE_UNSET", "base": True}}, {}, "tenants.a.key_env", "'NOPE_UNSET'"),
        ({"a": {"key_file": "/nonexistent/k", "base": True}}, {}, "tenants.a.key_file", "'/nonexistent/k'"),
        ({"a": {"base": True}}, {}, "tenants.a", "exactly one of key_env or key_file"),
        ({"a": {"key_env": "T_KEY_A", "key_file": "/x", "base": True}}, {}, "tenants.a", "exactly one"),
        ({"a": {"key_env": "T_KEY_A"}}, {}, "tenants.a", "may use nothing"),
        (
            {"a": {"key_env": "T_KEY_A", "base": True}, "b": {"key_env": "T_KEY_SAME", "base": True}},
            {},
            "tenants.b",
            "same key as tenant 'a'",
        ),
        ({"a": {"key_env": "T_KEY_A", "base": True}}, {"api_key_env": "T_KEY_A"}, "api_key_env", "not both"),
        ({"a b": {"key_env": "T_KEY_A", "base": True}}, {}, "tenants.a b", "tenant names"),
        ({"a": {"key_env": "T_KEY_A", "bases": True}}, {}, "tenants.a.bases", ""),
    ],
)
def test_a_bad_tenant_section_names_the_field_and_never_the_key(monkeypatch, tenants, extra, field, says):
    monkeypatch.setenv("T_KEY_A", "secret-value-a")
    monkeypatch.setenv("T_KEY_SAME", "secret-value-a")
    with pytest.raises(SpecError) as e:
        _spec(tenants, **extra)
    fields = {f: msg for f, msg in e.value.problems}
    assert field in fields, e.value.problems
    assert says in fields[field]
    assert "secret-value-a" not in str(e.value)

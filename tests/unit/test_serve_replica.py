"""A serving replica outside Ray Serve (its class, constructed directly): what it leaves behind."""

from __future__ import annotations

import tempfile


def test_a_replica_removes_its_adapter_downloads_when_serve_stops_it(tiny_model_dir, tmp_path, monkeypatch):
    """Registry and remote adapters are downloaded into a directory of the replica's own; Serve calls
    ``__del__`` when it stops the replica, and the directory goes with it."""
    from serving.app import LoraServer
    from serving.spec import validate

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    (tmp_path / "adapters").mkdir()
    spec = validate(
        {"model": {"base": str(tiny_model_dir), "name": "tiny"}, "adapter_roots": [str(tmp_path / "adapters")]}
    )
    written = LoraServer.func_or_class.__mro__[1]  # the class as written: serve.ingress subclasses it
    assert written.__name__ == "LoraServer" and "__del__" in vars(written)  # what Serve's wrapper calls on stop
    replica = written(spec.model_dump(mode="json"))
    try:
        cache = replica.sources.cache_dir
        assert cache.is_dir() and cache.parent == temp
    finally:
        replica.backend.stop()
        replica.__del__()
    assert not cache.exists() and not list(temp.iterdir())


def test_a_replica_with_compile_decode_compiles_before_its_constructor_returns(tiny_model_dir):
    """``limits.compile_decode`` reaches the engine, and the replica compiles the decode step (both graphs,
    with inductor) while Serve still waits for it, so the first request compiles nothing; what it generates
    is HF's greedy ``generate`` on the same base, token for token."""
    from torch._dynamo.utils import counters

    from serving.app import LoraServer
    from serving.backend import Request
    from serving.spec import validate
    from tests.unit.test_engine import _reference

    spec = validate(
        {
            "model": {"base": str(tiny_model_dir), "name": "tiny"},
            "limits": {"compile_decode": True},
            "cache": {"active_slots": 2, "max_rank": 8},  # test_engine_compile's shapes: inductor's cache may hold them
        }
    )
    before = counters["stats"]["unique_graphs"]
    replica = LoraServer.func_or_class.__mro__[1](spec.model_dump(mode="json"))
    try:
        assert counters["stats"]["unique_graphs"] - before == 2
        reqs = [replica.backend.submit(Request(p, None, max_tokens=8)) for p in ([1, 2, 3], [5], [7, 8])]
        for req in reqs:
            while req.finish_reason is None:
                req.events.get(timeout=60)
        for req in reqs:
            assert req.out_ids == _reference(tiny_model_dir, None, req.prompt_ids, 8), req.prompt_ids
        assert counters["stats"]["unique_graphs"] - before == 2, "the first request compiled again"
        assert replica.backend.metrics()["engine_compiled_steps_total"] >= 2
    finally:
        replica.backend.stop()
        replica.__del__()

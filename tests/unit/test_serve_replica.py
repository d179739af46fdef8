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

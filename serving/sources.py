"""Where adapters come from: configured sources, adapter roots, the MLflow registry, fsspec URLs.

Only configured names and names under the configured roots resolve: a name is letters,
digits, ``_ . -`` (no ``/``, no ``..``), and a root's match must stay inside that root.
Registry versions (``models:/name@alias``) are resolved to a version number and downloaded
once per version into a local cache.
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

from serving.spec import NAME, ServeSpec

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "raypeft.json")


class UnknownAdapter(KeyError):
    """No configured source and no root holds this adapter (HTTP 404)."""


class AdapterSources:
    def __init__(self, spec: ServeSpec, cache_dir: str | Path):
        self.spec = spec
        self.cache_dir = Path(cache_dir)
        self.roots = [Path(os.path.expanduser(r)).resolve() for r in spec.adapter_roots]
        self.versions: dict[str, str] = {}  # name → version last loaded ("local", "3", ...)
        self.current: dict[str, str] = {}  # alias source name → the version new requests use
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ discovery

    def _root_dir(self, name: str) -> Path | None:
        if not NAME.match(name):
            return None
        for root in self.roots:
            for cand in (root / name / "adapter", root / name):
                cand = cand.resolve()
                if cand.is_relative_to(root) and (cand / "adapter_config.json").is_file():
                    return cand
        return None

    def exists(self, name: str) -> bool:
        return name in self.spec.adapters or self._root_dir(name) is not None

    def names(self) -> list[str]:
        found = set(self.spec.adapters)
        for root in self.roots:
            for d in root.iterdir() if root.is_dir() else []:
                if NAME.match(d.name) and self._root_dir(d.name):
                    found.add(d.name)
        return sorted(found)

    def source(self, name: str) -> str:
        if name in self.spec.adapters:
            return self.spec.adapters[name]
        d = self._root_dir(name)
        if d is None:
            raise UnknownAdapter(name)
        return str(d)

    # ------------------------------------------------------------------ resolution

    def registry_version(self, uri: str) -> str:
        """``models:/name@alias`` → the version number the alias points at now (``models:/name/3`` → 3)."""
        from mlflow import MlflowClient

        from pipelines.tracking import tracking_uri

        name, _, rest = uri[len("models:/") :].partition("@")
        if not rest:
            return uri.rsplit("/", 1)[-1]
        t = self.spec.tracking_uri or tracking_uri()
        return str(MlflowClient(t, registry_uri=t).get_model_version_by_alias(name, rest).version)

    def key(self, name: str) -> str:
        """The engine's cache key for ``name`` now: ``name#vN`` for a registry alias (so a moved alias is a
        new key and requests already running keep the version they started with), else ``name``."""
        src = self.source(name)
        if not (src.startswith("models:/") and "@" in src):
            return name
        if name not in self.current:
            self.current[name] = self.registry_version(src)
        return f"{name}#v{self.current[name]}"

    def alias_sources(self) -> dict[str, str]:
        return {n: s for n, s in self.spec.adapters.items() if s.startswith("models:/") and "@" in s}

    def poll(self) -> dict[str, tuple[str | None, str]]:
        """Re-resolve every alias; returns {name: (old version, new version)} for those that moved
        (``current`` is *not* updated here: the caller switches after preloading)."""
        moved = {}
        for name, src in self.alias_sources().items():
            new = self.registry_version(src)
            if self.current.get(name) != new and name in self.current:
                moved[name] = (self.current.get(name), new)
        return moved

    def resolve(self, key: str) -> str:
        """A local directory with the adapter's files (downloaded once per registry version)."""
        name, _, pinned = key.partition("#v")
        src = self.source(name)
        if src.startswith("models:/"):
            version = pinned or self.registry_version(src)
            registered = src[len("models:/") :].split("@")[0].split("/")[0]
            dst = self.cache_dir / "registry" / registered / version
            if not (dst / "adapter_config.json").is_file():
                from pipelines.lifecycle import resolve as download

                with self._lock:
                    tmp = Path(str(dst) + ".tmp")
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                    got = download(f"models:/{registered}/{version}", self.spec.tracking_uri, dst=str(tmp))
                    shutil.rmtree(dst, ignore_errors=True)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(got), str(dst))
                    shutil.rmtree(tmp, ignore_errors=True)
            self.versions[name] = version
            return str(dst)
        if "://" in src:  # fsspec: copy the adapter files only
            import fsspec

            dst = self.cache_dir / "remote" / name
            if not (dst / "adapter_config.json").is_file():
                dst.mkdir(parents=True, exist_ok=True)
                fs, root = fsspec.core.url_to_fs(src)
                for f in ADAPTER_FILES:
                    if fs.exists(f"{root}/{f}"):
                        fs.get(f"{root}/{f}", str(dst / f))
            self.versions[name] = "remote"
            return str(dst)
        self.versions[name] = "local"
        return os.path.expanduser(src)

"""Tenants: which API key may use which adapters. Pure logic, no Ray, no HTTP.

A serving spec's ``tenants`` section names each tenant, where its key is read from (an environment variable
or a file, never the spec itself), the adapters it may use (names or ``fnmatch`` globs) and whether it may
call the bare base. ``identify`` finds the caller's tenant from the ``Authorization`` header in constant
time (every key is compared, by digest, whichever matches); ``may_use`` says whether it may use a model.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Tenant:
    name: str
    digest: bytes  # sha256 of the key: the key itself is not kept
    adapters: tuple[str, ...]
    base: bool

    def __repr__(self) -> str:  # never print anything derived from the key
        return f"Tenant({self.name!r}, adapters={self.adapters!r}, base={self.base})"


def read_key(key_env: str | None, key_file: str | None) -> str:
    """The key from its environment variable or file (stripped); '' when unset or empty."""
    if key_env:
        return os.environ.get(key_env, "").strip()
    if key_file:
        try:
            return Path(os.path.expanduser(key_file)).read_text().strip()
        except OSError:
            return ""
    return ""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def tenant(name: str, key: str, adapters: list[str] | tuple[str, ...], base: bool) -> Tenant:
    return Tenant(name, _digest(key), tuple(adapters), base)


def identify(tenants: list[Tenant], authorization: str) -> Tenant | None:
    """The tenant whose key the ``Authorization: Bearer KEY`` header carries, or None. Every tenant's digest
    is compared (``hmac.compare_digest``), so the time taken does not depend on which key matched, or how
    much of one did."""
    scheme, _, key = authorization.partition(" ")
    key = key.strip() if scheme.lower() == "bearer" else ""
    got = _digest(key)
    found = None
    for t in tenants:  # no early exit; the spec refuses an empty key, and an empty one here matches nothing
        if hmac.compare_digest(t.digest, got) and key:
            found = t
    return found


def may_use(t: Tenant, adapter: str | None) -> bool:
    """Whether ``t`` may call ``adapter`` (None: the bare base)."""
    if adapter is None:
        return t.base
    return any(fnmatch.fnmatchcase(adapter, pattern) for pattern in t.adapters)

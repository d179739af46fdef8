"""A torch extension build killed midway leaves its lock file; every later DeepSpeed CPU run would wait on it
forever. Workers remove a lock older than any build takes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pipelines.train.engines import STALE_BUILD_S, _clear_stale_build_lock, stale_build_lock


def test_only_a_lock_older_than_any_build_is_stale(tmp_path):
    now = time.time()
    assert stale_build_lock(tmp_path, now) is None  # no lock
    lock = tmp_path / "lock"
    lock.touch()
    os.utime(lock, (now - 60, now - 60))
    assert stale_build_lock(tmp_path, now) is None  # a build in progress
    os.utime(lock, (now - STALE_BUILD_S - 1, now - STALE_BUILD_S - 1))
    assert stale_build_lock(tmp_path, now) == lock


def test_the_worker_removes_a_stale_deepspeed_shm_lock_and_keeps_a_fresh_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir()
    lock.touch()
    _clear_stale_build_lock("ShareMemCommBuilder")
    assert lock.exists()
    old = time.time() - 3600
    os.utime(lock, (old, old))
    _clear_stale_build_lock("ShareMemCommBuilder")
    assert not lock.exists()
    assert f"removing {lock}" in capsys.readouterr().out


def test_install_prebuilds_the_op_a_zero_job_would_build(capsys):
    """``make install`` runs ``pipelines.train.prebuild_ops``; afterwards the op is in torch's extension cache,
    where ``deepspeed.init_distributed`` loads it instead of compiling it in the first ZeRO job."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    from pipelines.train import prebuild_ops

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        pytest.skip(f"DeepSpeed builds no shared-memory op for {get_accelerator()._name}")
    name = prebuild_ops()
    assert name == builder.NAME == "deepspeed_shm_comm"
    assert (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").is_file()
    assert f"DeepSpeed op {name} ready" in capsys.readouterr().out

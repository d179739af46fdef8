"""Shared fixtures: tiny random-init models, specs, and an isolated RAYPEFT_HOME."""

from __future__ import annotations

import json
import os
import random
import secrets
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test`'s two xdist workers share the machine's cores with the Ray workers the tests start: torch at
    # its default (a thread per core) in every test process oversubscribes them, and OpenMP's threads then
    # wait on each other (tests/unit/test_methods.py beside two busy one-thread processes: 17 s → 124 s; with
    # one thread, 24 s). Set before torch loads; the test processes' children (CLIs, clusters) inherit it.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # likewise inductor's pool of compile processes (one per core): the tests' graphs are small, and a pool
    # compiling beside the other worker's Ray cluster slows both
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")


from cluster.connect import free_port  # noqa: E402,F401 - the tests' free ports: the same rule as the code's


def _snapshot(*dirs: Path) -> dict[str, float]:
    return {str(f): f.stat().st_mtime for d in dirs if d.is_dir() for f in d.rglob("*") if f.is_file()}


@pytest.fixture(scope="session", autouse=True)
def _isolated_home(tmp_path_factory):
    """No test writes to the user's ~/.raypeft or ~/.ray: the default RAYPEFT_HOME is a temporary folder, and
    the session has a Ray token of its own (a local ``ray.init`` with none would write ~/.ray/auth_token).
    Both folders are compared before and after the session; a change fails it."""
    user = [Path.home() / ".raypeft", Path.home() / ".ray"]
    before = _snapshot(*user)
    saved = {k: os.environ.get(k) for k in ("RAYPEFT_HOME", "RAY_AUTH_TOKEN")}
    os.environ["RAYPEFT_HOME"] = str(tmp_path_factory.mktemp("raypeft-home"))
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    yield os.environ["RAYPEFT_HOME"]
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    after = _snapshot(*user)
    changed = sorted(f for f in before.keys() | after.keys() if before.get(f) != after.get(f))
    assert not changed, f"the tests wrote to the user's own folders: {changed}"


@pytest.fixture(scope="module", autouse=True)
def _home_kept(_isolated_home):
    """Names the module whose fixtures dropped or replaced the session's isolated home (every later test
    would then write to the user's ~/.raypeft)."""
    yield
    assert os.environ.get("RAYPEFT_HOME") == _isolated_home, "this module's fixtures did not restore RAYPEFT_HOME"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from pipelines.model import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


def write_chat_data(path: Path, n: int = 64, seed: int = 0) -> Path:
    """A learnable toy task: 'a+b=' → the sum."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = r.randint(1, 9), r.randint(1, 9)
            f.write(
                json.dumps(
                    {
                        "messages": [
                            {"role": "user", "content": f"{a}+{b}="},
                            {"role": "assistant", "content": str(a + b)},
                        ]
                    }
                )
                + "\n"
            )
    return path


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    return write_chat_data(tmp_path_factory.mktemp("data") / "chat.jsonl")


@pytest.fixture
def raypeft_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("RAYPEFT_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


# DeepSpeed keeps a ZeRO-3 parameter under 1e5 elements whole on every rank (its default
# stage3_param_persistence_threshold): every tensor of the tiny model, LoRA's included, would stay unpartitioned
# and the gathers that ZeRO-3 needs (saving the adapter, evals, the step) would go untested. A ZeRO-3 test spec's
# ``scaling.deepspeed``: partition them all, as a real model's are.
ZERO3_PARTITION_ALL = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def tiny_spec(model_dir: Path, data: Path, **sections):
    """A validated JobSpec for the tiny model; ``sections`` override whole-section dicts. With a ``tune``
    section it is a ``TunedJobSpec`` (what ``raypeft tune`` / ``raypeft layerwise`` run)."""
    if "tune" in sections:
        from pipelines.spec.tune import validate
    else:
        from pipelines.spec import validate

    raw = {
        "name": "tiny",
        "model": {"base": str(model_dir)},
        "method": {"name": "lora", "r": 4},
        "data": {"train": str(data), "format": "chat", "max_length": 64, "eval_fraction": 0.2},
        "train": {
            "max_steps": 6,
            "micro_batch_size": 4,
            "lr": 0.01,
            "warmup_steps": 1,
            "eval_every": 0,
            "eval_base": False,
        },
    }
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return validate(raw)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster of 2 CPUs for one test module (modules with other needs define their own)."""
    import ray

    from cluster.connect import init_ray

    ray.shutdown()
    init_ray(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()


# --------------------------------------------------------------------------- the time budget


def pytest_addoption(parser):
    parser.addini("budget_unit_s", "seconds a unit test may take (setup + call + teardown)", default="20")
    parser.addini("budget_integration_s", "seconds an integration test may take", default="120")
    parser.addini(
        "budget_exceptions",
        "'NODE-ID-PREFIX SECONDS' lines: tests allowed longer than their tier's budget",
        type="linelist",
        default=[],
    )


_durations: dict[str, float] = {}


def pytest_runtest_logreport(report):
    """Each test's setup + call + teardown, summed (under xdist this runs in the controlling process)."""
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration


def budgets(config) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """The tiers' budgets and the named exceptions, from ``[tool.pytest.ini_options]``."""
    tiers = {"unit": float(config.getini("budget_unit_s")), "integration": float(config.getini("budget_integration_s"))}
    exceptions = []
    for line in config.getini("budget_exceptions"):
        node, seconds = line.split("#")[0].split()
        exceptions.append((node, float(seconds)))
    return tiers, exceptions


def over_budget(durations: dict[str, float], tiers, exceptions) -> list[tuple[str, float, float]]:
    """``(node id, seconds, budget)`` of every test that took longer than its budget, slowest first."""
    out = []
    for node, took in durations.items():
        tier = "integration" if "tests/integration/" in node else "unit"
        budget = next((s for prefix, s in exceptions if node.startswith(prefix)), tiers[tier])
        if took > budget:
            out.append((node, took, budget))
    return sorted(out, key=lambda x: -x[1])


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The total, per tier, and every test past its budget: a warning, never a failure (this machine's
    speed varies up to 2× from day to day)."""
    if not _durations:
        return
    tiers, exceptions = budgets(config)
    per_tier = {"unit": 0.0, "integration": 0.0}
    for node, took in _durations.items():
        per_tier["integration" if "tests/integration/" in node else "unit"] += took
    tr = terminalreporter
    tr.section("time budget")
    tr.write_line(
        f"{len(_durations)} tests, {sum(per_tier.values()):.0f} s of test time "
        f"(unit {per_tier['unit']:.0f} s, integration {per_tier['integration']:.0f} s); "
        f"budgets: unit {tiers['unit']:.0f} s, integration {tiers['integration']:.0f} s each, "
        f"{len(exceptions)} named exceptions (pyproject.toml)"
    )
    late = over_budget(_durations, tiers, exceptions)
    for node, took, budget in late:
        tr.write_line(f"OVER BUDGET (warning): {took:.1f} s > {budget:.0f} s  {node}", yellow=True)
    if not late:
        tr.write_line("every test within its budget")


# Integration modules, slowest first (measured: docs/development.md). Under `make test`'s two xdist workers
# (`--dist loadfile`) each module runs whole on one worker, its clusters and fixtures once and its tests in
# order; the slowest integration modules start first and the unit modules fill the gaps.
SLOWEST_FIRST = (
    "test_distributed.py",
    "test_tuning.py",
    "test_tracking_server.py",
    "test_job_submit.py",
    "test_two_nodes.py",
    "test_train_ray.py",
    "test_prepare_ray.py",
    "test_serving.py",
    "test_memory_measured.py",
    "test_promotion.py",
    "test_global_batch.py",
    "test_serving_deadlines.py",
    "test_serving_smollm2.py",
    "test_serving_metrics.py",
)


def _weight(item) -> tuple[int, int]:
    name = item.path.name
    if "tests/integration/" not in item.nodeid:
        return (2, 0)
    return (0, SLOWEST_FIRST.index(name)) if name in SLOWEST_FIRST else (1, 0)


def pytest_collection_modifyitems(config, items):
    """Integration modules first, slowest first; then the unit tests (xdist hands out whole modules in
    this order). ``gpu`` tests run only where CUDA is present; elsewhere they are skipped, saying why."""
    import torch

    items.sort(key=_weight)  # stable: a module's tests keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

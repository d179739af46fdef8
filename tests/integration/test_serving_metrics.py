"""Metrics where a Ray operator looks for them: two replicas behind one route, two tenants, the per-adapter
request counters and the engine figures of both replicas in Ray's Prometheus export, summed correctly."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cluster.connect import init_ray
from tests.conftest import free_port
from tests.unit.test_lora_batch import _make_adapter

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_replicas(tiny_model_dir, tmp_path_factory):
    import ray
    import requests
    from ray import serve

    from serving.app import build_app
    from serving.spec import validate

    root = tmp_path_factory.mktemp("metrics-adapters")
    for tenant, key in KEYS.items():
        (root / f"{tenant}.key").write_text(key + "\n")
    for i in range(2):
        _make_adapter(tiny_model_dir, root / f"m{i}" / "adapter", 300 + i, r=4, lora_alpha=16)
    port, metrics_port = free_port(), free_port()
    ray.shutdown()
    init_ray(
        num_cpus=2,
        include_dashboard=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 500},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    spec = validate(
        {
            "name": "metrics-serve",
            "model": {"base": str(tiny_model_dir), "name": "tiny"},
            "adapter_roots": [str(root)],
            "cache": {"active_slots": 2, "max_rank": 8},
            "limits": {"max_new_tokens": 4, "max_prompt_tokens": 32},
            "deployment": {"replicas": 2, "cpus_per_replica": 0.5},
            "tenants": {t: {"key_file": str(root / f"{t}.key"), "adapters": ["m*"]} for t in KEYS},
        }
    )
    serve.run(build_app(spec), name="metrics-serve", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    requests.get(f"{url}/health", timeout=30).raise_for_status()
    yield url, f"http://127.0.0.1:{metrics_port}/metrics"
    serve.shutdown()
    ray.shutdown()


KEYS = {"red": "red-key-0123456789", "blue": "blue-key-0123456789"}


def _series(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1 :].rsplit("} ", 1)
            tags = dict(part.split("=", 1) for part in labels.split(",") if "=" in part)
            out.append(({k: v.strip('"') for k, v in tags.items()}, float(value)))
    return out


def test_per_adapter_metrics_from_both_replicas_sum_in_rays_export(two_replicas):
    import requests

    url, export = two_replicas
    sent = {"m0": 24, "m1": 8}  # red asks m0, blue asks m1
    tenant_of = {"m0": "red", "m1": "blue"}
    jobs = [name for name, n in sent.items() for _ in range(n)]

    def ask(name, model=None):
        body = {"model": model or f"tiny:{name}", "prompt": "hello", "max_tokens": 3}
        auth = {"Authorization": f"Bearer {KEYS[tenant_of[name]]}"}
        return requests.post(f"{url}/v1/completions", json=body, headers=auth, timeout=120).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(ask, jobs)) == {200}
    assert ask("m0", model="tiny:nope") == 403  # a model the key may not use, existing or not

    deadline, counts = time.time() + 90, {}
    while time.time() < deadline:
        text = requests.get(export, timeout=10).text
        counts = {}
        for tags, value in _series(text, "ray_raypeft_adapter_requests_total"):
            key = (tags.get("adapter"), tags.get("status"))
            counts[key] = counts.get(key, 0) + value
        replicas = {t.get("replica") for t, _ in _series(text, "ray_raypeft_engine_kv_cache_bytes")}
        served = [(t, v) for t, v in _series(text, "ray_raypeft_adapter_requests_total") if t.get("status") == "200"]
        done = counts.get(("m0", "200")) == 24 and counts.get(("m1", "200")) == 8
        if done and counts.get(("unknown", "403")) == 1 and len(replicas) == 2:  # the 403 was asked last
            break
        time.sleep(1)
    assert counts.get(("m0", "200")) == 24 and counts.get(("m1", "200")) == 8, counts
    assert counts.get(("unknown", "403")) == 1, counts  # a client's arbitrary model name is not a label
    # both replicas served: the counter has a series per replica, and their sum is what was sent
    by_replica: dict[str, float] = {}
    for t, v in served:
        by_replica[t["replica"]] = by_replica.get(t["replica"], 0) + v
    assert len(by_replica) == 2 and all(v > 0 for v in by_replica.values()), by_replica
    assert sum(by_replica.values()) == 32, by_replica
    by_tenant: dict[tuple, float] = {}
    for t, v in served:
        by_tenant[(t["adapter"], t["tenant"])] = by_tenant.get((t["adapter"], t["tenant"]), 0) + v
    assert by_tenant == {("m0", "red"): 24, ("m1", "blue"): 8}, by_tenant
    assert len(replicas) == 2, replicas  # both replicas export their engine figures
    tokens = sum(v for t, v in _series(text, "ray_raypeft_adapter_generated_tokens_total") if t.get("adapter") == "m1")
    assert tokens == 8 * 3
    firsts = _series(text, "ray_raypeft_adapter_time_to_first_token_seconds_count")
    assert sum(v for t, v in firsts if t.get("adapter") == "m0" and t.get("tenant") == "red") == 24  # one per request
    gaps = _series(text, "ray_raypeft_adapter_inter_token_seconds_count")
    assert sum(v for t, v in gaps if t.get("adapter") == "m1") > 0

    page = requests.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEYS['red']}"}, timeout=30).text
    assert "# TYPE raypeft_requests_total counter" in page and "# TYPE raypeft_kv_cache_bytes gauge" in page
    assert 'raypeft_requests_total{replica="' in page

"""Metrics where a Ray operator looks for them: two replicas behind one route, the per-adapter request
counters and the engine figures of both in Ray's Prometheus export, summed correctly."""

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
        }
    )
    serve.run(build_app(spec), name="metrics-serve", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    requests.get(f"{url}/health", timeout=30).raise_for_status()
    yield url, f"http://127.0.0.1:{metrics_port}/metrics"
    serve.shutdown()
    ray.shutdown()


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
    sent = {"m0": 24, "m1": 8}
    jobs = [name for name, n in sent.items() for _ in range(n)]

    def ask(name):
        body = {"model": f"tiny:{name}", "prompt": "hello", "max_tokens": 3}
        return requests.post(f"{url}/v1/completions", json=body, timeout=120).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(ask, jobs)) == {200}
    assert (
        requests.post(f"{url}/v1/completions", json={"model": "tiny:nope", "prompt": "x"}, timeout=30).status_code
        == 404
    )

    deadline, counts = time.time() + 90, {}
    while time.time() < deadline:
        text = requests.get(export, timeout=10).text
        counts = {}
        for tags, value in _series(text, "ray_raypeft_adapter_requests_total"):
            key = (tags.get("adapter"), tags.get("status"))
            counts[key] = counts.get(key, 0) + value
        replicas = {t.get("replica") for t, _ in _series(text, "ray_raypeft_engine_kv_cache_bytes")}
        if counts.get(("m0", "200")) == 24 and counts.get(("m1", "200")) == 8 and len(replicas) == 2:
            break
        time.sleep(1)
    assert counts.get(("m0", "200")) == 24 and counts.get(("m1", "200")) == 8, counts
    assert counts.get(("unknown", "404")) == 1, counts  # a client's arbitrary model name is not a label
    assert len(replicas) == 2, replicas  # both replicas export their engine figures
    tokens = sum(v for t, v in _series(text, "ray_raypeft_adapter_generated_tokens_total") if t.get("adapter") == "m1")
    assert tokens == 8 * 3
    firsts = _series(text, "ray_raypeft_adapter_time_to_first_token_seconds_count")
    assert sum(v for t, v in firsts if t.get("adapter") == "m0" and t.get("tenant") == "-") == 24  # one per request
    gaps = _series(text, "ray_raypeft_adapter_inter_token_seconds_count")
    assert sum(v for t, v in gaps if t.get("adapter") == "m1") > 0

    page = requests.get(f"{url}/metrics", timeout=30).text  # one replica's own page
    assert "# TYPE raypeft_requests_total counter" in page and "# TYPE raypeft_kv_cache_bytes gauge" in page
    assert 'raypeft_requests_total{replica="' in page

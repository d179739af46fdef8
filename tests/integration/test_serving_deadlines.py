"""Requests that outlive their welcome, over real HTTP: one past ``limits.request_timeout_s`` gets 504 and gives
its row back; a client that disconnects mid-stream frees its row long before the generation would have ended.

The generations ask for 20,000 greedy tokens of the tiny model, far more than it decodes before the timeout, so
neither outcome can come from a request that simply finished (that would count 200, not 504 or 499)."""

from __future__ import annotations

import time

import pytest

from cluster.connect import init_ray
from tests.conftest import free_port

pytestmark = pytest.mark.integration

TIMEOUT_S = 6.0
LONG = 20_000  # tokens: far more than the tiny model decodes within TIMEOUT_S (about 4,000 here)
PROMPT = "zzzz"  # greedy on the tiny model never reaches </s> in its first 3,000 tokens (hello does, at 431)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    import ray
    import requests
    from ray import serve

    from serving.app import build_app
    from serving.spec import validate

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
            "name": "deadline-serve",
            "model": {"base": str(tiny_model_dir), "name": "tiny"},
            "limits": {"max_new_tokens": LONG, "max_prompt_tokens": 32, "request_timeout_s": TIMEOUT_S},
        }
    )
    serve.run(build_app(spec), name="deadline-serve", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    requests.get(f"{url}/health", timeout=30).raise_for_status()
    yield url, f"http://127.0.0.1:{metrics_port}/metrics"
    serve.shutdown()
    ray.shutdown()


def _page(url: str) -> dict[str, float]:
    """The replica's own /metrics page → {series: value} (one replica here, so it is the whole)."""
    import requests

    out = {}
    for line in requests.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def _running(url: str) -> float:
    return next(v for k, v in _page(url).items() if k.startswith("raypeft_running_rows"))


def _wait_running(url: str, want: float, within: float) -> float:
    """Seconds until the replica reports ``want`` running rows; fails after ``within``."""
    t0 = time.time()
    while time.time() - t0 < within:
        if _running(url) == want:
            return time.time() - t0
        time.sleep(0.05)
    raise AssertionError(f"running rows stayed {_running(url)} (wanted {want}) for {within}s")


def test_a_request_past_its_timeout_gets_504_and_frees_its_row(server):
    import requests

    server, _ = server
    t0 = time.time()
    r = requests.post(
        f"{server}/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": LONG}, timeout=120
    )
    took = time.time() - t0
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["type"] == "timeout_error" and f"{TIMEOUT_S}s" in err["message"], err
    assert TIMEOUT_S <= took < TIMEOUT_S + 10, took
    _wait_running(server, 0, within=5)
    # the row is back: a short request is served at once
    ok = requests.post(f"{server}/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3, ok.text


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    import requests

    server, export = server
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": LONG, "stream": True}
    r = requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=60)
    assert r.status_code == 200, r.text
    chunks = 0
    for line in r.iter_lines():
        if line.startswith(b"data: {"):
            chunks += 1
            if chunks == 5:
                break
    assert chunks == 5  # the stream is under way
    # (the running-row gauge is read from a separate metrics snapshot and may lag: not asserted here)
    r.close()  # the client goes away
    t0 = time.time()
    freed_after = _wait_running(server, 0, within=TIMEOUT_S - 1)  # well before the timeout could free it
    assert time.time() - t0 < TIMEOUT_S - 1, freed_after
    deadline, statuses = time.time() + 60, {}
    while time.time() < deadline:  # in Ray's export: counted as the client's going (499), not as served
        statuses = {}
        for line in requests.get(export, timeout=10).text.splitlines():
            if line.startswith("ray_raypeft_adapter_requests_total{") and 'adapter="tiny"' in line:
                status = line.split('status="', 1)[1].split('"', 1)[0]
                statuses[status] = statuses.get(status, 0) + float(line.rsplit(" ", 1)[1])
        if statuses.get("499"):
            break
        time.sleep(0.5)
    assert statuses.get("499") == 1, statuses  # a stream that had ended by itself would count 200


def _request_counts(export: str, adapter: str = "tiny") -> dict[str, float]:
    """status → requests counted for ``adapter`` in Ray's metrics export (summed over replicas)."""
    import requests

    counts: dict[str, float] = {}
    for line in requests.get(export, timeout=10).text.splitlines():
        if line.startswith("ray_raypeft_adapter_requests_total{") and f'adapter="{adapter}"' in line:
            status = line.split('status="', 1)[1].split('"', 1)[0]
            counts[status] = counts.get(status, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def test_a_stream_that_times_out_ends_with_a_504_chunk_and_is_counted_as_504(server):
    """The 200 headers are sent before the failure; the stream then carries the error (code 504) and
    [DONE], and the request metric records 504, not 200."""
    import json

    import requests

    server, export = server
    before = _request_counts(export)
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": LONG, "stream": True}
    r = requests.post(f"{server}/v1/completions", json=body, stream=True, timeout=120)
    assert r.status_code == 200, r.text
    lines = [x for x in r.iter_lines() if x.startswith(b"data: ")]
    assert lines[-1] == b"data: [DONE]"
    err = json.loads(lines[-2][len(b"data: ") :])["error"]
    assert err["code"] == 504 and err["type"] == "timeout_error" and f"{TIMEOUT_S}s" in err["message"], err
    deadline, after = time.time() + 60, before
    while time.time() < deadline:
        after = _request_counts(export)
        if after.get("504", 0) > before.get("504", 0):
            break
        time.sleep(0.5)
    assert after.get("504", 0) == before.get("504", 0) + 1, (before, after)
    assert after.get("200", 0) == before.get("200", 0), (before, after)  # not counted as served

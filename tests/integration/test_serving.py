"""Ray Serve over real HTTP on 127.0.0.1 (a free port): per-adapter answers, mixed LoRA/DoRA batches, the adapter
cache, MLflow registry aliases, the openai client (streaming and not), the error corpus, and a bounded
load test (200 concurrent requests over 16 adapters with 4 active slots)."""

from __future__ import annotations

import asyncio
import os

import pytest

from cluster.connect import init_ray
from tests.unit.test_engine import _reference
from tests.unit.test_lora_batch import _make_adapter

pytestmark = pytest.mark.integration

from tests.conftest import free_port  # noqa: E402

PORT = free_port()
URL = f"http://127.0.0.1:{PORT}"
TOKEN = "s3cret-test-token"
ACME_KEY, GLOBEX_KEY = "acme-key-0123", "globex-key-4567"


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-root")
    out = {}
    for i in range(16):  # distinct random adapters, as trained jobs lay them out: ROOT/NAME/adapter
        kw = {"use_dora": True} if i % 4 == 3 else {}
        out[f"ad{i:02d}"] = _make_adapter(
            tiny_model_dir, root / f"ad{i:02d}" / "adapter", 100 + i, r=4, lora_alpha=16, **kw
        )
    return root, out


@pytest.fixture(scope="module")
def registry(adapters, tmp_path_factory):
    """ad00's files registered as version 1 and ad01's as version 2 of 'tiny-chat', alias champion → 1."""
    from mlflow import MlflowClient

    from pipelines import tracking

    home = tmp_path_factory.mktemp("serve-home")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    _, ads = adapters
    for name in ("ad00", "ad01"):
        tracking.register_directory(uri, str(ads[name]), "tiny-chat", f"seed-{name}", {"src": name})
    MlflowClient(uri, registry_uri=uri).set_registered_model_alias("tiny-chat", "champion", "1")
    return uri


@pytest.fixture(scope="module")
def server(adapters, registry, tiny_model_dir):
    import ray
    import requests
    from ray import serve

    from serving.app import build_app
    from serving.spec import validate

    root, _ = adapters
    ray.shutdown()
    os.environ["RAYPEFT_TEST_KEY"] = TOKEN
    os.environ["RPT_ACME_KEY"] = ACME_KEY  # before Ray starts: the replicas inherit it
    init_ray(num_cpus=2, include_dashboard=False)
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    spec = validate(
        {
            "name": "tiny-serve",
            "model": {"base": str(tiny_model_dir), "name": "tiny"},
            "adapter_roots": [str(root)],
            "adapters": {"champ": "models:/tiny-chat@champion"},
            "cache": {"active_slots": 4, "max_rank": 8, "cpu_adapters": 6},
            "limits": {"max_batch_size": 8, "max_queue": 256, "max_new_tokens": 16, "max_prompt_tokens": 64},
            "api_key_env": "RAYPEFT_TEST_KEY",
            "tracking_uri": registry,
            "alias_poll_s": 0.5,
        }
    )
    serve.run(build_app(spec), name="tiny-serve", route_prefix="/")
    requests.get(f"{URL}/health", timeout=30).raise_for_status()
    yield spec
    serve.shutdown()
    ray.shutdown()


def _post(path, body, token=TOKEN, raw=None):
    import requests

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if raw is not None:
        return requests.post(
            f"{URL}{path}", data=raw, headers={**headers, "content-type": "application/json"}, timeout=60
        )
    return requests.post(f"{URL}{path}", json=body, headers=headers, timeout=60)


def _scrape(text: str) -> dict[str, float]:
    """Prometheus text → {metric name: value}; every metric must carry HELP and TYPE lines."""
    values, helped, typed = {}, set(), set()
    for line in text.strip().splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            typed.add(line.split()[2])
        else:
            series, value = line.rsplit(" ", 1)
            values[series.split("{")[0]] = float(value)
    assert set(values) == helped == typed, (set(values) ^ helped, set(values) ^ typed)
    return values


def _expected(tiny_model_dir, adapter_dir, prompt, n):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    return tok.decode(_reference(tiny_model_dir, adapter_dir, ids, n), skip_special_tokens=True)


def test_each_adapter_answers_as_it_would_alone(server, adapters, tiny_model_dir):
    _, ads = adapters
    for model, adapter in (("tiny:ad01", "ad01"), ("ad02", "ad02"), ("tiny:ad03", "ad03"), ("tiny", None)):
        r = _post("/v1/completions", {"model": model, "prompt": "hello world", "max_tokens": 10})
        assert r.status_code == 200, r.text
        body = r.json()
        want = _expected(tiny_model_dir, ads.get(adapter), "hello world", 10)
        assert body["choices"][0]["text"] == want, (model, body)
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] <= 10
    texts = {
        m: _post("/v1/completions", {"model": m, "prompt": "hello world", "max_tokens": 10}).json()["choices"][0][
            "text"
        ]
        for m in ("tiny:ad01", "tiny:ad02", "tiny")
    }
    assert len(set(texts.values())) == 3, "adapters do not behave differently: the test proves nothing"


def test_the_local_clusters_serve_gives_its_proxy_time_to_start(server):
    """Serve's controller in raypeft's local cluster runs with the proxy's ready check at 30 s a try
    (``cluster.connect.init_ray``): with Ray's 5 s, a proxy that a busy machine started too slowly was
    killed as unhealthy and ``serve.start`` failed (ActorDiedError, seen in CI)."""
    from pathlib import Path

    from ray._private.state import actors

    from cluster.connect import SERVE_PROXY_READY, SERVE_PROXY_READY_S

    alive = [a for a in actors().values() if a["State"] == "ALIVE"]
    controller = next(a for a in alive if a["ActorClassName"] == "ServeController")
    environ = Path(f"/proc/{controller['Pid']}/environ").read_bytes().split(b"\0")
    assert f"{SERVE_PROXY_READY}={SERVE_PROXY_READY_S}".encode() in environ
    assert any(a["ActorClassName"] == "ProxyActor" for a in alive)


def test_registry_alias_source_and_models_listing(server, adapters, tiny_model_dir):
    _, ads = adapters
    r = _post("/v1/completions", {"model": "tiny:champ", "prompt": "abc", "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == _expected(
        tiny_model_dir, ads["ad00"], "abc", 8
    )  # champion → version 1 = ad00
    import requests

    listing = requests.get(f"{URL}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    ids = {m["id"]: m for m in listing["data"]}
    assert "tiny" in ids and "tiny:ad15" in ids
    assert ids["tiny:champ"]["version"] == "1" and ids["tiny:champ"]["source"] == "models:/tiny-chat@champion"


def test_openai_client_chat_streaming_and_not(server, adapters, tiny_model_dir):
    from openai import OpenAI

    client = OpenAI(base_url=f"{URL}/v1", api_key=TOKEN)
    msgs = [{"role": "user", "content": "1+2="}]
    full = client.chat.completions.create(model="tiny:ad04", messages=msgs, max_tokens=9)
    assert full.choices[0].message.role == "assistant" and full.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(model="tiny:ad04", messages=msgs, max_tokens=9, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream]
    assert "".join(pieces) == full.choices[0].message.content
    comp = client.completions.create(model="tiny:ad05", prompt="hello world", max_tokens=6)
    assert comp.choices[0].text == _expected(tiny_model_dir, adapters[1]["ad05"], "hello world", 6)
    s1 = client.completions.create(model="tiny:ad05", prompt="hi", max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    s2 = client.completions.create(model="tiny:ad05", prompt="hi", max_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert s1.choices[0].text == s2.choices[0].text


def test_openai_request_fields_are_implemented_or_refused(server, adapters, tiny_model_dir):
    """Through the unmodified openai client: content parts, n, max_completion_tokens, stream_options usage, user
    and the developer role work; every other OpenAI field set to a value that means something is refused with
    a 400 naming it, as is an argument OpenAI does not define. Seeded sampling is sampling."""
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=f"{URL}/v1", api_key=TOKEN)
    text = [{"role": "user", "content": "1+2="}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "1+"}, {"type": "text", "text": "2="}]}]
    a = client.chat.completions.create(model="tiny:ad04", messages=text, max_tokens=9)
    b = client.chat.completions.create(model="tiny:ad04", messages=parts, max_completion_tokens=9, user="alice")
    assert a.choices[0].message.content == b.choices[0].message.content and b.usage.completion_tokens <= 9
    dev = [{"role": "developer", "content": "be brief"}, *text]
    assert client.chat.completions.create(model="tiny:ad04", messages=dev, max_tokens=4).choices[0].finish_reason

    greedy = client.completions.create(model="tiny:ad05", prompt="hi", max_tokens=8, n=2)
    assert [c.index for c in greedy.choices] == [0, 1] and greedy.choices[0].text == greedy.choices[1].text
    assert greedy.usage.completion_tokens > 0 and greedy.usage.completion_tokens % 2 == 0  # both choices counted
    sampled = client.completions.create(model="tiny:ad05", prompt="hi", max_tokens=8, n=3, temperature=1.0, seed=3)
    texts = [c.text for c in sampled.choices]
    assert len(set(texts)) > 1 and texts[0] != greedy.choices[0].text, texts
    again = client.completions.create(model="tiny:ad05", prompt="hi", max_tokens=8, n=3, temperature=1.0, seed=3)
    assert [c.text for c in again.choices] == texts  # seeded: reproducible
    other = client.completions.create(model="tiny:ad05", prompt="hi", max_tokens=8, temperature=1.0, seed=4)
    assert other.choices[0].text != texts[0]

    chunks = list(
        client.completions.create(
            model="tiny:ad05", prompt="hi", max_tokens=8, n=2, stream=True, stream_options={"include_usage": True}
        )
    )
    by_index = {0: "", 1: ""}
    for c in chunks[:-1]:
        assert c.usage is None
        for ch in c.choices:
            by_index[ch.index] += ch.text
    assert by_index == {0: greedy.choices[0].text, 1: greedy.choices[1].text}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == greedy.usage.completion_tokens

    accepted = {"n": 1, "frequency_penalty": 0, "logprobs": False, "response_format": {"type": "text"}, "store": False}
    assert client.chat.completions.create(model="tiny:ad04", messages=text, max_tokens=4, **accepted).choices
    refused = [
        ({"top_logprobs": 2, "logprobs": False}, "top_logprobs: needs logprobs: true"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"presence_penalty": 1.0}, "presence_penalty"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"n": 5}, "limits.max_n"),
        ({"stream_options": {"include_usage": True}}, "only allowed when stream is true"),
        ({"extra_body": {"foo": 1}}, "unrecognized request argument: foo"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "text content parts",
        ),
    ]
    for kwargs, fragment in refused:
        call = {"model": "tiny:ad04", "messages": text, "max_tokens": 4, **kwargs}
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**call)
        assert fragment in e.value.response.json()["error"]["message"], (kwargs, e.value.response.text)
    for kwargs, fragment in [
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "x"}, "suffix"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny:ad05", prompt="hi", max_tokens=4, **kwargs)
        assert fragment in e.value.response.json()["error"]["message"], (kwargs, e.value.response.text)
    assert client.completions.create(model="tiny:ad05", prompt="hi", max_tokens=4).choices  # still serving


def test_logprobs_on_both_endpoints_streamed_and_not(server, adapters, tiny_model_dir):
    """Through the openai client's own types: one entry per generated token, the chosen token first among
    its alternatives when greedy, the same figures streamed and not; the legacy completions format too."""
    import openai
    from openai import OpenAI

    client = OpenAI(base_url=f"{URL}/v1", api_key=TOKEN)
    msgs = [{"role": "user", "content": "1+2="}]
    full = client.chat.completions.create(model="tiny:ad04", messages=msgs, max_tokens=8, logprobs=True, top_logprobs=3)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens and content
    assert "".join(c.token for c in content).startswith(full.choices[0].message.content)
    for c in content:
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token and c.logprob <= 0
        assert c.logprob == c.top_logprobs[0].logprob and bytes(c.bytes).decode() == c.token
    stream = client.chat.completions.create(
        model="tiny:ad04", messages=msgs, max_tokens=8, logprobs=True, top_logprobs=3, stream=True
    )
    streamed = [e for chunk in stream if chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(c.token, round(c.logprob, 5)) for c in content]
    bare = client.chat.completions.create(model="tiny:ad04", messages=msgs, max_tokens=8, logprobs=True)
    assert [c.top_logprobs for c in bare.choices[0].logprobs.content] == [[]] * len(content)
    assert client.chat.completions.create(model="tiny:ad04", messages=msgs, max_tokens=8).choices[0].logprobs is None

    comp = client.completions.create(model="tiny:ad05", prompt="hello world", max_tokens=6, logprobs=2)
    lp = comp.choices[0].logprobs
    assert (
        "".join(lp.tokens) == comp.choices[0].text == _expected(tiny_model_dir, adapters[1]["ad05"], "hello world", 6)
    )
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == comp.usage.completion_tokens
    assert all(len(top) <= 2 and max(top.values()) == tlp for top, tlp in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    with pytest.raises(openai.UnprocessableEntityError, match="logprobs: Input should be less than or equal to 5"):
        client.completions.create(model="tiny:ad05", prompt="hi", max_tokens=4, logprobs=6)  # OpenAI's limit is 5


def test_adapters_that_cannot_be_served_fail_only_their_own_requests(server, adapters, tiny_model_dir):
    """Found later by a root lookup: one trained on another base gets 409 naming what differs, one with
    corrupt files gets 424; the adapters beside them keep answering."""
    import json
    import shutil

    root, ads = adapters
    other = shutil.copytree(ads["ad01"], root / "qtrained" / "adapter")
    record = {"base": str(tiny_model_dir), "quantization": "nf4", "double_quant": True, "quantization_plan": {}}
    (other / "raypeft.json").write_text(json.dumps(record))
    broken = shutil.copytree(ads["ad02"], root / "broken" / "adapter")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    r = _post("/v1/completions", {"model": "tiny:qtrained", "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 409, r.text
    assert "model.quantization was 'nf4' in training, 'none' here" in r.json()["error"]["message"]
    r = _post("/v1/completions", {"model": "tiny:broken", "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 424 and "'broken' could not be loaded" in r.json()["error"]["message"], r.text
    good = _post("/v1/completions", {"model": "tiny:ad01", "prompt": "hello world", "max_tokens": 6})
    assert good.json()["choices"][0]["text"] == _expected(tiny_model_dir, ads["ad01"], "hello world", 6)


def test_error_corpus(server):
    import requests

    cases = [
        (_post("/v1/completions", None, raw=b"{not json"), 400, "not valid JSON"),
        (_post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": -3}), 422, "max_tokens"),
        (_post("/v1/completions", {"model": "tiny", "prompt": "x", "temperature": "hot"}), 422, "temperature"),
        (_post("/v1/chat/completions", {"model": "tiny", "messages": []}), 422, "messages"),
        (_post("/v1/completions", {"model": "tiny:nope", "prompt": "x"}), 404, "unknown adapter 'nope'"),
        (_post("/v1/completions", {"model": "other:ad01", "prompt": "x"}), 404, "unknown base model 'other'"),
        (_post("/v1/completions", {"model": "tiny:..", "prompt": "x"}), 404, "unknown adapter"),
        (_post("/v1/completions", {"model": "tiny:ad01", "prompt": "x" * 200}), 400, "limit is 64"),
        (
            _post("/v1/completions", {"model": "tiny:ad01", "prompt": "x", "max_tokens": 500}),
            400,
            "exceeds the limit 16",
        ),
        (_post("/v1/completions", {"model": "tiny", "prompt": "x"}, token=None), 401, "missing bearer token"),
        (_post("/v1/completions", {"model": "tiny", "prompt": "x"}, token="wrong"), 401, "wrong bearer token"),
        (requests.get(f"{URL}/v1/models", timeout=30), 401, "bearer"),
    ]
    chat, comp = "/v1/chat/completions", "/v1/completions"
    hi = [{"role": "user", "content": "hi"}]
    more = [
        (chat, {"model": "tiny", "messages": [{"content": "hi"}]}, 422, "messages.0.role"),
        (chat, {"model": "tiny", "messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
        (chat, {"model": "tiny", "messages": [{"role": "user", "content": 42}]}, 422, "messages.0.content"),
        (chat, {"model": "tiny", "messages": "hi"}, 422, "messages"),
        (chat, {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text"),
        (chat, {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, 422, "needs 'text'"),
        (chat, {"model": "tiny", "messages": hi, "n": 0}, 422, "n"),
        (chat, {"model": "tiny", "messages": hi, "n": 99}, 400, "limits.max_n"),
        (chat, {"model": "tiny", "messages": hi, "top_p": 0}, 422, "top_p"),
        (chat, {"model": "tiny", "messages": hi, "top_p": 1.5}, 422, "top_p"),
        (chat, {"model": "tiny", "messages": hi, "temperature": 3}, 422, "temperature"),
        (chat, {"model": "tiny", "messages": hi, "stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
        (chat, {"model": "tiny", "messages": hi, "stop": [""]}, 422, "stop"),
        (chat, {"model": "tiny", "messages": hi, "logprobs": True, "top_logprobs": 21}, 422, "top_logprobs"),
        (chat, {"model": "tiny", "messages": hi, "top_logprobs": 2}, 400, "needs logprobs: true"),
        (chat, {"model": "tiny", "messages": hi, "max_tokens": 3, "max_completion_tokens": 4}, 422, "differ"),
        (chat, {"model": "tiny", "messages": hi, "tools": [{"type": "function"}]}, 400, "tools"),
        (chat, {"model": "tiny", "messages": hi, "user": "u" * 300}, 422, "user"),
        (chat, {"model": "tiny", "messages": hi, "seed": "abc"}, 422, "seed"),
        (chat, {"model": "tiny", "messages": hi, "stream_options": {"include_usage": True}}, 400, "stream is true"),
        (chat, {"model": "tiny", "messages": hi, "stream": True, "stream_options": {"x": 1}}, 400, "x"),
        (chat, {"model": "tiny", "messages": hi, "frobnicate": 1}, 400, "unrecognized request argument: frobnicate"),
        (chat, [1, 2, 3], 422, "body"),
        (comp, {"model": "tiny"}, 422, "prompt"),
        (comp, {"prompt": "x"}, 422, "model"),
        (comp, {"model": "", "prompt": "x"}, 422, "model"),
        (comp, {"model": "tiny", "prompt": "x", "logprobs": 6}, 422, "logprobs"),
        (comp, {"model": "tiny", "prompt": "x", "echo": True}, 400, "echo"),
        (comp, {"model": "tiny", "prompt": "x", "logit_bias": {"1": 2}}, 400, "logit_bias"),
        (comp, {"model": "tiny", "prompt": "x", "best_of": 2}, 400, "best_of"),
        (comp, {"model": "tiny", "prompt": ""}, 400, "prompt is empty"),
    ]
    cases += [(_post(path, body), status, fragment) for path, body, status, fragment in more]
    cases.append((_post(comp, None, raw=b""), 400, "request body is empty"))
    assert len(cases) >= 40
    for resp, status, fragment in cases:
        assert resp.status_code == status, (status, resp.status_code, resp.text)
        assert fragment in resp.json()["error"]["message"], (fragment, resp.text)
    ok = _post(comp, {"model": "tiny:ad01", "prompt": "hello", "max_tokens": 3})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None  # still serving
    metrics = requests.get(f"{URL}/metrics", timeout=30).text
    assert "raypeft_adapter_slot_evictions_total" in metrics


def test_load_200_concurrent_requests_over_16_adapters(server, adapters, tiny_model_dir):
    """4 active slots, 16 adapters, 200 requests at once: no failure, every answer from its own adapter."""
    import httpx
    import requests

    _, ads = adapters
    names = sorted(ads)
    want = {n: _expected(tiny_model_dir, ads[n], "load test", 6) for n in names}
    assert len(set(want.values())) >= 12, "adapters are not distinct enough to tell answers apart"

    async def one(client, i):
        name = names[i % 16]
        r = await client.post(
            f"{URL}/v1/completions",
            json={"model": f"tiny:{name}", "prompt": "load test", "max_tokens": 6},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        return name, r.status_code, r.json()

    async def run():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))

    results = asyncio.run(run())
    failures = [(n, s, b) for n, s, b in results if s != 200]
    assert not failures, failures[:3]
    wrong = [(n, b["choices"][0]["text"]) for n, s, b in results if b["choices"][0]["text"] != want[n]]
    assert not wrong, wrong[:3]
    metrics = _scrape(requests.get(f"{URL}/metrics", timeout=30).text)
    assert float(metrics["raypeft_adapter_slot_evictions_total"]) > 0  # 16 adapters through 4 slots
    assert float(metrics["raypeft_batch_rows_total"]) > float(
        metrics["raypeft_engine_steps_total"]
    )  # rows shared steps


def test_overload_gets_503_with_retry_after(server, tiny_model_dir):
    """A second app with a queue of 1: a burst gets 503 + Retry-After, never another 5xx."""
    import httpx
    from ray import serve

    from serving.app import build_app
    from serving.spec import validate

    spec = validate(
        {
            "name": "tiny-small",
            "model": {"base": str(tiny_model_dir), "name": "tiny"},
            "limits": {"max_batch_size": 1, "max_queue": 1, "max_new_tokens": 16},
        }
    )
    serve.run(build_app(spec), name="tiny-small", route_prefix="/small")

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(
                    client.post(f"{URL}/small/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 16})
                    for _ in range(12)
                )
            )

    responses = asyncio.run(run())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503} and 503 in codes and 200 in codes, codes
    assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
    serve.delete("tiny-small")


def test_two_tenants_are_isolated(server, adapters, tiny_model_dir, tmp_path):
    """acme (key from the environment) may use ad00–ad09 and not the base; globex (key from a file) ad10–ad15 and
    the base. Each gets its own adapters' answers, 403 for the other's (and for a name that does not exist: the
    reply is the same), 401 for an unknown key, and a /v1/models listing of its own."""
    import requests
    from openai import OpenAI, PermissionDeniedError
    from ray import serve

    from serving.app import build_app
    from serving.spec import validate

    root, ads = adapters
    (tmp_path / "globex.key").write_text(GLOBEX_KEY + "\n")
    spec = validate(
        {
            "name": "tiny-tenants",
            "model": {"base": str(tiny_model_dir), "name": "tiny"},
            "adapter_roots": [str(root)],
            "cache": {"active_slots": 4, "max_rank": 8},
            "limits": {"max_new_tokens": 16},
            "tenants": {
                "acme": {"key_env": "RPT_ACME_KEY", "adapters": ["ad0*"]},
                "globex": {"key_file": str(tmp_path / "globex.key"), "adapters": ["ad1*"], "base": True},
            },
        }
    )
    serve.run(build_app(spec), name="tiny-tenants", route_prefix="/tenants")
    url = f"{URL}/tenants"

    def post(model, key):
        body = {"model": model, "prompt": "hello world", "max_tokens": 8}
        return requests.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    try:
        for model, key, adapter in (
            ("tiny:ad03", ACME_KEY, "ad03"),
            ("tiny:ad12", GLOBEX_KEY, "ad12"),
            ("tiny", GLOBEX_KEY, None),
        ):
            r = post(model, key)
            assert r.status_code == 200, (model, r.text)
            assert r.json()["choices"][0]["text"] == _expected(tiny_model_dir, ads.get(adapter), "hello world", 8)
        denied = {m: post(m, ACME_KEY) for m in ("tiny:ad12", "tiny:no-such-adapter", "tiny")}
        for m, r in denied.items():
            assert r.status_code == 403, (m, r.text)
            assert r.json()["error"] == {
                "message": f"model {m!r} is not available to this API key",
                "type": "permission_error",
                "code": 403,
            }
        assert post("tiny:ad03", GLOBEX_KEY).status_code == 403
        for key in ("not-a-key", TOKEN, ""):
            r = post("tiny:ad03", key)
            assert r.status_code == 401 and ACME_KEY not in r.text, r.text

        def listing(key):
            r = requests.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30)
            return {m["id"] for m in r.json()["data"]}

        assert listing(ACME_KEY) == {f"tiny:ad{i:02d}" for i in range(10)}
        assert listing(GLOBEX_KEY) == {"tiny"} | {f"tiny:ad{i:02d}" for i in range(10, 16)}
        client = OpenAI(base_url=f"{url}/v1", api_key=ACME_KEY)  # the unmodified client, with a tenant's key
        assert client.completions.create(model="tiny:ad05", prompt="hi", max_tokens=4).choices[0].text is not None
        with pytest.raises(PermissionDeniedError):
            client.completions.create(model="tiny:ad15", prompt="hi", max_tokens=4)
    finally:
        serve.delete("tiny-tenants")


def test_serving_follows_the_alias_without_failed_requests(server, adapters, registry, tiny_model_dir):
    """A request loop against tiny:champ while champion moves 1 → 2: answers switch within the poll
    interval, no request fails, and /v1/models shows the new version."""
    import threading
    import time

    import requests
    from mlflow import MlflowClient

    _, ads = adapters
    old = _expected(tiny_model_dir, ads["ad00"], "abc", 8)
    new = _expected(tiny_model_dir, ads["ad01"], "abc", 8)
    assert old != new
    seen, failures, stop = [], [], threading.Event()

    def loop():
        while not stop.is_set():
            r = _post("/v1/completions", {"model": "tiny:champ", "prompt": "abc", "max_tokens": 8})
            if r.status_code != 200:
                failures.append((r.status_code, r.text))
            else:
                seen.append((time.time(), r.json()["choices"][0]["text"]))
            time.sleep(0.05)

    t = threading.Thread(target=loop)
    t.start()
    try:
        deadline = time.time() + 60  # a slow machine took ~1 s for one request here
        while time.time() < deadline and len(seen) < 3 and not failures:
            time.sleep(0.05)
        assert len(seen) >= 3 and all(text == old for _, text in seen), (seen, failures[:3])
        moved_at = time.time()
        MlflowClient(registry, registry_uri=registry).set_registered_model_alias("tiny-chat", "champion", "2")
        deadline = moved_at + 20
        while time.time() < deadline and not any(ts > moved_at and text == new for ts, text in seen):
            time.sleep(0.1)
        switched = [ts for ts, text in seen if ts > moved_at and text == new]
        assert switched, "answers never switched to version 2"
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(timeout=60)
    assert not failures, failures[:3]
    assert {text for _, text in seen} <= {old, new}
    first_new = min(switched)
    assert all(text == new for ts, text in seen if ts > first_new + 0.2), "answers went back to the old version"
    listing = requests.get(f"{URL}/v1/models", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30).json()
    assert {m["id"]: m for m in listing["data"]}["tiny:champ"]["version"] == "2"
    print(f"alias switch visible after {first_new - moved_at:.2f}s (poll every 0.5s)")

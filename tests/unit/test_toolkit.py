"""The shared toolkit: method.dropout reaches every PEFT method, and an adapter's raypeft.json rebuilds
the model spec training loaded its base with."""

from __future__ import annotations

import json
import os

import pytest

from pipelines.model import trained_base_spec
from pipelines.model.methods.generic import peft_config
from pipelines.spec import SpecError, apply_overrides, validate


@pytest.mark.parametrize(
    ("method", "field"), [("vera", "vera_dropout"), ("boft", "boft_dropout"), ("loha", "module_dropout")]
)
def test_method_dropout_reaches_the_peft_config(method, field):
    spec = validate({"method": {"name": method, "dropout": 0.2, "target_modules": ["q_proj", "v_proj"]}})
    assert getattr(peft_config(spec), field) == 0.2
    default = validate({"method": {"name": method, "target_modules": ["q_proj", "v_proj"]}})
    assert getattr(peft_config(default), field) != 0.2  # unset: PEFT's own default


def test_method_dropout_on_a_method_without_one_names_the_field():
    with pytest.raises(SpecError) as e:
        validate({"method": {"name": "ia3", "dropout": 0.2}})
    assert ("method.dropout", "ia3 has no dropout (got 0.2)") in e.value.problems


def test_trained_base_spec_reads_raypeft_json(tmp_path):
    plan = {r"model\.layers\.0\..*": 8, r"model\.layers\.1\..*": 4}
    meta = {
        "base": "smollm2-135m",
        "revision": None,
        "quantization": "nf4",
        "double_quant": False,
        "dtype": "float32",
        "compute_dtype": "bfloat16",
        "quantization_plan": plan,
        "method": "qlora",
        "job": "j",
    }
    (tmp_path / "raypeft.json").write_text(json.dumps(meta))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/cache/smollm2"}))
    spec = trained_base_spec(tmp_path)
    m = spec.model
    assert (m.base, m.quantization, m.double_quant, m.compute_dtype) == ("smollm2-135m", "nf4", False, "bfloat16")
    assert dict(m.quantization_plan) == plan
    assert spec.module_bits("model.layers.0.mlp.up_proj") == 8 and spec.module_bits("model.layers.2.mlp.up_proj") == 4
    plain = trained_base_spec(tmp_path, quantized=False)
    assert plain.quantization() == "none" and not plain.model.quantization_plan


def test_overrides_walk_one_path_and_leave_the_input_alone():
    raw = {"train": {"lr": 1.0}}
    out = apply_overrides(raw, ["train.lr=1e-4", "method.galore.rank=8"])
    assert out == {"train": {"lr": 1e-4}, "method": {"galore": {"rank": 8}}} and raw == {"train": {"lr": 1.0}}


@pytest.mark.parametrize(
    ("env", "token_file", "mode"),
    [
        ({}, False, None),  # no token anywhere: Ray's own default stays
        ({"RAY_AUTH_TOKEN": "t"}, False, "token"),
        ({}, True, "token"),  # the token file `ray start` wrote
        ({"RAY_AUTH_TOKEN": "t", "RAY_AUTH_MODE": "disabled"}, False, "disabled"),  # the user's choice stands
    ],
)
def test_a_client_with_a_ray_token_turns_token_auth_on(monkeypatch, tmp_path, env, token_file, mode):
    from cluster.connect import token_auth_env

    for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        monkeypatch.setenv(k, "")  # recorded, so what token_auth_env sets is undone after the test
        monkeypatch.delenv(k)
    path = tmp_path / "auth_token"
    if token_file:
        path.write_text("t")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    token_auth_env()
    assert os.environ.get("RAY_AUTH_MODE") == mode


def test_mlflow_credentials_travel_to_workers_and_replicas_only_when_set(monkeypatch):
    from cluster.connect import MLFLOW_CLIENT_ENV, mlflow_runtime_env

    for k in MLFLOW_CLIENT_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracking:5000")  # passed explicitly, not carried
    assert mlflow_runtime_env() is None
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "")  # empty: not set
    assert mlflow_runtime_env() == {"env_vars": {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "pw"}}


def test_a_ray_start_cluster_does_not_inherit_what_was_set_for_the_local_one(monkeypatch):
    """init_ray turns the preemption watcher off for its own local cluster through this process's environment;
    a `ray start` head this process launches (cluster.local) gets Ray's default, unless the user set one."""
    from cluster import connect, local

    monkeypatch.setattr(connect, "_set_for_local", {connect.PREEMPTION_WATCHER: "0"})
    monkeypatch.setenv(connect.PREEMPTION_WATCHER, "0")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    env = local.head_env("token", RAYPEFT_HOME="/h")
    assert connect.PREEMPTION_WATCHER not in env and "RAY_ADDRESS" not in env
    assert env["RAY_AUTH_TOKEN"] == "token" and env["RAYPEFT_HOME"] == "/h"
    monkeypatch.setenv(connect.PREEMPTION_WATCHER, "1")  # the user's own value, set since: it travels
    assert local.head_env("token")[connect.PREEMPTION_WATCHER] == "1"


@pytest.mark.parametrize(
    "address, users, expected",
    [(None, None, "30"), (None, "7", "7"), ("127.0.0.1:6379", None, None)],
    ids=["local", "local-users-own", "ray-address"],
)
def test_a_local_cluster_gives_serves_proxy_time_to_start_on_a_busy_machine(monkeypatch, address, users, expected):
    """A local cluster starts with Serve's proxy ready check at 30 s a try (Ray's 5 s killed a proxy that a
    busy 2-core machine started too slowly, and ``serve.start`` failed); a user's own value wins; a cluster
    in RAY_ADDRESS keeps its own. (``ray.init`` is recorded, not run: the environment it would start with.)"""
    import ray

    from cluster import connect

    started = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: started.update(env=os.environ.get(connect.SERVE_PROXY_READY)))
    monkeypatch.setattr(connect, "token_auth_env", lambda: False)
    monkeypatch.setattr(connect, "_set_for_local", {})
    for name in (connect.PREEMPTION_WATCHER, "RAY_TRAIN_ENABLE_PRINT_PATCH", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)  # restored after the test, whatever init_ray sets
    for name, value in (("RAY_ADDRESS", address), (connect.SERVE_PROXY_READY, users)):
        monkeypatch.delenv(name, raising=False) if value is None else monkeypatch.setenv(name, value)
    connect.init_ray(include_dashboard=False)
    assert started["env"] == expected
    # a `ray start` head this process launches is not given raypeft's value (cluster.local.head_env)
    assert (connect.SERVE_PROXY_READY in connect.set_for_local_cluster()) == (expected == "30")


def test_a_local_tracking_store_is_not_probed():
    from pipelines.tracking import check_server

    check_server("sqlite:////nonexistent/dir/mlflow.db")  # no request, no error: only HTTP servers are probed
    check_server("/some/dir/mlruns")


def test_an_unreachable_tracking_server_is_named_at_once():
    from cluster.connect import free_port
    from pipelines.spec import UserError
    from pipelines.tracking import check_server

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens
    with pytest.raises(UserError, match=f"cannot reach the MLflow tracking server at {url}"):
        check_server(url)


def test_a_slow_tracking_server_gets_mlflows_own_request_timeout(monkeypatch):
    """A server that is up but answers late is waited for as long as MLflow's client would wait
    (MLFLOW_HTTP_REQUEST_TIMEOUT): past it, the error says how long it waited and which setting to raise."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pipelines.spec import UserError
    from pipelines.tracking import check_server

    class Slow(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            time.sleep(2)
            body = b'{"experiments": []}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
        with pytest.raises(UserError, match=r"waited up to 1 s, MLFLOW_HTTP_REQUEST_TIMEOUT"):
            check_server(url)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        check_server(url)  # answered after 2 s: the job goes on
    finally:
        httpd.shutdown()


def test_a_temporary_global_tracking_uri_leaves_nothing_pinned(monkeypatch, tmp_path):
    """After ``_global_uri``, a MLFLOW_TRACKING_URI exported later still counts: the process is not pinned
    to whatever mlflow's default was (a CI run failed that way, reading artifacts from a default SQLite)."""
    import mlflow

    from pipelines.tracking import _global_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow.set_tracking_uri(None)
    with _global_uri(f"sqlite:///{tmp_path / 'a.db'}"):
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'a.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://later:5000")
    assert mlflow.get_tracking_uri() == "http://later:5000"

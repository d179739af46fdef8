"""A real MLflow tracking server, as a cluster uses one: `mlflow server` with the basic-auth app and
`--serve-artifacts`, on a free port, started and stopped by this module in a process group of its own.
Clients hold only the URL and credentials: artifacts go through the server (`mlflow-artifacts:`), never
to the store's directory.

Training (rank 0 logs its steps from a Ray worker started before the credentials were set, so they can
only arrive through raypeft's runtime env), `raypeft tune`, gated `raypeft promote` from two processes
with separate RAYPEFT_HOMEs racing, and `raypeft serve` with a registry alias all run against it over
HTTP. A wrong password is one clear error naming the server, exit 2, before Ray starts."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cluster.local import BIN
from tests.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USER = "admin"
PASSWORD = secrets.token_hex(12)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import requests

    d = tmp_path_factory.mktemp("mlflow-server")
    ini = d / "basic_auth.ini"
    # auth_cache_ttl_seconds: MLflow's cache of good credentials (off by default), as docs/deployment.md advises;
    # without it every request pays a scrypt check (0.11 CPU-s here): 130 CPU-s of this module, 41 with it
    ini.write_text(
        "[mlflow]\ndefault_permission = READ\nauth_cache_ttl_seconds = 300\n"
        f"database_uri = sqlite:///{d / 'auth.db'}\nadmin_username = {USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),  # CSRF protection of the auth app
    }
    for k in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(k, None)
    cmd = [
        str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{d / 'mlflow.db'}", "--serve-artifacts",
        "--artifacts-destination", str(d / "artifacts"), "--workers", "1",
    ]  # fmt: skip
    log = open(d / "server.log", "wb")  # noqa: SIM115 - open for the server's lifetime
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=d)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            assert proc.poll() is None, (d / "server.log").read_text(errors="replace")[-3000:]
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        else:
            raise AssertionError("mlflow server not up after 120 s:\n" + (d / "server.log").read_text()[-3000:])
        # the first authenticated call loads the auth app's stores (slow on a loaded machine): the tests start
        # with a server that has answered one
        requests.get(
            f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 1}, auth=(USER, PASSWORD), timeout=300
        ).raise_for_status()
        yield {"url": url, "artifacts": d / "artifacts"}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _client_env(url: str, home: Path, password: str = PASSWORD) -> dict[str, str]:
    """A client machine's environment: the server's URL and credentials, a home of its own, and no pointer to
    this process's own Ray cluster (each command starts a local one)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return {
        **env,
        "MLFLOW_TRACKING_URI": url,
        "MLFLOW_TRACKING_USERNAME": USER,
        "MLFLOW_TRACKING_PASSWORD": password,
        "RAYPEFT_HOME": str(home),
    }


def _spec(tiny_model_dir, chat_data, name: str, **train) -> dict:
    return {
        "name": name,
        "model": {"base": str(tiny_model_dir)},
        "method": {"name": "lora", "r": 4},
        "data": {"train": str(chat_data), "format": "chat", "max_length": 64, "eval_fraction": 0.2},
        "train": {
            "max_steps": 4,
            "micro_batch_size": 4,
            "lr": 0.01,
            "warmup_steps": 0,
            "eval_every": 0,
            "eval_base": False,
            **train,
        },
        "tracking": {"registered_model": "srv-adapter"},
    }


def test_a_wrong_password_is_one_clear_error_before_ray_starts(server, tiny_model_dir, chat_data, tmp_path):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec(tiny_model_dir, chat_data, "wrong-password")))
    env = _client_env(server["url"], tmp_path / "home", password="not-the-password")
    for cmd in (
        ["train", str(spec_path)],
        ["promote", "srv-adapter", "--version", "1", "--force"],
    ):
        proc = subprocess.run([str(BIN / "raypeft"), *cmd], env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (cmd, proc.stdout[-2000:], proc.stderr[-3000:])
        assert server["url"] in proc.stderr and "refused the credentials (HTTP 401" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert "Started a local Ray instance" not in proc.stdout + proc.stderr  # before any Ray resources


@pytest.fixture(scope="module")
def trained(server, tiny_model_dir, chat_data, tmp_path_factory):
    """Two training jobs in this process against the server, on a local Ray cluster started *before* the
    credentials are in the environment: rank 0 can log its steps only if raypeft carries them to it."""
    import ray

    from cluster.connect import init_ray
    from pipelines.spec import validate
    from pipelines.train import run

    home = tmp_path_factory.mktemp("srv-home")
    ray.shutdown()
    mp = pytest.MonkeyPatch()
    mp.setenv("RAYPEFT_HOME", str(home))
    init_ray(num_cpus=2, include_dashboard=False)
    try:
        for k, v in _client_env(server["url"], home).items():
            if k.startswith("MLFLOW_"):
                mp.setenv(k, v)
        results, spans = [], []
        # the second job also evaluates the base before training: a part of its start-up of its own
        for i, kw in enumerate(({"max_steps": 1, "lr": 1e-4}, {"max_steps": 12, "lr": 0.02, "eval_base": True})):
            spec = validate(_spec(tiny_model_dir, chat_data, f"srv-{i}", **kw))
            t0 = time.time()
            results.append(run(spec, log=lambda *_: None))
            spans.append((t0, time.time()))
        yield {"results": results, "spans": spans, "home": home}
    finally:
        ray.shutdown()
        mp.undo()


def test_training_logs_everything_through_the_server(server, trained):
    from mlflow import MlflowClient

    url = server["url"]
    c = MlflowClient(url, registry_uri=url)
    for result, steps, (t0, t1) in zip(trained["results"], (1, 12), trained["spans"]):
        assert result["tracking_uri"] == url
        run = c.get_run(result["run_id"])
        assert run.info.status == "FINISHED"
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri  # proxied
        history = c.get_metric_history(result["run_id"], "train_loss")  # logged by rank 0, a Ray worker
        assert [m.step for m in history][-1] == steps and all(m.value > 0 for m in history)
        m = run.data.metrics
        assert "worker_rss_mib" in m
        # the start-up, in order and within the call: driver (Ray, data, MLflow run, trainer) → Train's
        # workers up → rank 0's parts → the first step's end, all wall-clock times of this host
        assert t0 < m["train_start_at"] - m["startup_driver_s"] < m["train_start_at"]
        assert m["train_start_at"] < m["worker_started_at"] < m["first_step_at"] < t1
        assert 0 < m["startup_ray_s"] < m["startup_driver_s"]
        # rank 0's parts cover its span to the first step's end, with nothing left out or counted twice
        parts = ("model_load_s", "worker_setup_s", "base_eval_s", "first_step_s")
        assert ("base_eval_s" in m) == (steps == 12)  # measured only where it ran
        assert all(m[k] > 0 for k in parts if k in m)
        covered = sum(m.get(k, 0.0) for k in parts)
        assert abs(m["first_step_at"] - m["worker_started_at"] - covered) < 0.1, (m, covered)
    versions = {v.version for v in c.search_model_versions("name='srv-adapter'")}
    assert versions == {"1", "2"}
    # the artifacts went through the server into its own store
    assert any(server["artifacts"].rglob("adapter_model.safetensors"))


def test_a_sweep_records_every_trial_on_the_server_and_a_slow_driver_loses_no_report(
    server, trained, tiny_model_dir, chat_data, monkeypatch
):
    """`raypeft tune`'s sweep against the server: a parent run, one child run per trial with its evals, and
    the best trial's adapter registered with artifacts proxied by the server.

    The driver logs the first result slowly (a busy server), so the first trial's last report and the end of
    its training function both arrive before Tune asks for its next result. Ray 2.60 deadlocks the trial
    there (tuning/report_order.py); without that fix this sweep never ends."""
    import threading

    from mlflow import MlflowClient

    from tests.conftest import tiny_spec
    from tuning.sweep import MlflowSweepLogger, sweep

    logged = MlflowSweepLogger.on_trial_result
    slowed: list[str] = []

    def slow_first_result(self, iteration, trials, trial, result, **info):
        logged(self, iteration, trials, trial, result, **info)
        if not slowed:
            slowed.append(trial.trial_id)
            time.sleep(20)  # the trial reports step 2, saves, and its fit() returns meanwhile

    monkeypatch.setattr(MlflowSweepLogger, "on_trial_result", slow_first_result)
    spec = tiny_spec(
        tiny_model_dir,
        chat_data,
        name="srv-sweep",
        train={"max_steps": 2, "eval_every": 1},
        scaling={"cpus_per_worker": 0.9},
        tracking={"registered_model": "srv-sweep-best"},
        # one trial: what this test checks is its records and its last report (several trials, at once,
        # are the ASHA test's)
        tune={"space": {"train.lr": {"grid": [0.02]}}, "num_samples": 1, "scheduler": "fifo"},
    )
    box: dict = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", sweep(spec)), daemon=True)
    thread.start()
    thread.join(timeout=400)
    assert "result" in box, "the sweep did not end: a trial's last report never reached Tune"
    result = box["result"]
    assert slowed, "the driver was never slow"
    url = server["url"]
    assert result["tracking_uri"] == url and result["trials"] == 1 and result["failed"] == 0
    c = MlflowClient(url, registry_uri=url)
    assert c.get_run(result["parent_run_id"]).info.status == "FINISHED"
    exp = c.get_run(result["parent_run_id"]).info.experiment_id
    children = c.search_runs([exp], f"tags.mlflow.parentRunId = '{result['parent_run_id']}'")
    assert [child.data.tags["raypeft.trial_id"] for child in children] == slowed  # the slowed trial's own run
    # every report reached the server, the last one included (the one that waited behind the slow driver)
    assert [m.step for m in c.get_metric_history(children[0].info.run_id, "eval_loss")] == [1, 2]
    best = c.get_model_version("srv-sweep-best", str(result["best"]["version"]))
    assert best.run_id == result["best"]["run_id"]
    assert c.get_run(best.run_id).info.artifact_uri.startswith("mlflow-artifacts:")


def test_two_gated_promotions_race_from_two_machines(server, trained, chat_data, tmp_path):
    """Two `raypeft promote` processes with separate RAYPEFT_HOMEs (no shared lock file), started together:
    the alias ends on the better version, and the validation tags name the holder each was judged against."""
    from mlflow import MlflowClient

    url = server["url"]
    gate = tmp_path / "gate.yaml"
    gate.write_text(
        yaml.safe_dump(
            {
                "metric": "eval_loss",
                "mode": "min",
                "data": {"train": str(chat_data), "format": "chat", "max_length": 64, "eval_fraction": 0.2},
            }
        )
    )
    procs = [
        subprocess.Popen(
            [
                str(BIN / "raypeft"),
                "promote",
                "srv-adapter",
                "--version",
                v,
                "--alias",
                "champion",
                "--gate",
                str(gate),
            ],
            env=_client_env(url, tmp_path / f"machine-{v}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in ("1", "2")
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = [p.returncode for p in procs]
    c = MlflowClient(url, registry_uri=url)
    holder = c.get_model_version_by_alias("srv-adapter", "champion").version
    assert holder == "2", (codes, outs)  # 12 steps at lr 0.02 beat 1 step at lr 1e-4 on eval loss
    assert codes[1] == 0, outs[1]
    v1 = c.get_model_version("srv-adapter", "1").tags
    v2 = c.get_model_version("srv-adapter", "2").tags
    if codes[0] == 0:  # version 1 moved first (to an empty alias); 2 then beat it
        assert v2.get("validation.champion.baseline_version") == "1", v2
    else:  # 2 moved first; 1 was judged against 2 (again, if 2 moved meanwhile) and refused
        assert codes[0] == 1 and "refused" in outs[0][1], outs[0]
        assert v1.get("validation.champion.baseline_version") == "2", v1
    history = json.loads(c.get_registered_model("srv-adapter").tags["raypeft.alias_history.champion"])
    assert [h["version"] for h in history] == (["1", "2"] if codes[0] == 0 else ["2"]), history


def test_serve_follows_an_alias_on_the_server(server, trained, tiny_model_dir, tmp_path):
    """`raypeft serve`'s replicas read `models:/srv-adapter@champion` through the server, with the
    credentials raypeft carries to them, and answer as that version does under PEFT."""
    import requests

    from tests.unit.test_engine import _reference

    url = server["url"]
    from mlflow import MlflowClient

    c = MlflowClient(url, registry_uri=url)
    holder = c.get_model_version_by_alias("srv-adapter", "champion").version
    port = free_port()
    spec = {
        "name": "srv-serve",
        "model": {"base": str(tiny_model_dir), "name": "tiny"},
        "adapters": {"champ": "models:/srv-adapter@champion"},
        "limits": {"max_new_tokens": 8, "max_prompt_tokens": 32},
        "deployment": {"port": port},
    }
    spec_path = tmp_path / "serve.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    env = _client_env(url, tmp_path / "home")
    proc = subprocess.Popen(
        [str(BIN / "raypeft"), "serve", str(spec_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        for _ in range(180):
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            time.sleep(1)
        r = requests.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": "tiny:champ", "prompt": "3+4=", "max_tokens": 8},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        from mlflow.artifacts import download_artifacts
        from transformers import AutoTokenizer

        local = download_artifacts(  # the credentials: the `trained` fixture's environment
            c.get_model_version_download_uri("srv-adapter", holder), dst_path=str(tmp_path / "dl"), tracking_uri=url
        )
        tok = AutoTokenizer.from_pretrained(tiny_model_dir)
        ids = tok("3+4=", add_special_tokens=False)["input_ids"]
        want = tok.decode(_reference(tiny_model_dir, _adapter_dir(Path(local)), ids, 8), skip_special_tokens=True)
        assert r.json()["choices"][0]["text"] == want
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)  # raypeft serve deletes its app and its local Ray stops
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _adapter_dir(root: Path) -> Path:
    return next(p.parent for p in root.rglob("adapter_config.json"))


@contextlib.contextmanager
def _faulty_proxy(upstream: str, status: int, failing: tuple[str, ...]):
    """An HTTP proxy to the tracking server that answers ``status`` to every request whose path contains
    one of ``failing``, as a registry behind a broken load balancer or a revoked permission would."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import requests

    class Handler(BaseHTTPRequestHandler):
        def _forward(self):
            if any(f in self.path for f in failing):
                body = json.dumps({"error_code": "INTERNAL_ERROR", "message": f"injected HTTP {status}"}).encode()
                self.send_response(status)
            else:
                n = int(self.headers.get("Content-Length") or 0)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                r = requests.request(self.command, upstream + self.path, headers=headers,
                                     data=self.rfile.read(n) if n else None, timeout=60)  # fmt: skip
                body = r.content
                self.send_response(r.status_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PATCH = do_DELETE = _forward

        def log_message(self, *_):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("status", [503, 403])
def test_a_registry_that_fails_to_say_who_holds_the_alias_moves_nothing(server, trained, tmp_path, status):
    """Reading the alias's holder fails (5xx after the client's retries, or 403): the promotion stops with
    exit 1 and a message naming the server and the error, and the alias stays where it was. A read that
    failed is never taken for "no holder", which would let any candidate pass with no baseline."""
    from mlflow import MlflowClient

    url = server["url"]
    env = _client_env(url, tmp_path / "home")
    c = MlflowClient(url, registry_uri=url)
    with pytest.MonkeyPatch.context() as mp:
        for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            mp.setenv(k, env[k])
        c.set_registered_model_alias("srv-adapter", "guarded", "1")
        with _faulty_proxy(url, status, ("registered-models/get", "registered-models/alias")) as proxy:
            proc = subprocess.run(
                [str(BIN / "raypeft"), "promote", "srv-adapter", "--version", "2", "--alias", "guarded"],
                env={**env, "MLFLOW_TRACKING_URI": proxy, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
                capture_output=True,
                text=True,
                timeout=300,
            )
        assert proc.returncode == 1, (proc.stdout[-2000:], proc.stderr[-3000:])
        assert proxy in proc.stderr and f"{status}" in proc.stderr and "did not move" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert c.get_model_version_by_alias("srv-adapter", "guarded").version == "1"

"""The service facing untrusted clients: API keys (OpenAI's `Authorization: Bearer KEY`, admin keys for
eval jobs, exempt routes, keys never logged, compared in constant time), what an eval request may name
(configured model ids and SAM, never a path), `lucid serve` refusing a non-loopback host without keys,
and backpressure (Serve's `max_queued_requests` -> a fast 503 with Retry-After, counted in /metrics).

The FastAPI app over the real model in-process (as tests/test_serve_api.py), the `lucid serve` CLI in
subprocesses (as tests/test_cli_serve.py), and one real Ray Serve app on loopback (as
tests/test_serve_ray.py) for the queue limit and the keys over Ray's proxy.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from cli_run import one_error
from fastapi.testclient import TestClient

from serve.api import make_app
from serve.config import AppConfig, ConfigError, read_key_file, with_keys
from serve.runners import LocalBackend

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
LUCID = str(BIN / "lucid")
SCENE = ROOT / "testbed" / "examples" / "scene.png"
URL = "data:image/png;base64," + base64.b64encode(SCENE.read_bytes()).decode()
KEY, OTHER, ADMIN = "sk-user-5c1e0f3a9d", "sk-user2-77aa01", "sk-admin-b04d9e2c"


def body(question: str = "Is there a red circle in the image?", **kw) -> dict:
    content = [{"type": "image_url", "image_url": {"url": URL}}, {"type": "text", "text": question}]
    return {"model": "testbed", "messages": [{"role": "user", "content": content}], **kw}


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def err(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    assert e["code"] == status and e["request_id"] == r.headers["x-request-id"]
    assert set(e) == {"message", "type", "param", "code", "request_id"}
    return e


@pytest.fixture(scope="module")
def backend():
    return LocalBackend(AppConfig())


def app_with(backend, **cfg) -> TestClient:
    return TestClient(make_app(AppConfig(**cfg), backend))


@pytest.fixture(scope="module")
def client(backend):
    return app_with(backend, api_keys=[KEY, OTHER], admin_api_keys=[ADMIN])


# ------------------------------------------------------------------------------------------ key sources


def test_keys_from_the_config_a_file_and_the_environment(tmp_path):
    f = tmp_path / "keys.txt"
    f.write_text(f"# the team's keys\n\n  {KEY}  \n# {OTHER} (revoked)\n{OTHER}x\n")
    assert read_key_file(f) == [KEY, OTHER + "x"]
    a = tmp_path / "admin.txt"
    a.write_text(ADMIN + "\n")
    env = {"LUCID_API_KEYS": f" k-env1 ,, k-env2,{KEY}", "LUCID_ADMIN_API_KEYS": "k-admin-env"}
    cfg = with_keys(AppConfig(api_keys=["k-config"]), f, a, env)
    assert cfg.api_keys == ["k-config", KEY, OTHER + "x", "k-env1", "k-env2"]  # in order, once each
    assert cfg.admin_api_keys == [ADMIN, "k-admin-env"] and cfg.auth
    assert not with_keys(AppConfig(), environ={}).auth
    assert KEY not in repr(cfg) and ADMIN not in repr(cfg)  # repr (logs, tracebacks) leaves keys out


def test_bad_key_files_and_keys_are_refused_without_showing_a_key(tmp_path):
    with pytest.raises(ConfigError, match="cannot read key file"):
        read_key_file(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ConfigError, match="holds no key"):
        read_key_file(empty)
    with pytest.raises(ConfigError, match="key 1: a key is printable ASCII") as e:
        with_keys(AppConfig(), environ={"LUCID_API_KEYS": f"{KEY},sk-tab\tsecret"})
    assert "secret" not in str(e.value)


# ------------------------------------------------------------------------------------------ keys over HTTP


def test_every_v1_route_needs_a_key_others_do_not(client):
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/v1/interventions"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/segment"),
        ("POST", "/v1/evals"),
        ("GET", "/v1/evals/lucid-eval-000000000000"),
        ("GET", "/v1/nothing-here"),  # unknown paths too: a client without a key learns nothing
    ]:
        r = client.request(method, path, json={})
        e = err(r, 401)
        assert e["type"] == "authentication_error" and "Authorization: Bearer" in e["message"], path
        assert r.headers["www-authenticate"].startswith("Bearer"), path
    for path in ["/healthz", "/readyz", "/metrics", "/", "/openapi.json"]:
        assert client.get(path).status_code == 200, path


def test_a_wrong_key_or_scheme_is_401_a_right_key_answers(client):
    for headers in [
        bearer("sk-nope"),
        bearer(KEY + "x"),
        bearer(KEY[:-1]),
        {"authorization": KEY},
        {"authorization": f"Basic {KEY}"},
        bearer(""),
    ]:
        r = client.get("/v1/models", headers=headers)
        e = err(r, 401)
        assert KEY not in r.text
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = client.get("/v1/models", headers=bearer("sk-nope"))
    assert 'error="invalid_token"' in r.headers["www-authenticate"] and e["message"]
    for k in (KEY, OTHER, ADMIN):  # any configured key, admin keys included
        assert client.get("/v1/models", headers=bearer(k)).json()["data"][0]["id"] == "testbed"
    assert client.get("/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200
    r = client.post("/v1/chat/completions", json=body(max_tokens=4), headers=bearer(KEY))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_refusals_are_counted_in_metrics(client):
    client.get("/v1/models", headers=bearer("sk-nope"))
    text = client.get("/metrics").text
    assert 'lucid_request_errors_total{method="-",route="/v1/models",status="401"}' in text


def test_exempt_routes_are_configurable(backend):
    c = app_with(backend, api_keys=[KEY], auth_exempt=["/healthz"])
    assert c.get("/healthz").status_code == 200
    for path in ["/readyz", "/metrics", "/", "/openapi.json"]:
        err(c.get(path), 401)
        assert c.get(path, headers=bearer(KEY)).status_code == 200, path


def test_without_keys_nothing_is_asked(backend):
    c = app_with(backend)
    assert c.get("/v1/models").status_code == 200
    err(c.post("/v1/evals", json={"suites": ["testbed-pope"]}), 503)  # not enabled here: past any auth


def test_eval_jobs_need_an_admin_key(client, backend):
    job = {"suites": ["testbed-pope"]}
    for method, path in [
        ("POST", "/v1/evals"),
        ("GET", "/v1/evals"),
        ("GET", "/v1/evals/lucid-eval-000000000000"),
        ("DELETE", "/v1/evals/lucid-eval-000000000000"),
    ]:
        e = err(client.request(method, path, json=job, headers=bearer(KEY)), 403)
        assert e["type"] == "permission_error" and "admin" in e["message"], path
        err(client.request(method, path, json=job, headers=bearer(ADMIN)), 503)  # allowed (no dashboard here)
    # user keys only: nobody runs eval jobs
    c = app_with(backend, api_keys=[KEY])
    err(c.post("/v1/evals", json=job, headers=bearer(KEY)), 403)


def test_every_key_is_compared_with_compare_digest(monkeypatch, client):
    import hmac

    real, calls = hmac.compare_digest, []

    def counting(a, b):
        calls.append(1)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for k in (KEY, OTHER, ADMIN, "sk-nope"):  # the first key, the last, an admin one, none: all 3 compared
        calls.clear()
        client.get("/v1/models", headers=bearer(k))
        assert len(calls) == 3, k


def test_keys_are_never_logged(backend, caplog, tmp_path):
    broken = tmp_path / "sam_vit_b.pth"
    broken.write_bytes(b"not a checkpoint")  # SAM fails when first used: a 500 with its traceback logged
    cfg = AppConfig(api_keys=[KEY], admin_api_keys=[ADMIN], sam=f"vit_b:{broken}")
    c = TestClient(make_app(cfg, LocalBackend(cfg, vlm=backend.vlm)))
    with caplog.at_level(logging.DEBUG):
        c.get("/v1/models", headers=bearer(KEY + "-wrong"))
        c.get("/v1/models", headers=bearer(KEY))
        r = c.post("/v1/segment", json={"image": URL, "points": [[40, 170, 1]]}, headers=bearer(ADMIN))
    assert r.status_code == 500 and "Traceback" in caplog.text  # a failure with its traceback was logged
    assert KEY not in caplog.text and ADMIN not in caplog.text


def test_the_openai_client_sends_its_api_key(client):
    import openai

    def oa(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)

    r = oa(KEY).chat.completions.create(model="testbed", messages=body()["messages"], max_tokens=4)
    assert r.choices[0].message.content and r.model_extra["lucid"]["request_id"]
    assert [m.id for m in oa(ADMIN).models.list()] == ["testbed"]
    with pytest.raises(openai.AuthenticationError) as e:
        oa("sk-nope").models.list()
    assert e.value.status_code == 401 and e.value.body["code"] == 401
    with pytest.raises(openai.PermissionDeniedError):  # an eval job with a user key, through the client
        oa(KEY).post("/evals", body={"suites": ["testbed-pope"]}, cast_to=dict)


# ------------------------------------------------------------------------------------------ what a client may name


def test_eval_models_are_ids_never_paths(backend, tmp_path):
    real_dir = ROOT / "testbed" / "experiments"
    assert real_dir.is_dir()
    other = tmp_path / "other-ckpt"
    c = app_with(backend, eval_models={"other": str(other)})
    answers = {}
    for name in [str(real_dir), str(ROOT / "no" / "such" / "dir"), "../../etc", "llava-1.5-7b"]:
        e = err(c.post("/v1/evals", json={"suites": ["testbed-pope"], "models": ["testbed", name]}), 400)
        assert e["param"] == "models.1" and "'other', 'testbed'" in e["message"]
        answers[name] = e["message"]
    assert len(set(answers.values())) == 1  # an existing path and a missing one read the same
    assert not any(n in m for n, m in answers.items())
    for ok in (["testbed"], ["other"], ["testbed", "other"], []):  # configured ids pass (503: no dashboard)
        err(c.post("/v1/evals", json={"suites": ["testbed-pope"], "models": ok}), 503)


def test_eval_suites_name_no_sam_path(backend, tmp_path):
    real = tmp_path / "sam_vit_b.pth"
    real.write_bytes(b"x")
    c = app_with(backend)
    msgs = set()
    for spec in [f"vit_b:{real}", f"vit_b:{tmp_path / 'missing.pth'}", f"hf:{tmp_path}", "vit_h"]:
        e = err(c.post("/v1/evals", json={"suites": [f"testbed-segment:n=2,sam={spec}"]}), 400)
        assert e["param"] == "suites.0" and str(tmp_path) not in e["message"]
        msgs.add(e["message"])
    assert len(msgs) == 1
    err(c.post("/v1/evals", json={"suites": ["testbed-segment:sam=testbed"]}), 503)
    err(c.post("/v1/evals", json={"suites": ["testbed-segment:n=2,sam=served"]}), 503)


def test_named_ids_become_the_configured_paths_on_the_command_line(tmp_path):
    from serve.api import eval_names
    from serve.evals import EvalJobs
    from serve.schemas import EvalRequest

    cfg = AppConfig(model="testbed", sam="vit_b:/models/sam.pth", eval_models={"big": "/models/llava-7b"})
    req = eval_names(
        EvalRequest(suites=["testbed-pope", "testbed-segment:n=3,sam=served"], models=["big", "testbed"]),
        cfg,
        "testbed",
    )
    argv = EvalJobs("http://127.0.0.1:1", tmp_path).argv(req, cfg.model, tmp_path / "out")
    assert [argv[i + 1] for i, x in enumerate(argv) if x == "--model"] == ["/models/llava-7b", "testbed"]
    assert "testbed-segment:n=3,sam=vit_b:/models/sam.pth" in argv


# ------------------------------------------------------------------------------------------ lucid serve


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k not in ("LUCID_API_KEYS", "LUCID_ADMIN_API_KEYS")}
    e.update(RAY_USAGE_STATS_ENABLED="0", **(env or {}))
    return subprocess.run([LUCID, "serve", *args], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def taken_port():
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_public_host_without_keys_is_refused(taken_port, tmp_path):
    proc = run_cli("--host", "0.0.0.0", "--port", str(taken_port))
    one_error(proc, "0.0.0.0", "without API keys", "--api-key-file", "--insecure-no-auth")
    assert "Ray" not in proc.stderr
    cfg = tmp_path / "lucid.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "http_options": {"host": "0.0.0.0", "port": taken_port},
                "applications": [
                    {"name": "lucid", "route_prefix": "/", "import_path": "serve.app:build_app", "args": {}}
                ],
            }
        )
    )
    one_error(run_cli("--config", str(cfg)), "without API keys")
    # with keys, or the explicit flag, the check passes (and the taken port is what stops it)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# ops\n{KEY}\n")
    for extra, env in [
        (["--insecure-no-auth"], None),
        (["--api-key-file", str(keys)], None),
        ([], {"LUCID_API_KEYS": KEY}),
        (["--admin-api-key-file", str(keys)], None),
    ]:
        proc = run_cli("--host", "0.0.0.0", "--port", str(taken_port), *extra, env=env)
        one_error(proc, f"cannot listen on 0.0.0.0:{taken_port}")
        assert KEY not in proc.stderr + proc.stdout
    one_error(run_cli("--port", str(taken_port)), f"cannot listen on 127.0.0.1:{taken_port}")  # loopback: fine


def test_bad_key_files_are_one_line(tmp_path):
    one_error(run_cli("--api-key-file", str(tmp_path / "missing.txt")), "cannot read key file")
    (tmp_path / "k.txt").write_text("# only a comment\n")
    one_error(run_cli("--admin-api-key-file", str(tmp_path / "k.txt")), "holds no key")
    (tmp_path / "k.txt").write_text("sk-good\nsk-bad\x07key\n")
    proc = run_cli("--api-key-file", str(tmp_path / "k.txt"))
    one_error(proc, "key 1")
    assert "sk-good" not in proc.stderr and "sk-bad" not in proc.stderr


# ------------------------------------------------------------------------------------------ over Ray Serve


@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    """`lucid serve` with keys (a file and the environment) and a VLM queue of one request."""
    tmp = tmp_path_factory.mktemp("serve-auth")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = {
        "vlm_cpus": 0.5,
        "sam_cpus": 0.25,
        "ingress_cpus": 0.25,
        "evals": False,
        "batching": False,
        "max_batch_size": 1,
        "max_ongoing_requests": 1,
        "max_queued_requests": 1,
        "retry_after_s": 2,
        "admin_api_keys": [ADMIN],
    }
    doc = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "lucid", "route_prefix": "/", "import_path": "serve.app:build_app", "args": args}],
    }
    (tmp / "lucid.yaml").write_text(yaml.safe_dump(doc))
    (tmp / "keys.txt").write_text(f"# clients\n{KEY}\n")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "LUCID_API_KEYS": OTHER}
    log = (tmp / "serve.log").open("w+")
    proc = subprocess.Popen(
        [LUCID, "serve", "--config", str(tmp / "lucid.yaml"), "--api-key-file", str(tmp / "keys.txt")],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while "ready at" not in (tmp / "serve.log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp / "serve.log").read_text()[-4000:]
            time.sleep(0.3)
        yield url, tmp / "serve.log"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def test_keys_over_ray_serve_with_the_openai_client(ray_server):
    import openai

    url, log = ray_server
    for k in (KEY, OTHER, ADMIN):  # the file's, the environment's, the config's admin key
        assert [m.id for m in openai.OpenAI(base_url=f"{url}/v1", api_key=k).models.list()] == ["testbed"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="sk-nope", max_retries=0).models.list()
    r = httpx.get(f"{url}/v1/models")
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{url}/healthz").status_code == 200
    text = log.read_text()
    assert "API keys required" in text and "2 key(s), 1 admin key(s)" in text
    assert KEY not in text and OTHER not in text and ADMIN not in text


def test_over_the_queue_limit_is_a_fast_503_with_retry_after(ray_server):
    url, _ = ray_server
    h = bearer(KEY)
    slow = body("Describe the image in detail.", max_tokens=256, grounding={"heatmap": True})
    with httpx.Client(base_url=url, timeout=120, headers=h) as c:
        assert c.post("/v1/chat/completions", json=body(max_tokens=2)).status_code == 200  # warm

        def post(_):
            t = time.perf_counter()
            r = c.post("/v1/chat/completions", json=slow)
            return r, time.perf_counter() - t

        with ThreadPoolExecutor(10) as pool:
            got = list(pool.map(post, range(10)))
        codes = sorted(r.status_code for r, _ in got)
        assert codes.count(200) >= 2 and codes.count(503) >= 1 and set(codes) == {200, 503}, codes
        slowest_ok = max(dt for r, dt in got if r.status_code == 200)
        for r, dt in got:
            if r.status_code == 503:
                e = err(r, 503)
                assert e["type"] == "overloaded" and "queue limit" in e["message"]
                assert r.headers["retry-after"] == "2"
                assert dt < slowest_ok  # refused without waiting for the work ahead
        assert c.post("/v1/chat/completions", json=body(max_tokens=2)).status_code == 200  # serving again
        text = c.get("/metrics").text
    rejected = [x for x in text.splitlines() if x.startswith("lucid_rejected_total{")]
    assert rejected and 'deployment="VLMServer"' in rejected[0] and 'route="/v1/chat/completions"' in rejected[0]
    assert float(rejected[0].split()[-1]) == codes.count(503)
    assert 'lucid_deployment_limit{deployment="VLMServer",limit="max_queued_requests"} 1.0' in text
    assert 'lucid_deployment_limit{deployment="VLMServer",limit="max_ongoing_requests"} 1.0' in text


def test_a_streamed_chat_over_the_queue_limit_is_a_503_before_the_stream(ray_server):
    url, _ = ray_server
    slow = body("Describe the image in detail.", max_tokens=256, stream=True)
    with httpx.Client(base_url=url, timeout=120, headers=bearer(KEY)) as c:
        assert c.get("/v1/models").status_code == 200  # the ingress knows the model id: only chats queue

        def post(_):
            with c.stream("POST", "/v1/chat/completions", json=slow) as r:
                text = "".join(r.iter_text())
            return r.status_code, r.headers, text

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(post, range(8)))
    codes = sorted(code for code, _, _ in got)
    assert 200 in codes and 503 in codes and set(codes) == {200, 503}, codes
    for code, headers, text in got:
        if code == 503:  # the service's error body and Retry-After, not an error event in a 200 stream
            assert json.loads(text)["error"]["type"] == "overloaded" and headers["retry-after"] == "2"
        else:
            assert text.rstrip().endswith("data: [DONE]") and '"error"' not in text

"""The service as users run it: `lucid serve --config FILE` (a real Ray instance, Serve on loopback, two VLM
replicas, a SAM replica, the FastAPI ingress) in a subprocess, driven over HTTP by the official `openai`
client, httpx and headless Chromium; stopped with SIGTERM at the end.

One server for the module (about 20 s to start on 2 cores); every test talks to it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from serve_process import URL, Server, body, free_port

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SCENE = ROOT / "testbed" / "examples" / "scene.png"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    images = tmp / "images"
    images.mkdir()
    shutil.copy(SCENE, images / "scene.png")
    port = free_port()
    doc = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "lucid",
                "route_prefix": "/",
                "import_path": "serve.app:build_app",
                "args": {
                    "vlm_replicas": 2,
                    "vlm_cpus": 0.5,
                    "sam_cpus": 0.25,
                    "ingress_cpus": 0.25,
                    "max_batch_size": 8,
                    "batch_wait_timeout_s": 0.05,
                    "image_root": str(images),
                    "eval_root": str(tmp / "evals"),
                    "max_image_bytes": 2**20,
                },
            }
        ],
    }
    config = tmp / "lucid.yaml"
    config.write_text(yaml.safe_dump(doc))
    with Server(config, port) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def test_the_config_file_is_a_serve_deploy_config(server, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from serve.config import read_config, serve_document

    config = Path(server.proc.args[-1])
    ServeDeploySchema(**yaml.safe_load(config.read_text()))  # `serve deploy FILE` takes it
    cfg, http_options, _ = read_config(config)
    assert cfg.vlm_replicas == 2 and http_options.host == "127.0.0.1"
    ServeDeploySchema(**serve_document(cfg))


def test_openai_client_plain_streaming_and_extensions(server):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused")
    msgs = body("Describe the image.")["messages"]
    r = client.chat.completions.create(model="testbed", messages=msgs, max_tokens=24, temperature=0)
    text = r.choices[0].message.content
    assert text and r.usage.completion_tokens > 3 and r.model == "testbed"
    stream = client.chat.completions.create(model="testbed", messages=msgs, max_tokens=24, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == text and len(pieces) > 5
    r = client.chat.completions.create(
        model="testbed",
        messages=msgs,
        max_tokens=24,
        extra_body={"interventions": [{"name": "vhr", "params": {"alpha": 1.5}}], "grounding": {"locate": True}},
    )
    lucid = r.model_extra["lucid"]
    assert lucid["plan"][0]["name"] == "vhr" and lucid["plan"][0]["params"]["alpha"] == 1.5
    assert lucid["located"] and all(len(o["box"]) == 4 for o in lucid["located"])
    r = client.chat.completions.create(
        model="testbed",
        messages=body("What color is the circle?")["messages"],
        max_tokens=4,
        extra_body={"interventions": [{"name": "carve", "params": {"preset": "paper"}}]},
    )
    views = r.model_extra["lucid"]["views"]  # what CARVE made: a picture, and its box / mask / regions
    assert base64.b64decode(views["png"])[:4] == b"\x89PNG" and len(views["carve"]["box"]) == 4
    assert views["carve"]["mask"]["counts"] and views["carve"]["regions"][0] >= 1
    with pytest.raises(BadRequestError, match="valid: carve, dyvte, magnifier, pai, paint, var, vcd, vhr"):
        client.chat.completions.create(model="testbed", messages=msgs, extra_body={"interventions": [{"name": "x"}]})


def test_concurrent_requests_with_different_plans_get_their_solo_answers(http):
    """16 requests over 4 plans x 4 questions at once: batched by plan inside a replica, spread over the two
    replicas; each answer equals the one the same request gets alone."""
    plans = [[], [{"name": "vhr"}], [{"name": "pai", "params": {"gamma": 1.0}}], [{"name": "paint"}]]
    questions = ["Describe the image.", "Is there a red circle in the image?", "What color is the circle?"]
    questions.append("How many squares are there?")
    reqs = [body(q, max_tokens=16, interventions=p) for p in plans for q in questions]
    solo = [http.post("/v1/chat/completions", json=r).json() for r in reqs]
    assert all("choices" in s for s in solo), solo
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: http.post("/v1/chat/completions", json=r).json(), reqs))
    for s, t, r in zip(solo, together, reqs):
        assert t["choices"][0]["message"]["content"] == s["choices"][0]["message"]["content"], r
        assert t["lucid"]["plan"] == s["lucid"]["plan"]
    sizes = [t["lucid"]["timings"]["batch_size"] for t in together]
    pids = {t["lucid"]["timings"]["replica_pid"] for t in together}
    assert max(sizes) > 1, sizes  # some requests shared a batch
    assert len(pids) == 2, pids  # both replicas answered


def test_errors_leave_the_server_serving(http, server):
    big = base64.b64encode(os.urandom(2 * 2**20)).decode()
    cases = [
        (body("Describe the image.", url="data:image/png;base64," + big), 413),
        (body("Describe the image.", url="data:image/png;base64,aGVsbG8="), 400),
        (body("Describe the image.", url="../../etc/passwd"), 400),
        ({"messages": "nope"}, 422),
        (body("Describe the image.", interventions=[{"name": "var", "params": {"p": 9}}]), 400),
    ]
    for req, status in cases:
        r = http.post("/v1/chat/completions", json=req)
        assert r.status_code == status, r.text
        assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    r = http.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 422
    ok = http.post("/v1/chat/completions", json=body("Describe the image.", url="scene.png", max_tokens=8))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    assert server.proc.poll() is None


def test_segment_over_rest(http):
    r = http.post("/v1/segment", json={"image": "scene.png", "query": "the red circle"})
    assert r.status_code == 200, r.text
    (o,) = r.json()["objects"]
    assert o["label"] == "the red circle" and o["mask"]["size"] == [192, 192] and o["score"] > 0.5
    r = http.post("/v1/segment", json={"image": URL, "points": [[40, 170, 1]], "boxes": [[10, 140, 70, 191]]})
    assert r.status_code == 200 and len(r.json()["objects"]) == 1


def test_listings_health_and_metrics(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json()["ready"] is True
    assert http.get("/v1/models").json()["data"][0]["id"] == "testbed"
    names = [d["name"] for d in http.get("/v1/interventions").json()["data"]]
    assert names == ["carve", "dyvte", "magnifier", "pai", "paint", "var", "vcd", "vhr"]
    assert "/v1/chat/completions" in http.get("/openapi.json").json()["paths"]
    text = http.get("/metrics").text
    assert 'route="/v1/chat/completions"' in text and 'method="vhr"' in text
    assert 'lucid_request_errors_total{method="none",route="/v1/chat/completions",status="413"}' in text


def _wait_status(http, job_id: str, states: set[str], timeout: float) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = http.get(f"/v1/evals/{job_id}").json()
        if st["status"] in states:
            return st
        time.sleep(1.0)
    raise AssertionError(f"job {job_id} not in {states} after {timeout} s: {st}")


def test_eval_jobs_submit_status_results_and_stop(http):
    r = http.post("/v1/evals", json={"suites": ["testbed-pope:n=2"], "limit": 3, "workers": 0, "bootstrap": 50})
    assert r.status_code == 201, r.text
    job = r.json()
    st = _wait_status(http, job["id"], {"SUCCEEDED", "FAILED"}, 300)
    assert st["status"] == "SUCCEEDED", st.get("logs_tail")
    prog = st["progress"]
    assert prog["done"] == prog["total"] >= 9 and prog["state"] == "finished"  # 3 per split, up to 4 splits
    assert st["results"]["testbed-pope:n=2/random"]["testbed"]["baseline"]["n"] == 3
    assert Path(st["report"]).is_file()
    long = http.post("/v1/evals", json={"suites": ["testbed-pope:n=300"], "workers": 0}).json()
    assert http.delete(f"/v1/evals/{long['id']}").status_code == 200
    assert _wait_status(http, long["id"], {"STOPPED", "FAILED", "SUCCEEDED"}, 120)["status"] == "STOPPED"
    assert [j["id"] for j in http.get("/v1/evals").json()["data"]].count(job["id"]) == 1
    bad = http.post("/v1/evals", json={"suites": ["nope"]})
    assert bad.status_code == 400 and "unknown suite" in bad.json()["error"]["message"]
    assert http.get("/v1/evals/lucid-eval-000000000000").status_code == 404


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (make test installs it)")
def test_the_web_page_in_headless_chromium(server, tmp_path):
    """Upload the scene, tick VHR, ask with compare: two answers side by side, risk badges, heatmaps and a
    mask drawn on the red circle (checked in the screenshot's pixels)."""
    import numpy as np
    from PIL import Image
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(server.url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        offered = [m["name"] for m in httpx.get(server.url + "/v1/interventions", timeout=30).json()["data"]]
        shown = page.eval_on_selector_all("#methods .method", "els => els.map(e => e.dataset.method)")
        assert shown == offered and "vhr" in shown  # one box per registered method, in the API's order
        page.set_input_files("#file", str(SCENE))
        page.wait_for_selector("#ask:not([disabled])", timeout=10_000)
        page.fill("#question", "Is there a red circle in the image?")
        page.check("#m-vhr")
        page.fill("[data-param='vhr.alpha']", "1.5")
        page.click("#ask")
        page.wait_for_selector("body[data-done='1']", timeout=120_000)
        assert not page.evaluate("document.body.dataset.error || ''")
        answers = page.locator(".answer").all_inner_texts()
        assert len(answers) == 2 and all(a.strip() for a in answers)
        assert "vhr" in page.locator("#result-intervened h2").inner_text()
        assert page.locator(".risk").count() == 2
        assert page.evaluate("Array.from(document.querySelectorAll('img.heatmap')).every(i => i.naturalWidth > 100)")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        canvas = tmp_path / "canvas.png"
        page.locator("#canvas-intervened").screenshot(path=str(canvas))
        browser.close()
    shot = np.asarray(Image.open(tmp_path / "page.png").convert("RGB")).astype(int)
    assert shot.std() > 20  # a rendered page, not a blank one
    c = np.asarray(Image.open(canvas).convert("RGB").resize((192, 192))).astype(int)
    magenta = (c[..., 0] > 150) & (c[..., 1] < 130) & (c[..., 2] > 100)  # the first mask colour over the image
    ys, xs = np.nonzero(magenta)
    assert len(xs) > 100, "no mask drawn on the canvas"
    assert 15 < xs.mean() < 60 and 150 < ys.mean() < 192, (xs.mean(), ys.mean())  # on the red circle


def test_sigterm_stops_the_server_and_ray(server):
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=60) == 0, "".join(server.err)[-3000:]
    assert any("stopping" in x for x in server.err)
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/healthz", timeout=2)
    json.dumps(server.out)  # the URL was printed on stdout
    assert server.out and server.out[0].strip() == server.url

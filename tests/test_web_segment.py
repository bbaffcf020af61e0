"""The web page's segment form in headless Chromium, against the REST app on the in-process backend (no Ray:
uvicorn in a thread, one torch thread): a READ query and an all-objects (VL-SAM open-ended) request, what the
page posts to /v1/segment and that it draws and lists what the API returned; and, on a server with API keys,
the page's key field: the 401 shown without a key (and with a wrong one), the page working once the key is
entered, the key kept in localStorage and sent as `Authorization: Bearer` on every request to /v1/*."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from uvicorn_server import one_thread_backend, serving

ROOT = Path(__file__).resolve().parent.parent
SCENE = ROOT / "testbed" / "examples" / "scene.png"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


KEY = "sk-page-3f9a1c"


@pytest.fixture(scope="module")
def backend():
    return one_thread_backend()


@pytest.fixture(scope="module")
def url(backend):
    with serving(backend) as u:
        yield u


def done(page, n: str) -> None:
    """Wait for the n-th segment result, or an error shown on the page (then fail with its message)."""
    page.wait_for_function(
        f"document.body.dataset.segmented === '{n}' || !!document.body.dataset.error", timeout=180_000
    )


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (make test installs it)")
def test_segment_form_read_and_all_objects(url, tmp_path):
    from PIL import Image
    from playwright.sync_api import sync_playwright

    posted: list[dict] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.on("request", lambda r: posted.append(json.loads(r.post_data)) if r.url.endswith("/v1/segment") else None)
        page.goto(url + "/")
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        assert page.eval_on_selector_all("#seg-method option", "os => os.map(o => o.value)") == [
            "heads",
            "read",
            "vl-sam",
        ]
        page.set_input_files("#file", str(SCENE))
        page.wait_for_selector("#segment:not([disabled])", timeout=10_000)

        # one READ request
        page.select_option("#seg-method", "read")
        page.fill("#seg-query", "the red circle")
        page.click("#segment")
        done(page, "1")
        assert not page.evaluate("document.body.dataset.error || ''")
        read_items = page.locator("#result-segment li").all_inner_texts()
        page.locator("#canvas-segment").screenshot(path=str(tmp_path / "read.png"))

        # one all-objects request: the method turns to vl-sam and the query is not sent
        page.check("#seg-all")
        assert page.input_value("#seg-method") == "vl-sam" and page.is_disabled("#seg-query")
        page.click("#segment")
        done(page, "2")
        assert not page.evaluate("document.body.dataset.error || ''")
        all_items = page.locator("#result-segment li").all_inner_texts()
        assert "all objects (vl-sam)" in page.locator("#result-segment h2").inner_text()
        page.locator("#canvas-segment").screenshot(path=str(tmp_path / "all.png"))
        browser.close()

    image = posted[0]["image"]
    assert image.startswith("data:image/png;base64,")
    assert posted == [
        {"image": image, "query": "the red circle", "method": "read"},
        {"image": image, "all": True, "method": "vl-sam"},
    ]
    # the page lists exactly what the API returns for the same requests, and paints the first mask
    for req, items, shot in ((posted[0], read_items, "read.png"), (posted[1], all_items, "all.png")):
        res = httpx.post(url + "/v1/segment", json=req, timeout=300).json()
        assert len(items) == len(res["objects"]) >= 1
        for li, o in zip(items, res["objects"]):
            box = ", ".join(f"{v:.0f}" for v in o["box"])
            assert li == f"{o['label']}: box [{box}], mask score {o['score']:.2f} ({o['source']})"
        c = np.asarray(Image.open(tmp_path / shot).convert("RGB").resize((192, 192))).astype(int)
        magenta = (c[..., 0] > 150) & (c[..., 1] < 130) & (c[..., 2] > 100)  # the first mask colour over the image
        x0, y0, x1, y1 = (int(round(v)) for v in res["objects"][0]["box"])
        inside = magenta[y0 + 3 : y1 - 3, x0 + 3 : x1 - 3]  # within the box outline: the mask, not the stroke
        assert inside.size and inside.mean() > 0.3, (shot, inside.mean())
    assert read_items[0].startswith("the red circle:") and read_items[0].endswith("(read)")
    assert all(li.endswith("(vl-sam)") for li in all_items)


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (make test installs it)")
def test_the_page_on_a_server_with_api_keys(backend):
    from playwright.sync_api import sync_playwright

    sent: list[tuple[str, str | None]] = []  # (path, authorization) of every request to /v1/*
    with serving(backend, api_keys=[KEY]) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), args=["--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.on(
            "request",
            lambda r: sent.append((r.url[len(base) :], r.headers.get("authorization"))) if "/v1/" in r.url else None,
        )
        page.goto(base + "/")  # the page itself is exempt; its API calls are not
        page.wait_for_function("!!document.body.dataset.error", timeout=60_000)
        status = page.inner_text("#status")
        assert "401" in status and "missing API key" in status and "enter the server's API key" in status, status
        assert page.evaluate("document.body.dataset.ready") == "0"
        assert page.is_visible("#api-key") and "needed" in page.get_attribute("#api-key", "class")
        assert sent and all(auth is None for _, auth in sent)

        page.fill("#api-key", "sk-wrong")
        page.dispatch_event("#api-key", "change")
        page.wait_for_function("document.body.dataset.error && document.body.dataset.error.includes('invalid')")
        assert "401: invalid API key" in page.inner_text("#status")
        assert "sk-wrong" not in page.inner_text("#status")  # the server never echoes a key

        page.fill("#api-key", KEY)
        page.dispatch_event("#api-key", "change")
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        assert page.inner_text("#status") == "" and "needed" not in (page.get_attribute("#api-key", "class") or "")
        assert page.evaluate("localStorage.getItem('lucid.apiKey')") == KEY

        page.reload()  # the key is kept: the page connects at once
        page.wait_for_selector("body[data-ready='1']", timeout=60_000)
        assert page.input_value("#api-key") == KEY
        n = len(sent)
        page.set_input_files("#file", str(SCENE))
        page.wait_for_selector("#segment:not([disabled])", timeout=10_000)
        page.fill("#seg-query", "the red circle")
        page.click("#segment")
        done(page, "1")
        assert not page.evaluate("document.body.dataset.error || ''")
        assert page.locator("#result-segment li").count() >= 1
        browser.close()
    after = sent[n:]
    assert ("/v1/segment", f"Bearer {KEY}") in after
    keyed = [path for path, auth in sent if auth == f"Bearer {KEY}"]
    assert {"/v1/models", "/v1/interventions", "/v1/segment"} <= set(keyed)
    assert all(auth in (None, "Bearer sk-wrong", f"Bearer {KEY}") for _, auth in sent)

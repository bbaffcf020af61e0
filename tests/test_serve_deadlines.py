"""Deadlines and cancellation, in-process (the embedded model on `LocalBackend`, uvicorn in a thread, no
Ray; the same over Ray Serve in tests/test_serve_faults.py): `vlm.generate`'s `stop` ends rows without
touching the others; a request past its deadline is a 504 (a stream: an error event) and its generation
stops; a client that disconnects, streaming or not, stops its generation, which leaves the replica to the
next request; the engine counts what it stopped."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import httpx
import pytest
from uvicorn_server import one_thread_backend, serving

ROOT = Path(__file__).resolve().parent.parent
URL = "data:image/png;base64," + base64.b64encode((ROOT / "testbed" / "examples" / "scene.png").read_bytes()).decode()
LONG = {"max_tokens": 800, "ignore_eos": True}  # a generation of 800 tokens: several seconds here
DETAIL = "Please describe this image in detail."  # streams tokens for a while


def body(question: str = "Is there a red circle in the image?", **kw) -> dict:
    content = [{"type": "image_url", "image_url": {"url": URL}}, {"type": "text", "text": question}]
    return {"model": "testbed", "messages": [{"role": "user", "content": content}], **kw}


@pytest.fixture(scope="module")
def backend():
    return one_thread_backend()


@pytest.fixture(scope="module")
def url(backend):
    with serving(backend, request_timeout_s=120) as u:
        yield u


def stopped(backend) -> dict:
    return dict(backend.vlm.engine.stopped)


def wait_stopped(backend, before: dict, timeout: float = 60) -> dict:
    """The engine's counts once one more job has been stopped (the worker thread ends it after a step)."""
    end = time.time() + timeout
    while time.time() < end:
        now = stopped(backend)
        if now["jobs"] > before["jobs"] and not backend.vlm.engine.lock.locked():
            return now
        time.sleep(0.05)
    raise AssertionError(f"no job was stopped: {stopped(backend)}")


def test_generate_stop_ends_a_row_and_leaves_the_others_as_they_were(testbed_vlm):
    from vlm import SamplingParams, build_inputs, generate

    vlm = testbed_vlm
    from PIL import Image

    img = Image.open(ROOT / "testbed" / "examples" / "scene.png").convert("RGB")
    qs = ["Describe the image.", "Please describe this image in detail."]  # answers longer than 12 tokens
    inputs = build_inputs(vlm, [img, img], qs)
    sampling = SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = generate(vlm, inputs, sampling)
    steps = []

    def stop():
        steps.append(len(steps))
        return [False, len(steps) >= 3]  # row 1 ends after its third token

    cut = generate(vlm, inputs, sampling, stop=stop)
    assert cut[0].token_ids == alone[0].token_ids and cut[0].finish_reason == "length"
    assert cut[1].finish_reason == "cancelled" and cut[1].token_ids == alone[1].token_ids[:3]

    every = generate(vlm, inputs, sampling, stop=lambda: [True, True])
    assert [len(g.token_ids) for g in every] == [1, 1], "the batch did not stop once every row had"
    assert all(g.finish_reason == "cancelled" for g in every)


def test_a_request_past_its_deadline_is_a_504_and_its_generation_stops(url, backend):
    before = stopped(backend)
    r = httpx.post(url + "/v1/chat/completions", json=body(**LONG, timeout_s=0.5), timeout=60)
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["type"] == "timeout" and err["param"] == "timeout_s" and err["code"] == 504
    after = wait_stopped(backend, before)
    assert after["tokens_left"] - before["tokens_left"] > 0, "the generation ran to its budget"
    ok = httpx.post(url + "/v1/chat/completions", json=body(max_tokens=4), timeout=60)  # the replica is free
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"]
    m = httpx.get(url + "/metrics").text
    assert 'lucid_stopped_total{route="/v1/chat/completions",why="deadline"} 1.0' in m


def test_timeout_s_over_the_server_cap_is_a_400(url):
    r = httpx.post(url + "/v1/chat/completions", json=body(max_tokens=2, timeout_s=10_000), timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "timeout_s", r.text
    seg = httpx.post(url + "/v1/segment", json={"image": URL, "query": "the red circle", "timeout_s": 1e9}, timeout=60)
    assert seg.status_code == 400 and seg.json()["error"]["param"] == "timeout_s", seg.text


def test_a_streamed_request_past_its_deadline_ends_with_an_error_event(url, backend):
    before = stopped(backend)
    events = []
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body(**LONG, stream=True, timeout_s=1.0), timeout=60
    ) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert '"type": "timeout"' in events[-2] and '"code": 504' in events[-2], events[-3:]
    assert len(events) > 3, "no token was streamed before the deadline"
    wait_stopped(backend, before)


def test_a_client_that_disconnects_stops_its_generation(url, backend):
    before = stopped(backend)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after 1 s and closes the connection
        httpx.post(url + "/v1/chat/completions", json=body(**LONG), timeout=httpx.Timeout(60, read=1.0))
    after = wait_stopped(backend, before)
    assert after["tokens_left"] > before["tokens_left"]
    m = httpx.get(url + "/metrics").text
    assert 'lucid_stopped_total{route="/v1/chat/completions",why="disconnect"} 1.0' in m
    assert 'status="499"' in m


def test_a_streaming_client_that_disconnects_stops_its_generation(url, backend):
    before = stopped(backend)
    with httpx.stream("POST", url + "/v1/chat/completions", json=body(DETAIL, **LONG, stream=True), timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(8)]  # a few tokens, then the client leaves
    assert any(x.startswith("data: ") for x in got)
    after = wait_stopped(backend, before)
    assert after["tokens_left"] > before["tokens_left"]
    ok = httpx.post(url + "/v1/chat/completions", json=body(max_tokens=4), timeout=60)
    assert ok.status_code == 200


def test_over_max_inflight_requests_the_ingress_answers_503_before_reading_the_body(backend):
    import threading

    with serving(backend, max_inflight_requests=1, retry_after_s=3) as u:
        busy = threading.Thread(
            target=httpx.post, args=(u + "/v1/chat/completions",), kwargs={"json": body(DETAIL, **LONG), "timeout": 60}
        )
        before = stopped(backend)
        busy.start()
        time.sleep(1.0)  # the first request is generating
        r = httpx.post(u + "/v1/chat/completions", json=body(max_tokens=2), timeout=60)
        assert r.status_code == 503 and r.headers["retry-after"] == "3", r.text
        assert r.json()["error"]["type"] == "overloaded" and "max_inflight_requests" in r.json()["error"]["message"]
        assert httpx.get(u + "/healthz").status_code == 200  # only the model routes are bounded
        m = httpx.get(u + "/metrics").text
        assert 'lucid_rejected_total{deployment="Api",route="/v1/chat/completions"} 1.0' in m
        assert "lucid_inflight_requests 1.0" in m  # the long one
        busy.join(120)
        assert httpx.post(u + "/v1/chat/completions", json=body(max_tokens=2), timeout=60).status_code == 200
        assert stopped(backend) == before  # the first request ran to its end

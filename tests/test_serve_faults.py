"""The service under faults, as users run it (`lucid serve --config FILE`: real Ray, one VLM replica, one
SAM replica, on loopback): a deadline and a client that disconnects stop the generation on the replica;
a VLM replica killed under an in-flight request gives that request a prompt 503 (never a hang), `/readyz`
reads not ready until Serve has restarted it, and the service answers again; the same for the SAM
replica; SIGTERM lets an in-flight request finish (drain) before the server exits.

One server for the module (about 20 s to start); the SIGTERM test is last.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from serve_process import Server, body, free_port, replica_pids, write_config

LONG = {"max_tokens": 800, "ignore_eos": True}  # several seconds of decoding on one thread
DETAIL = "Please describe this image in detail."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    port = free_port()
    args = {
        "vlm_replicas": 1,
        "vlm_cpus": 0.5,
        "sam_cpus": 0.25,
        "ingress_cpus": 0.25,
        "evals": False,
        "ready_timeout_s": 2,
        "drain_timeout_s": 60,
    }
    with Server(write_config(tmp / "lucid.yaml", port, args), port) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def replica_stopped(http) -> dict:
    return http.get("/v1/models").json()["data"][0]["lucid"]["cancelled"]


def wait_for(cond, timeout: float = 120, every: float = 0.2):
    end = time.time() + timeout
    while time.time() < end:
        if (v := cond()) is not None and v is not False:
            return v
        time.sleep(every)
    raise AssertionError("timed out waiting")


def answers(http) -> bool:
    try:
        return http.post("/v1/chat/completions", json=body("Describe the image.", max_tokens=4)).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_deadline_stops_the_generation_on_the_replica(http):
    assert answers(http)  # warm: the first request's imports would eat a short deadline before the model starts
    before = replica_stopped(http)
    r = http.post("/v1/chat/completions", json=body(DETAIL, **LONG, timeout_s=3))
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout", r.text
    after = wait_for(lambda: (s := replica_stopped(http))["jobs"] > before["jobs"] and s)
    assert after["tokens_left"] > before["tokens_left"]


def test_a_client_that_disconnects_stops_the_generation_on_the_replica(http, server):
    before = replica_stopped(http)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body(DETAIL, **LONG), timeout=httpx.Timeout(60, read=1.5))
    after = wait_for(lambda: (s := replica_stopped(http))["jobs"] > before["jobs"] and s)
    assert after["tokens_left"] > before["tokens_left"]
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body(DETAIL, **LONG, stream=True)) as r:
        lines = r.iter_lines()
        [next(lines) for _ in range(8)]  # a few tokens, then the streaming client leaves
    wait_for(lambda: replica_stopped(http)["jobs"] > after["jobs"])
    m = http.get("/metrics").text
    assert 'why="disconnect"' in m


def test_a_killed_vlm_replica_fails_its_request_fast_and_comes_back(http, server):
    (pid,) = replica_pids("VLMServer")
    got: dict = {}

    def in_flight():
        r = httpx.post(server.url + "/v1/chat/completions", json=body(DETAIL, **LONG), timeout=120)
        got.update(status=r.status_code, body=r.json(), headers=r.headers, at=time.perf_counter())

    t = threading.Thread(target=in_flight)
    t.start()
    time.sleep(1.5)  # it is generating
    killed = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=90)
    assert not t.is_alive(), "the in-flight request hung after its replica died"
    assert got["status"] == 503, got
    assert got["body"]["error"]["type"] == "replica_lost" and "retry-after" in got["headers"]
    ready = [http.get("/readyz").status_code]  # Serve is restarting the replica (it loads the checkpoint)
    wait_for(lambda: ready.append(http.get("/readyz").status_code) or ready[-1] == 200, every=0.1)
    assert 503 in ready, ready
    wait_for(lambda: answers(http))
    print(
        f"\nVLM replica killed: 503 after {got['at'] - killed:.2f} s, answering again after "
        f"{time.perf_counter() - killed:.1f} s"
    )
    assert replica_pids("VLMServer") != [pid]


def test_a_killed_sam_replica_fails_fast_and_comes_back(http, server):
    (pid,) = replica_pids("SamServer")
    seg = {"image": body("x")["messages"][0]["content"][0]["image_url"]["url"], "points": [[35, 170, 1]]}
    assert http.post("/v1/segment", json=seg).status_code == 200
    os.kill(pid, signal.SIGKILL)
    statuses = []
    for _ in range(3):  # right after the kill: a 503 or (once restarted) a 200, never a hang or a 500
        r = http.post("/v1/segment", json=seg, timeout=90)
        statuses.append(r.status_code)
        assert r.status_code in (200, 503), r.text
    wait_for(lambda: http.post("/v1/segment", json=seg).status_code == 200)
    assert replica_pids("SamServer") != [pid]


def test_sigterm_lets_the_in_flight_request_finish(server):
    got: dict = {}

    def in_flight():
        r = httpx.post(
            server.url + "/v1/chat/completions", json=body(DETAIL, max_tokens=300, ignore_eos=True), timeout=120
        )
        got.update(status=r.status_code, body=r.json())

    t = threading.Thread(target=in_flight)
    t.start()
    time.sleep(1.5)
    server.proc.send_signal(signal.SIGTERM)
    t.join(timeout=120)
    assert got.get("status") == 200, got
    assert got["body"]["usage"]["completion_tokens"] > 0
    assert server.proc.wait(timeout=90) == 0, "".join(server.err)[-3000:]
    assert any("drained in" in x for x in server.err), "".join(server.err)[-2000:]

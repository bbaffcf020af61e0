"""Eval jobs on a Ray cluster the test starts on loopback (`ray start --head --block`, token auth on: the
head gets RAY_AUTH_MODE=token and a token file of its own through RAY_AUTH_TOKEN_PATH, which every client
must send): 1 vs 2 workers give the same answers; a worker killed mid-run, then the driver,
then a re-run: no sample lost or duplicated and the metrics of an uninterrupted run; `lucid eval
--submit` (JobSubmissionClient) and `ray job submit -- lucid eval ...`.

The head runs on free ports with its own temp dir and is stopped by SIGTERM to its `ray start --block`
process (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from evals.job import JobSpec, make_plan, run_job

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SUITE = "testbed-pope:n=16,seed=4242"


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _env() -> dict:
    """Clients' environment: the token file is known (RAY_AUTH_TOKEN_PATH, set by the `head` fixture);
    `lucid eval` decides to send it by itself (Ray's rule, `evals.job.ray_auth`)."""
    return {
        **os.environ,
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    import secrets

    gcs, dash = _free_port(), _free_port()
    temp = Path(f"/tmp/lucid-ray-{os.getpid()}-{gcs}")  # short: Ray's socket paths have a length limit
    token = tmp_path_factory.mktemp("auth") / "auth_token"
    token.write_text(secrets.token_hex(32))
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")}
    os.environ.pop("RAY_AUTH_MODE", None)  # clients (this process too) follow Ray's rule: a token is there
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    env = {**_env(), "RAY_AUTH_MODE": "token"}  # the head: token auth on
    log = tmp_path_factory.mktemp("head") / "head.log"
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs)]
        + ["--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true"]
        + ["--num-cpus", "2", "--temp-dir", str(temp), "--disable-usage-stats"],
        env=env,
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{dash}/api/version", timeout=1)
            raise RuntimeError("the head answered a request without its token: token auth is not on")
        except urllib.error.HTTPError as e:  # 401: up, and token auth is on
            assert e.code == 401, e
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"ray head did not start: {log.read_text()[-3000:]}") from None
            time.sleep(0.5)
    yield {"gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}"}
    import ray

    if ray.is_initialized():
        ray.shutdown()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    import shutil

    shutil.rmtree(temp, ignore_errors=True)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _answers(out: Path) -> dict:
    got = {}
    for f in sorted((out / "samples").rglob("*.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            key = (f.relative_to(out).as_posix(), r["id"])
            assert key not in got, f"duplicated sample {key}"
            got[key] = r["answer"]
    return got


@pytest.fixture(scope="module")
def uninterrupted(head, tmp_path_factory):
    """The job with 1 worker and with 2 workers on the cluster (batch size 3): their per-sample answers."""
    runs = {}
    for workers in (1, 2):  # this process is the driver (evals.job.ray_auth sends the head's token)
        out = tmp_path_factory.mktemp(f"w{workers}")
        spec = JobSpec(
            suites=(SUITE,), out=out, workers=workers, batch_size=3, bootstrap=200, progress=False, address=head["gcs"]
        )
        runs[workers] = (out, run_job(spec, make_plan(spec), log=lambda m: None))
    return runs


def test_one_and_two_workers_give_the_same_answers(uninterrupted):
    (out1, res1), (out2, res2) = uninterrupted[1], uninterrupted[2]
    a1, a2 = _answers(out1), _answers(out2)
    assert len(a1) > 200 and a1 == a2
    assert res1["results"] == res2["results"]
    pids = {w["pid"] for w in res2["throughput"][0]["workers_info"]}
    assert len(pids) == 2 and pids != {os.getpid()}
    for w in res2["throughput"][0]["workers_info"]:
        assert w["torch_threads"] == 1  # num_cpus=1 each: two replicas never share a core


class _Driver:
    """`lucid eval` in its own session; stderr collected line by line."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen(
            [str(BIN / "lucid"), "eval", *args],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def wait_for(self, cond, timeout: float, what: str):
        deadline = time.time() + timeout
        while time.time() < deadline:
            v = cond()
            if v:
                return v
            if self.proc.poll() is not None:
                break
            time.sleep(0.1)
        raise AssertionError(f"{what}: not seen in {timeout} s; stderr: {''.join(self.lines)[-3000:]}")


def _count(out: Path) -> int:
    return sum(len(f.read_text().splitlines()) for f in (out / "samples").rglob("*.jsonl")) if out.exists() else 0


def test_kill_a_worker_then_the_driver_then_resume(head, uninterrupted, tmp_path):
    out = tmp_path / "killed"
    args = ["--suite", SUITE, "--address", head["gcs"], "--workers", "2", "--batch-size", "3"]
    args += ["--bootstrap", "200", "--out", str(out)]
    d = _Driver(args)

    def worker_pids():
        pids = [int(x.split(" pid ")[1].split(",")[0]) for x in d.lines if " ready: " in x]
        return pids if len(pids) == 2 else None

    pids = d.wait_for(worker_pids, 120, "two workers ready")
    d.wait_for(lambda: _count(out) >= 20, 120, "20 answers on disk")
    os.kill(pids[0], signal.SIGKILL)  # a replica dies mid-run: Ray restarts it and retries its batches
    at_kill = _count(out)
    d.wait_for(lambda: _count(out) >= at_kill + 40, 120, "answers after the worker was killed")
    d.proc.send_signal(signal.SIGKILL)  # then the driver
    d.proc.wait(timeout=30)
    partial = _count(out)
    total = len(_answers(uninterrupted[1][0]))
    assert partial < total, "the run finished before the driver was killed; make the suite larger"
    time.sleep(1.0)
    again = _Driver(args)  # same --out: resumes
    assert again.proc.wait(timeout=300) == 0, "".join(again.lines)[-3000:]
    resumed = [x for x in again.lines if "resuming: " in x]
    assert resumed and f" of {total} samples" in resumed[0], "".join(again.lines)[-2000:]
    assert int(resumed[0].split("resuming: ")[1].split()[0]) in (partial, partial - 1)  # a torn last line is redone
    got = _answers(out)  # asserts no duplicated (file, id)
    ref = _answers(uninterrupted[1][0])
    assert got == ref  # nothing lost, same answers
    res = json.loads((out / "results.json").read_text())
    assert res["results"] == json.loads(json.dumps(uninterrupted[1][1]["results"]))


def test_submit_through_job_submission_client_and_ray_job_submit(head, tmp_path):
    """`lucid eval --submit` (JobSubmissionClient, logs streamed back) and `ray job submit -- lucid eval`,
    side by side on the 2-CPU head (one worker each)."""
    common = ["--suite", "testbed-pope:n=2", "--bootstrap", "50", "--workers", "1"]
    ours = subprocess.Popen(
        [
            str(BIN / "lucid"),
            "eval",
            "--submit",
            head["dashboard"],
            *common,
            "--limit",
            "4",
            "--out",
            str(tmp_path / "a"),
        ],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    rays = subprocess.Popen(  # Ray's own CLI needs RAY_AUTH_MODE=token exported (README)
        [str(BIN / "ray"), "job", "submit", "--address", head["dashboard"], "--", "lucid", "eval", *common]
        + ["--limit", "3", "--out", str(tmp_path / "b")],
        cwd=ROOT,
        env={**_env(), "RAY_AUTH_MODE": "token"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out_a, err_a = ours.communicate(timeout=300)
    out_b, err_b = rays.communicate(timeout=300)
    assert ours.returncode == 0, err_a[-3000:] + out_a[-3000:]
    assert "submitted raysubmit_" in err_a and "SUCCEEDED" in err_a
    assert "testbed-pope:n=2/random  testbed  baseline  n=4" in out_a  # the job's own output, streamed back
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["n_samples"]["testbed-pope:n=2/random"] == 4
    assert rays.returncode == 0, err_b[-3000:] + out_b[-3000:]
    assert "succeeded" in (out_b + err_b).lower()
    res = json.loads((tmp_path / "b" / "results.json").read_text())
    assert res["config"]["workers"] == 1 and res["n_samples"]["testbed-pope:n=2/random"] == 3

"""The service under load and faults: `python -m lucid.bench.service soak|overload|recovery|abandon|auth [--write F]`.

Each runs `lucid serve --config FILE` in a subprocess (real Ray Serve on loopback, as users run it) and
drives it over HTTP:

* `soak --n N`: N mixed requests (chat with and without methods, streamed chat, segment, bad requests,
  clients that disconnect, deadlines) from `--clients` threads against 2 VLM replicas; it stops by itself.
  Every request must be answered or refused with a documented status (nothing lost), every answer must
  equal the same request's solo answer, and the replicas' memory is read at start and end.
* `overload`: one VLM replica with `max_queued_requests`; its capacity measured closed-loop, then an
  open-loop arrival rate of 2x and 5x capacity: share answered, share 503, p50 / p99 of the answered and
  of the time to a 503.
* `recovery`: a VLM replica (then the SAM replica) killed with SIGKILL under load; time until the service
  answers again.
* `abandon`: a short request right after a client left a long generation, against the same request alone.
* `auth`: the cost of API keys per request (no keys, 1 key, 64 keys), interleaved, in-process (ASGI).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCENE = ROOT / "testbed" / "examples" / "scene.png"
URL = "data:image/png;base64," + base64.b64encode(SCENE.read_bytes()).decode()
HEADING = "Service under load and faults"
DOCUMENTED = {200, 400, 401, 403, 404, 413, 422, 503, 504}


# ------------------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, port: int, args: dict) -> Path:
    """A Lucid config file (a Ray Serve config) serving `args` (AppConfig fields) on loopback:port."""
    doc = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "lucid", "route_prefix": "/", "import_path": "serve.app:build_app", "args": args}],
    }
    path.write_text(yaml.safe_dump(doc))
    return path


class Server:
    """`lucid serve --config FILE` in its own process group; stderr and stdout collected line by line."""

    def __init__(self, config: Path, port: int):
        self.url = f"http://127.0.0.1:{port}"
        bin_dir = Path(sys.executable).parent
        env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.proc = subprocess.Popen(
            [str(bin_dir / "lucid"), "serve", "--config", str(config)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.err: list[str] = []
        self.out: list[str] = []
        threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True).start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any("ready at" in x for x in self.err):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError("lucid serve did not start: " + "".join(self.err)[-4000:])

    def __enter__(self) -> Server:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def replica_pids(deployment: str) -> list[int]:
    """The pids of the live Ray Serve replicas of `deployment` of the app `lucid` (their process title)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"ServeReplica:lucid:{deployment}" in cmd:
            pids.append(int(d.name))
    return sorted(pids)


def rss_mib(pid: int) -> float:
    """A process's resident memory (MiB), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no VmRSS for pid {pid}")


def chat_body(question: str, url: str = URL, **kw) -> dict:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}]
    return {"model": "testbed", "messages": [{"role": "user", "content": content}], **kw}


def _pct(v: list[float], q: float) -> float | None:
    return float(np.percentile(v, q)) if v else None


# ------------------------------------------------------------------------------------------ soak

QUESTIONS = ["Is there a red circle in the image?", "What color is the square?", "Describe the image."]
METHODS = [[], [{"name": "vhr"}], [{"name": "paint"}]]
DETAIL = "Please describe this image in detail."


def _soak_kinds() -> list[str]:
    return ["chat"] * 4 + ["chat_method"] * 3 + ["stream"] * 2 + ["segment"] * 2 + ["bad"] * 2 + ["gone", "deadline"]


def _request(c, kind: str, rng: random.Random, solo: dict) -> dict:
    """One soak request of `kind`: what came back, checked against the solo answers."""
    import httpx

    q = rng.choice(QUESTIONS)
    m = rng.randrange(len(METHODS)) if kind == "chat_method" else 0
    key = f"{q}|{m}"
    t = time.perf_counter()
    rec: dict = {"kind": kind}
    try:
        if kind in ("chat", "chat_method"):
            r = c.post("/v1/chat/completions", json=chat_body(q, max_tokens=16, interventions=METHODS[m]))
            rec["status"] = r.status_code
            if r.status_code == 200:
                rec["equal"] = r.json()["choices"][0]["message"]["content"] == solo[key]
        elif kind == "stream":
            text, status = [], None
            with c.stream("POST", "/v1/chat/completions", json=chat_body(q, max_tokens=16, stream=True)) as r:
                status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: {") and '"delta"' in line:
                        d = json.loads(line[6:])["choices"][0]["delta"]
                        text.append(d.get("content") or "")
            rec["status"] = status
            if status == 200:
                rec["equal"] = "".join(text).strip() == solo[f"{q}|0"]
        elif kind == "segment":
            r = c.post("/v1/segment", json={"image": URL, "query": "the red circle"})
            rec["status"] = r.status_code
            if r.status_code == 200:
                rec["equal"] = r.json()["objects"][0]["mask"] == solo["segment"]
        elif kind == "bad":
            bad = rng.choice(
                [
                    chat_body(q, interventions=[{"name": "no-such-method"}]),
                    chat_body(q, url="data:image/png;base64,aGVsbG8="),
                    {"messages": "nope"},
                    {"image": URL},
                ]
            )
            route = "/v1/segment" if "image" in bad else "/v1/chat/completions"
            r = c.post(route, json=bad)
            rec["status"] = r.status_code
            rec["equal"] = r.status_code in (400, 422) and "error" in r.json()
        elif kind == "gone":  # the client leaves after 0.5 s
            try:
                c.post(
                    "/v1/chat/completions",
                    json=chat_body(DETAIL, max_tokens=400, ignore_eos=True),
                    timeout=httpx.Timeout(60, read=0.5),
                )
                rec["status"] = "answered"
            except httpx.ReadTimeout:
                rec["status"] = "left"
        elif kind == "deadline":
            r = c.post("/v1/chat/completions", json=chat_body(DETAIL, max_tokens=400, ignore_eos=True, timeout_s=0.5))
            rec["status"] = r.status_code
            rec["equal"] = r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    except Exception as e:  # lost: neither answered nor refused
        rec["status"] = f"lost: {type(e).__name__}: {e}"[:200]
    rec["s"] = time.perf_counter() - t
    return rec


def soak(n: int, clients: int = 4, seed: int = 0) -> dict:
    import httpx

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"lucid-soak-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = {"vlm_replicas": 2, "vlm_cpus": 0.5, "sam_cpus": 0.25, "ingress_cpus": 0.25, "evals": False}
    server = Server(write_config(tmp / "lucid.yaml", port, args), port)
    t0 = time.perf_counter()
    try:
        server.wait_ready()
        start_s = time.perf_counter() - t0
        with httpx.Client(base_url=server.url, timeout=120) as c:
            solo = {}
            for q in QUESTIONS:
                for m, plan in enumerate(METHODS):
                    r = c.post("/v1/chat/completions", json=chat_body(q, max_tokens=16, interventions=plan))
                    r.raise_for_status()
                    solo[f"{q}|{m}"] = r.json()["choices"][0]["message"]["content"]
            solo["segment"] = c.post("/v1/segment", json={"image": URL, "query": "the red circle"}).json()["objects"][
                0
            ]["mask"]
            pids = {d: replica_pids(d) for d in ("VLMServer", "SamServer", "Api")}
            rss0 = {f"{d}:{p}": rss_mib(p) for d, ps in pids.items() for p in ps}
            rng = random.Random(seed)
            kinds = [rng.choice(_soak_kinds()) for _ in range(n)]
            seeds = [rng.randrange(2**31) for _ in range(n)]
            t = time.perf_counter()
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover
                tqdm = None
            records: list[dict] = []
            quarters = []  # the VLM replicas' RSS after each quarter of the requests: flat, or still growing?
            bar = tqdm(total=n, desc="soak", unit="req", file=sys.stderr) if tqdm else None
            with ThreadPoolExecutor(clients) as pool:
                for q in range(4):
                    part = range(q * n // 4, (q + 1) * n // 4)
                    futs = [pool.submit(_request, c, kinds[i], random.Random(seeds[i]), solo) for i in part]
                    for f in futs:
                        records.append(f.result())
                        if bar is not None:
                            bar.update()
                    quarters.append([round(rss_mib(p), 1) for p in pids["VLMServer"] if Path(f"/proc/{p}").exists()])
            if bar is not None:
                bar.close()
            wall = time.perf_counter() - t
            rss1 = {}
            for d, ps in pids.items():
                for p in ps:
                    try:
                        rss1[f"{d}:{p}"] = rss_mib(p)
                    except (OSError, ValueError):
                        rss1[f"{d}:{p}"] = None  # the process is gone (it should not be)
            alive = {d: replica_pids(d) == ps for d, ps in pids.items()}
            ready = c.get("/readyz").status_code
    finally:
        server.stop()
    by: dict = {}
    for r in records:
        k = by.setdefault(r["kind"], {"n": 0, "status": {}, "unequal": 0})
        k["n"] += 1
        k["status"][str(r["status"])] = k["status"].get(str(r["status"]), 0) + 1
        k["unequal"] += int(r.get("equal") is False)
    lost = [r for r in records if isinstance(r["status"], str) and r["status"].startswith("lost")]
    undocumented = [r for r in records if isinstance(r["status"], int) and r["status"] not in DOCUMENTED]
    return {
        "n": n,
        "clients": clients,
        "seed": seed,
        "start_s": start_s,
        "wall_s": wall,
        "by_kind": by,
        "lost": len(lost),
        "lost_examples": [r["status"] for r in lost[:5]],
        "undocumented": len(undocumented),
        "unequal": sum(k["unequal"] for k in by.values()),
        "rss_start_mib": rss0,
        "rss_end_mib": rss1,
        "vlm_rss_by_quarter_mib": quarters,
        "replicas_unchanged": alive,
        "ready_after": ready,
    }


# ------------------------------------------------------------------------------------------ overload


def overload(seconds: float = 20.0, queue: int = 4, factors: tuple[float, ...] = (2.0, 5.0)) -> dict:
    import httpx

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"lucid-overload-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = {
        "vlm_replicas": 1,
        "vlm_cpus": 1.0,
        "sam_cpus": 0.25,
        "ingress_cpus": 0.25,
        "evals": False,
        "max_queued_requests": queue,
        "max_inflight_requests": 2 * (8 + queue),
        "max_ongoing_requests": 8,
        "max_batch_size": 8,
    }
    server = Server(write_config(tmp / "lucid.yaml", port, args), port)
    body = chat_body("Is there a red circle in the image?", max_tokens=8)
    out: dict = {"queue": queue, "seconds": seconds}
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=512)) as c:
            for _ in range(4):
                c.post("/v1/chat/completions", json=body).raise_for_status()
            # capacity: closed loop with enough clients to fill the batch and the queue-free ongoing slots
            n_cap = 48
            t = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                rs = list(pool.map(lambda _: c.post("/v1/chat/completions", json=body), range(n_cap)))
            cap = n_cap / (time.perf_counter() - t)
            assert all(r.status_code == 200 for r in rs), [r.status_code for r in rs]
            out["capacity_rps"] = cap
            for f in factors:
                rate = f * cap
                n = int(rate * seconds)
                recs: list[tuple[int, float]] = []
                lock = threading.Lock()

                def one(c=c, recs=recs, lock=lock):
                    s = time.perf_counter()
                    try:
                        st = c.post("/v1/chat/completions", json=body).status_code
                    except httpx.HTTPError:
                        st = -1
                    with lock:
                        recs.append((st, time.perf_counter() - s))

                threads = []
                t = time.perf_counter()
                for i in range(n):  # open loop: arrivals at a fixed rate, whatever the answers do
                    wait = t + i / rate - time.perf_counter()
                    if wait > 0:
                        time.sleep(wait)
                    th = threading.Thread(target=one, daemon=True)
                    th.start()
                    threads.append(th)
                for th in threads:
                    th.join(300)
                ok = [s for st, s in recs if st == 200]
                busy = [s for st, s in recs if st == 503]
                out[f"x{f:g}"] = {
                    "offered_rps": rate,
                    "n": n,
                    "answered": len(ok) / n,
                    "refused_503": len(busy) / n,
                    "other": (n - len(ok) - len(busy)) / n,
                    "p50_ms": 1000 * (_pct(ok, 50) or 0),
                    "p99_ms": 1000 * (_pct(ok, 99) or 0),
                    "p50_503_ms": 1000 * (_pct(busy, 50) or 0),
                    "p99_503_ms": 1000 * (_pct(busy, 99) or 0),
                    "answered_rps": len(ok) / (time.perf_counter() - t),
                }
                time.sleep(2)
    finally:
        server.stop()
    return out


# ------------------------------------------------------------------------------------------ recovery


def recovery(rounds: int = 3) -> dict:
    import httpx

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"lucid-recovery-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = {"vlm_replicas": 1, "vlm_cpus": 1.0, "sam_cpus": 0.25, "ingress_cpus": 0.25, "evals": False}
    server = Server(write_config(tmp / "lucid.yaml", port, args), port)
    chat = chat_body("Is there a red circle in the image?", max_tokens=4)
    seg = {"image": URL, "points": [[35, 170, 1]]}
    out: dict = {"VLMServer": [], "SamServer": [], "first_status": {}}
    try:
        server.wait_ready()
        with httpx.Client(base_url=server.url, timeout=120) as c:
            for dep, route, b in (("VLMServer", "/v1/chat/completions", chat), ("SamServer", "/v1/segment", seg)):
                for _ in range(rounds):
                    c.post(route, json=b).raise_for_status()
                    (pid,) = replica_pids(dep)
                    t = time.perf_counter()
                    os.kill(pid, signal.SIGKILL)
                    first = None
                    while True:
                        try:
                            st = c.post(route, json=b).status_code
                        except httpx.HTTPError:
                            st = -1
                        first = first if first is not None else st
                        if st == 200:
                            break
                        time.sleep(0.05)
                    out[dep].append(time.perf_counter() - t)
                    out["first_status"].setdefault(dep, []).append(first)
    finally:
        server.stop()
    return out


# ------------------------------------------------------------------------------------------ abandon


def abandon(rounds: int = 5) -> dict:
    """Whether a request abandoned by its client delays the next one: one VLM replica (no batching); per
    round, interleaved, a short request alone, a long generation answered in full, and the short request
    sent right after a client left the long generation 0.5 s in."""
    import httpx

    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"lucid-abandon-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    args = {"vlm_replicas": 1, "vlm_cpus": 1.0, "sam_cpus": 0.25, "ingress_cpus": 0.25, "evals": False}
    short = chat_body("Is there a red circle in the image?", max_tokens=4)
    long = chat_body(DETAIL, max_tokens=600, ignore_eos=True)
    out: dict = {"solo_s": [], "long_s": [], "after_abandon_s": []}
    with Server(write_config(tmp / "lucid.yaml", port, args), port) as server:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            for _ in range(2):
                c.post("/v1/chat/completions", json=short).raise_for_status()
            for _ in range(rounds):
                t = time.perf_counter()
                c.post("/v1/chat/completions", json=short).raise_for_status()
                out["solo_s"].append(time.perf_counter() - t)
                t = time.perf_counter()
                c.post("/v1/chat/completions", json=long).raise_for_status()
                out["long_s"].append(time.perf_counter() - t)
                try:
                    httpx.post(server.url + "/v1/chat/completions", json=long, timeout=httpx.Timeout(60, read=0.5))
                except httpx.ReadTimeout:
                    pass
                t = time.perf_counter()
                c.post("/v1/chat/completions", json=short).raise_for_status()
                out["after_abandon_s"].append(time.perf_counter() - t)
            out["replica"] = c.get("/v1/models").json()["data"][0]["lucid"]["cancelled"]
    return out


# ------------------------------------------------------------------------------------------ auth


def auth_cost(rounds: int = 2000) -> dict:
    """Per-request time of GET /healthz (made to need a key) with no keys, 1 key and 64 keys configured,
    interleaved request by request, in-process over ASGI (no model, no network)."""
    import asyncio

    import httpx

    from lucid.bench.stats import bootstrap_median
    from serve.api import make_app
    from serve.config import AppConfig

    keys = [f"sk-bench-{i:04d}-{'x' * 24}" for i in range(64)]
    apps = {
        "none": make_app(AppConfig(auth_exempt=[]), None),
        "1 key": make_app(AppConfig(api_keys=keys[:1], auth_exempt=[]), None),
        "64 keys": make_app(AppConfig(api_keys=keys, auth_exempt=[]), None),
    }
    hdr = {"authorization": f"Bearer {keys[0]}"}

    async def run() -> dict:
        clients = {
            k: httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://t") for k, a in apps.items()
        }
        times: dict[str, list[float]] = {k: [] for k in apps}
        for i in range(rounds + 50):
            order = list(apps) if i % 2 == 0 else list(reversed(apps))
            for k in order:
                s = time.perf_counter()
                r = await clients[k].get("/healthz", headers=hdr)
                dt = time.perf_counter() - s
                assert r.status_code == 200, r.text
                if i >= 50:
                    times[k].append(1e6 * dt)
        for cl in clients.values():
            await cl.aclose()
        return times

    times = asyncio.run(run())
    base = np.asarray(times["none"])
    return {
        "rounds": rounds,
        "us": {k: bootstrap_median(v) for k, v in times.items()},
        "over_none_us": {k: bootstrap_median(list(np.asarray(v) - base)) for k, v in times.items() if k != "none"},
    }


# ------------------------------------------------------------------------------------------ report


def to_markdown(res: dict) -> str:
    lines = [f"## {HEADING}: `lucid serve` on Ray Serve, loopback, testbed model, CPU ({os.cpu_count()} cores)", ""]
    lines.append("`python -m lucid.bench.service soak|overload|recovery|abandon|auth --write BENCHMARKS.md`.")
    lines.append("")
    if s := res.get("soak"):
        lines += [
            f"**Soak**: {s['n']} mixed requests from {s['clients']} clients against 2 VLM replicas "
            f"({s['wall_s']:.0f} s): lost **{s['lost']}**, undocumented statuses {s['undocumented']}, answers "
            f"unlike their solo answer **{s['unequal']}**, replicas unchanged: "
            f"{all(s['replicas_unchanged'].values())}, /readyz after: {s['ready_after']}.",
            "",
            "| kind | n | statuses | unlike solo |",
            "|---|---|---|---|",
        ]
        for k, v in sorted(s["by_kind"].items()):
            st = ", ".join(f"{a}: {b}" for a, b in sorted(v["status"].items()))
            lines.append(f"| {k} | {v['n']} | {st} | {v['unequal']} |")
        lines += ["", "| replica | RSS at start (MiB) | at end | change |", "|---|---|---|---|"]
        for k, a in s["rss_start_mib"].items():
            b = s["rss_end_mib"].get(k)
            lines.append(
                f"| {k.split(':')[0]} | {a:.0f} | {b:.0f} | {b - a:+.0f} |" if b else f"| {k} | {a:.0f} | gone | |"
            )
        if q := s.get("vlm_rss_by_quarter_mib"):
            lines += [
                "",
                "VLM replicas' RSS after each quarter of the requests (MiB): "
                + " -> ".join("/".join(f"{x:.0f}" for x in row) for row in q)
                + ".",
            ]
        lines.append("")
    if o := res.get("overload"):
        lines += [
            f"**Overload**: one VLM replica (1 thread, `max_batch_size` 8), `max_queued_requests` {o['queue']}; "
            f"capacity measured closed-loop: **{o['capacity_rps']:.1f} requests/s**; then arrivals at a fixed "
            f"rate for {o['seconds']:g} s.",
            "",
            "| offered | requests | answered | 503 | other | p50 / p99 answered (ms) | p50 / p99 to the 503 (ms) |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, v in o.items():
            if k.startswith("x"):
                lines.append(
                    f"| {k[1:]}x ({v['offered_rps']:.1f}/s) | {v['n']} | {v['answered']:.0%} | "
                    f"{v['refused_503']:.0%} | {v['other']:.0%} | {v['p50_ms']:.0f} / {v['p99_ms']:.0f} | "
                    f"{v['p50_503_ms']:.0f} / {v['p99_503_ms']:.0f} |"
                )
        lines.append("")
    if r := res.get("recovery"):
        lines += ["**Recovery** after SIGKILL of the only replica (time until a request is answered again):", ""]
        for dep in ("VLMServer", "SamServer"):
            v = r[dep]
            lines.append(
                f"- {dep}: {', '.join(f'{x:.1f}' for x in v)} s (median {np.median(v):.1f} s); the first request after "
                f"the kill got {r['first_status'][dep]}"
            )
        lines.append("")
    if b := res.get("abandon"):
        med = {k: float(np.median(v)) for k, v in b.items() if k.endswith("_s")}
        lines += [
            f"**An abandoned request** (one VLM replica, {len(b['solo_s'])} interleaved rounds, medians): a short "
            f"request alone {1000 * med['solo_s']:.0f} ms; a 600-token generation answered in full "
            f"{med['long_s']:.1f} s; the short request sent right after a client left that generation 0.5 s in: "
            f"**{1000 * med['after_abandon_s']:.0f} ms** (the replica stopped {b['replica']['jobs']} abandoned "
            f"jobs, {b['replica']['tokens_left']} decode steps not spent).",
            "",
        ]
    if a := res.get("auth"):
        lines += [
            f"**Auth cost** (GET /healthz made to need a key, in-process ASGI, {a['rounds']} interleaved rounds): "
            + "; ".join(f"{k}: {m:.0f} us [{lo:.0f}, {hi:.0f}]" for k, (m, lo, hi) in a["us"].items())
            + "; over no keys: "
            + "; ".join(f"{k}: {m:+.0f} us [{lo:+.0f}, {hi:+.0f}]" for k, (m, lo, hi) in a["over_none_us"].items())
            + ".",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lucid.bench.service", description=__doc__.split("\n\n")[0])
    p.add_argument("what", nargs="+", choices=["soak", "overload", "recovery", "abandon", "auth"])
    p.add_argument("--n", type=int, default=200, help="soak: requests")
    p.add_argument("--clients", type=int, default=4, help="soak: client threads")
    p.add_argument("--seconds", type=float, default=20.0, help="overload: seconds per offered load")
    p.add_argument("--json", type=Path, default=None, help="write the raw results here (merged with what is there)")
    p.add_argument("--write", type=Path, default=None, help="replace this tool's section of this markdown file")
    a = p.parse_args(argv)
    res = json.loads(a.json.read_text()) if a.json is not None and a.json.exists() else {}
    for w in a.what:
        if w == "soak":
            res["soak"] = soak(a.n, a.clients)
        elif w == "overload":
            res["overload"] = overload(a.seconds)
        elif w == "recovery":
            res["recovery"] = recovery()
        elif w == "abandon":
            res["abandon"] = abandon()
        else:
            res["auth"] = auth_cost()
        if a.json is not None:
            a.json.write_text(json.dumps(res, indent=1))
    text = to_markdown(res)
    print(text)
    if a.write is not None:
        from lucid.bench.rest import write_section

        write_section(a.write, text, HEADING)


if __name__ == "__main__":
    main()

"""REST service benchmark: `python -m lucid.bench.rest [--write BENCHMARKS.md]`.

1. Round-trip overhead: the same chat request answered in-process (`Engine.run`, the library) and over
   HTTP through the service (Ray Serve proxy -> FastAPI ingress -> VLM replica), interleaved request by
   request; overhead = HTTP latency - in-process latency of the neighbouring call, p50 with a 95 %
   bootstrap interval.
2. Load: a bounded generator (C client threads, each sending its share of N requests back to back) at
   C = 1, 4, 16, with `@serve.batch` on and off: requests/s and p50 / p99 latency.
Runs the service in this process (Ray started here: 1 VLM replica with 1 CPU / torch thread, a SAM replica
and the ingress); the in-process engine also uses 1 torch thread.
"""

from __future__ import annotations

import argparse
import base64
import os
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

SCENE = Path(__file__).resolve().parents[2] / "testbed" / "examples" / "scene.png"
QUESTIONS = [
    "Is there a red circle in the image?",
    "Is there a green triangle in the image?",
    "What color is the square?",
    "How many circles are there?",
]
HEADING = "REST service"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _body(q: str) -> dict:
    url = "data:image/png;base64," + base64.b64encode(SCENE.read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": q}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 8, "temperature": 0}


def measure(
    rounds: int, n_load: int, levels: tuple[int, ...], wait: float = 0.002, modes: tuple[bool, ...] = (True, False)
) -> dict:
    import httpx
    import ray
    import torch
    from ray import serve

    from lucid.bench.stats import bootstrap_median
    from serve.app import build_app
    from serve.config import AppConfig
    from serve.engine import ChatJob
    from serve.runners import VlmRunner

    torch.set_num_threads(1)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = _port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = {"vlm_cpus": 1.0, "sam_cpus": 0.25, "ingress_cpus": 0.25, "evals": False}
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    local = VlmRunner(AppConfig(**base))
    from PIL import Image

    image = np.asarray(Image.open(SCENE).convert("RGB"))
    out: dict = {"rounds": rounds, "n_load": n_load, "cpus": os.cpu_count(), "wait": wait}
    try:
        for batching in modes:
            serve.run(
                build_app(AppConfig(**base, batching=batching, max_batch_size=16, batch_wait_timeout_s=wait)),
                name="lucid",
                route_prefix="/",
                logging_config={"enable_access_log": False, "log_level": "WARNING"},
            )
            with httpx.Client(timeout=300) as c:
                for q in QUESTIONS:  # warm both paths
                    c.post(url, json=_body(q)).raise_for_status()
                    local.engine.run([ChatJob(image=image, question=q, max_new_tokens=8, fit_context=False)])
                if True:  # the overhead: interleaved, the same request on both paths
                    over, http_ms, lib_ms, inner, gen_http, gen_lib = [], [], [], [], [], []
                    for i in range(rounds):
                        q = QUESTIONS[i % len(QUESTIONS)]
                        order = (0, 1) if i % 2 == 0 else (1, 0)
                        t = {}
                        for k in order:
                            s = time.perf_counter()
                            if k == 0:
                                r = c.post(url, json=_body(q))
                                r.raise_for_status()
                                inner.append(1000 * r.json()["lucid"]["wall_s"])
                                gen_http.append(1000 * r.json()["lucid"]["timings"]["total_s"])
                            else:
                                job = ChatJob(image=image, question=q, max_new_tokens=8, fit_context=False)
                                gen_lib.append(1000 * local.engine.run([job])[0]["timings"]["total_s"])
                            t[k] = 1000 * (time.perf_counter() - s)
                        http_ms.append(t[0])
                        lib_ms.append(t[1])
                        over.append(t[0] - t[1])
                    out.setdefault("overhead", {})[batching] = {
                        "http": bootstrap_median(http_ms),
                        "library": bootstrap_median(lib_ms),
                        "diff": bootstrap_median(over),
                        "ingress_wait": bootstrap_median(inner),  # the ingress's await of the VLM replica
                        "generate_http": bootstrap_median(gen_http),  # generate() inside the replica
                        "generate_lib": bootstrap_median(gen_lib),
                    }
            for clients in levels:
                lat: list[float] = []

                def client(k: int, clients=clients, lat=lat) -> None:
                    with httpx.Client(timeout=300) as c:
                        for i in range(k, n_load, clients):
                            s = time.perf_counter()
                            r = c.post(url, json=_body(QUESTIONS[i % len(QUESTIONS)]))
                            r.raise_for_status()
                            lat.append(1000 * (time.perf_counter() - s))

                s = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    list(pool.map(client, range(clients)))
                wall = time.perf_counter() - s
                out.setdefault("load", []).append(
                    {
                        "batching": batching,
                        "clients": clients,
                        "rps": n_load / wall,
                        "p50": float(np.percentile(lat, 50)),
                        "p99": float(np.percentile(lat, 99)),
                        "mean": statistics.fmean(lat),
                    }
                )
                print(f"batching={batching} clients={clients}: {n_load / wall:.1f} req/s", file=sys.stderr)
    finally:
        ray.shutdown()
    return out


def to_markdown(res: dict) -> str:
    fmt = "{:.1f} [{:.1f}, {:.1f}]".format
    lines = [
        f"## {HEADING}: round trip and load, testbed model, CPU ({res['cpus']} cores), 1 VLM replica x 1 thread",
        "",
        "Written by `python -m lucid.bench.rest --write BENCHMARKS.md`. A yes/no or one-word chat request with a "
        "192x192 PNG as a data: URL, greedy, max_tokens 8. Overhead: the same request over HTTP (Ray Serve "
        "proxy -> FastAPI ingress -> VLM replica) and in-process (`serve.engine.Engine.run`), interleaved, "
        f"{res['rounds']} rounds; medians with 95 % bootstrap intervals. `@serve.batch` waits "
        f"{1000 * res['wait']:.0f} ms for company"
        + (f"; Serve settings: {', '.join(res['serve_env'])}" if res.get("serve_env") else "")
        + ". The ingress's wait is its `await` of the VLM replica "
        "(`lucid.wall_s`): the rest of the overhead is the proxy, the ingress (JSON, image decode) and the "
        "client.",
        "",
        "| @serve.batch | in-process p50 ms | HTTP p50 ms | ingress waits on the replica, p50 ms | "
        "**overhead p50 ms (paired)** |",
        "|---|---|---|---|---|",
    ]
    for mode, o in res["overhead"].items():
        lines.append(
            f"| {'on' if mode else 'off'} | {fmt(*o['library'])} | {fmt(*o['http'])} | {fmt(*o['ingress_wait'])} | "
            f"**{fmt(*o['diff'])}** |"
        )
    lines += [
        "",
        f"Load: C client threads share {res['n_load']} requests (4 questions), each sending back to back.",
        "",
        "| @serve.batch | clients | requests/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|",
    ]
    for r in res.get("load", []):
        mode = "on" if r["batching"] else "off"
        lines.append(f"| {mode} | {r['clients']} | {r['rps']:.1f} | {r['p50']:.0f} | {r['p99']:.0f} |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str, heading: str = HEADING) -> None:
    """Replace the `## heading...` section of `path` (or append it), keeping every other section."""
    old = path.read_text() if path.exists() else ""
    kept, skip = [], False
    for line in old.splitlines():
        if line.startswith("## "):
            skip = line[3:].startswith(heading)
        if not skip:
            kept.append(line)
    path.write_text("\n".join(kept).rstrip("\n") + "\n\n" + text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m lucid.bench.rest", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--n-load", type=int, default=96)
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--write", type=Path, default=None, help="replace the REST section of this markdown file")
    p.add_argument(
        "--serve-env",
        action="append",
        default=[],
        metavar="K=V",
        help="a Ray Serve setting for this run (e.g. RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0), repeatable",
    )
    p.add_argument("--batching", choices=["both", "on", "off"], default="both")
    a = p.parse_args(argv)
    for kv in a.serve_env:  # set before Ray starts: its workers inherit the environment
        k, _, v = kv.partition("=")
        os.environ[k] = v
    modes = {"both": (True, False), "on": (True,), "off": (False,)}[a.batching]
    levels = tuple(int(x) for x in a.levels.split(",") if x.strip())
    res = measure(a.rounds, a.n_load, levels, modes=modes)
    res["serve_env"] = a.serve_env
    text = to_markdown(res)
    print(text)
    if a.write is not None:
        write_section(a.write, text)


if __name__ == "__main__":
    main()

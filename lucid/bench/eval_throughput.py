"""Samples/s of an eval job with 1 and with N workers, side by side in one run (one Ray instance).

    python -m lucid.bench.eval_throughput --suite testbed-pope:n=40 --workers 1,2 --rounds 2 --batch-size 8

Each round runs the same job once per worker count, in alternating order, each into a fresh output
directory (nothing resumed). Samples/s counts answering only: from all workers ready (models loaded)
to the last record written. Also reported per run: worker utilisation (time inside the batch's
generate call / (workers x wall)) and driver time (judging answers and appending records), which
say where time goes when N workers give less than N times the samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from evals.job import JobSpec, make_plan, run_job


def measure(suite: str, workers: list[int], rounds: int, batch_size: int, limit: int | None) -> list[dict]:
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="lucid-throughput-") as tmp:
            for r in range(rounds):
                order = workers if r % 2 == 0 else list(reversed(workers))
                for w in order:
                    out = Path(tmp) / f"r{r}-w{w}"
                    spec = JobSpec(
                        suites=(suite,),
                        out=out,
                        workers=w,
                        batch_size=batch_size,
                        limit=limit,
                        bootstrap=0,
                        progress=False,
                    )
                    t = time.perf_counter()
                    res = run_job(spec, make_plan(spec), log=lambda m: None)
                    tp = res["throughput"][0]
                    row = {k: tp[k] for k in tp if k != "workers_info"} | {
                        "round": r,
                        "total_s": time.perf_counter() - t,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
    return rows


def summarise(rows: list[dict], workers: list[int]) -> str:
    by = {w: [r for r in rows if r["workers"] == w] for w in workers}
    base = statistics.median(r["samples_per_s"] for r in by[workers[0]])
    head = "| workers | samples/run | samples/s (median; runs) | speed-up | worker utilisation | driver s/run |"
    lines = [head + " start-up s |", "|---|---|---|---|---|---|---|"]
    for w, rs in by.items():
        sps = statistics.median(r["samples_per_s"] for r in rs)
        runs = ", ".join(f"{r['samples_per_s']:.1f}" for r in rs)
        util = statistics.median(r["worker_utilisation"] for r in rs)
        drv = statistics.median(r["driver_s"] for r in rs)
        up = statistics.median(r["startup_s"] for r in rs)
        n = rs[0]["samples_answered"]
        lines.append(f"| {w} | {n} | {sps:.1f} ({runs}) | {sps / base:.2f}x | {util:.2f} | {drv:.2f} | {up:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="testbed-pope:n=40")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args(argv)
    workers = [int(x) for x in a.workers.split(",")]
    rows = measure(a.suite, workers, a.rounds, a.batch_size, a.limit)
    print(summarise(rows, workers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Latency of the attention -> SAM paths, interleaved in one process on the embedded models.

Each round, in a seeded shuffled order, every path segments the same (scene, query) once: the
localization heads' point (`heads`, the default of `lucid segment IMAGE QUERY`), READ's similarity as
points (`read`), VL-SAM referring with its refinement on the whole image and with the paper's multi-scale
ensemble, and VL-SAM open-ended (`--all`) on the whole image with one question and as the paper's
configuration (both ensembles). Per round and path: the wall time of the library call (VLM work + SAM);
reported: the median and, per round, the ratio to `heads` (paired) with a 95 % bootstrap interval.

    python -m lucid.bench.segment [--rounds 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from lucid.bench.stats import bootstrap_median

#: path -> (kind, spec): "heads", a read spec, or a vl-sam spec for referring ("refer") / open-ended ("all")
PATHS = {
    "heads": ("heads", ""),
    "read": ("read", "read"),
    "vl-sam (referring, whole image)": ("refer", "vl-sam:multiscale=false"),
    "vl-sam (referring, official: multi-scale)": ("refer", "vl-sam"),
    "vl-sam --all (whole image, 1 question)": ("all", "vl-sam:multiscale=false,questions=1"),
    "vl-sam --all (official: multi-scale x 4 questions)": ("all", "vl-sam"),
}


def measure(rounds: int = 10, seed: int = 0) -> dict:
    """{"rows": [{"path", "median_ms", "ratio"}], "rounds"} (see the module doc)."""
    from grounding import load_or_discover
    from grounding.read import parse_read, segment_read
    from grounding.sam import load_segmenter
    from grounding.segment import segment_query
    from grounding.vlsam import parse_vlsam, segment_vlsam
    from testbed.world.scenes import referable_objects, scenes
    from vlm import load_vlm

    vlm = load_vlm("testbed")
    sam = load_segmenter("testbed")
    selection = load_or_discover(vlm)
    items = []
    for s in scenes(54321, 40):
        for o in referable_objects(s)[:1]:
            items.append((s.image, f"the {o.color} {o.shape}"))

    def run(path: str, image, query: str) -> None:
        kind, spec = PATHS[path]
        if kind == "heads":
            segment_query(vlm, sam, image, [query], selection)
        elif kind == "read":
            segment_read(vlm, sam, image, [query], parse_read(spec))
        else:
            segment_vlsam(vlm, sam, image, query if kind == "refer" else None, parse_vlsam(spec))

    for p in PATHS:  # warm-up
        run(p, *items[0])
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    names = list(PATHS)
    for r in range(rounds):
        image, query = items[(r + 1) % len(items)]
        for i in rng.permutation(len(names)):
            t = time.perf_counter()
            run(names[i], image, query)
            times[names[i]].append(time.perf_counter() - t)
    rows = []
    for p, v in times.items():
        ratio = bootstrap_median([a / b for a, b in zip(v, times["heads"])], seed)
        rows.append({"path": p, "spec": PATHS[p][1], "median_ms": 1000 * statistics.median(v), "ratio": ratio})
    return {"rows": rows, "rounds": rounds}


def to_markdown(result: dict, threads: int) -> str:
    lines = [
        f"## Segmentation from attention: the embedded LLaVA and tiny SAM, {result['rounds']} interleaved rounds, "
        f"{threads} torch thread(s), CPU fp32",
        "",
        "Written by `python -m lucid.bench.segment`. One (scene, query) per round, every path once in a shuffled "
        "order: the library call's wall time (the VLM's pass(es) + SAM), its median, and the per-round ratio to "
        "`heads` with a 95 % bootstrap interval.",
        "",
        "| path | spec | ms per image | x heads [95 % CI] |",
        "|---|---|---|---|",
    ]
    for r in result["rows"]:
        m, lo, hi = r["ratio"]
        lines.append(f"| {r['path']} | `{r['spec'] or '-'}` | {r['median_ms']:.1f} | {m:.2f} [{lo:.2f}, {hi:.2f}] |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lucid.bench.segment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(to_markdown(measure(args.rounds), args.threads))


if __name__ == "__main__":
    main()

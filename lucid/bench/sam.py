"""SAM latency: image embedding and mask decoding per prompt, both backends interleaved in one process.

Each round, in a seeded shuffled order, every (backend, measurement) runs once on the same images:
`embed` encodes a fresh image (cache cleared), `decode xN` decodes N box prompts on a cached embedding.
Medians over rounds, and the transformers / official ratio per round (paired) with a 95 % bootstrap
interval, so a noisy machine shows as a wide interval rather than a false difference.

    python -m lucid.bench.sam [--sam testbed] [--rounds 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from lucid.bench.stats import bootstrap_median


def measure(spec: str = "testbed", rounds: int = 30, seed: int = 0) -> dict:
    """{"rows": [{"backend", "what", "median_ms"}], "ratios": {what: (median, lo, hi)}} (see module doc)."""
    from grounding.sam import OfficialSam, SamPrompt, load_segmenter
    from grounding.sam_convert import to_hf
    from grounding.sam_model import SamArchitecture
    from testbed.world.scenes import WorldConfig, render_scene

    official = load_segmenter(spec)
    if not isinstance(official, OfficialSam):
        raise ValueError("bench_sam needs an official-architecture SAM (it converts it for the HF backend)")
    import json
    from pathlib import Path

    from grounding.sam import TESTBED_SAM

    src = TESTBED_SAM if spec == "testbed" else Path(spec)
    arch = SamArchitecture.from_json(json.loads((src / "sam_config.json").read_text())["architecture"])
    tmp = tempfile.TemporaryDirectory()
    hf = load_segmenter(f"hf:{to_hf(official.model.state_dict(), arch, tmp.name)}")
    backends = {"segment-anything": official, "transformers": hf}
    scenes = [render_scene(900 + i, WorldConfig(size=(160, 120))) for i in range(8)]
    box = [SamPrompt(box=tuple(float(v) for v in o.bbox)) for o in scenes[0].objects]

    def embed(seg, i):
        seg._cache.items.clear()
        t = time.perf_counter()
        seg.segment(scenes[i % len(scenes)].image, box[:1])
        return seg.timings["embed"] if "embed" in seg.timings else time.perf_counter() - t

    def decode(seg, n):
        seg.segment(scenes[0].image, box[:1])  # cached embedding
        prompts = (box * n)[:n]
        seg.segment(scenes[0].image, prompts)
        return seg.timings["decode"] / n

    whats = {
        "embed": lambda s, r: embed(s, r),
        "decode x1 (per prompt)": lambda s, r: decode(s, 1),
        "decode x8 (per prompt)": lambda s, r: decode(s, 8),
    }
    for seg in backends.values():  # warm-up
        for fn in whats.values():
            fn(seg, 0)
    rng = np.random.default_rng(seed)
    times: dict[tuple[str, str], list[float]] = {(b, w): [] for b in backends for w in whats}
    jobs = [(b, w) for b in backends for w in whats]
    for r in range(rounds):
        for i in rng.permutation(len(jobs)):
            b, w = jobs[i]
            times[(b, w)].append(whats[w](backends[b], r))
    rows = [{"backend": b, "what": w, "median_ms": 1000 * statistics.median(v)} for (b, w), v in times.items()]
    ratios = {}
    for w in whats:
        per_round = [t / o for t, o in zip(times[("transformers", w)], times[("segment-anything", w)])]
        ratios[w] = bootstrap_median(per_round, seed)
    tmp.cleanup()
    return {"rows": rows, "ratios": ratios, "rounds": rounds}


def to_markdown(result: dict, threads: int) -> str:
    lines = [
        f"## SAM: the embedded tiny SAM, both backends, {result['rounds']} interleaved rounds, {threads} torch "
        "thread(s), CPU fp32",
        "",
        "Written by `python -m lucid.bench.sam`. `embed`: one 160x120 image through the image encoder (cache "
        "cleared); `decode xN`: N box prompts on a cached embedding, time per prompt. Ratio: transformers / "
        "segment-anything per round, median and 95 % bootstrap interval.",
        "",
        "| measurement | segment-anything ms | transformers ms | ratio [95 % CI] |",
        "|---|---|---|---|",
    ]
    by = {(r["backend"], r["what"]): r["median_ms"] for r in result["rows"]}
    for w, (m, lo, hi) in result["ratios"].items():
        lines.append(
            f"| {w} | {by[('segment-anything', w)]:.2f} | {by[('transformers', w)]:.2f} | "
            f"{m:.2f} [{lo:.2f}, {hi:.2f}] |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lucid.bench.sam", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sam", default="testbed")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(to_markdown(measure(args.sam, args.rounds), args.threads))


if __name__ == "__main__":
    main()

"""results.json (lmms-eval-like, with the full reproducibility record) and report.md with PNG charts.

`results.json`:

* `results["<suite>/<split>"][model][method set]`: each metric of the split's kind, `n`, `ci95`
  (percentile bootstrap per metric) and, for every method set but the baseline, `vs_baseline`: per
  metric the difference, its paired-bootstrap 95 % interval and p-value, and `mcnemar` (exact test on
  the per-sample correctness) where answers are right or wrong;
* `configs[suite]`: the suite's resolved parameters, splits and the sha256 of its data files;
* `config`: models (path, weights sha256), method sets (each method's parameters as resolved), decoding
  settings and seeds, batch size, workers, CPUs / GPUs per worker, limit, bootstrap settings, data options;
* `environment`: package versions, git commit (and whether the tree had changes), Python, platform,
  attention backends, and per worker its host, CPU / GPU, torch threads and device;
* `throughput`: per model, samples answered in this run, wall time of answering and samples/s, start-up.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path

import numpy as np

from evals import metrics as M

PACKAGES = (
    "lucid-vlm",
    "torch",
    "transformers",
    "tokenizers",
    "safetensors",
    "ray",
    "numpy",
    "pillow",
    "pycocotools",
    "lemminflect",
    "triton",
)
BOOTSTRAP_SEED = 0
CORRECT = {  # per-sample correctness for McNemar, by kind
    "binary": lambda s: s["pred_yes"] == s["label_yes"],
    "false_yes": lambda s: s["pred_yes"] == 0,
    "accuracy": lambda s: s["correct"] == 1,
}


def package_versions() -> dict[str, str | None]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = metadata.version(p)
        except metadata.PackageNotFoundError:
            out[p] = None
    return out


def git_state() -> dict:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": bool(dirty) if commit else None}


def environment(runs: list[dict]) -> dict:
    workers = [w for r in runs for w in r.get("workers_info", [])]
    return {
        "packages": package_versions(),
        "git": git_state(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "attention": {
            "text_model": "lucid (Lucid's attention seam; sdpa where no method edits a layer)",
            "vision_tower": "sdpa",
            "edited_attention_backend": sorted({w.get("edited_attention_backend") for w in workers} - {None}),
            "LUCID_KERNELS": os.environ.get("LUCID_KERNELS", "auto"),
        },
        "hardware": [
            {k: w.get(k) for k in ("host", "cpu", "logical_cpus", "gpu", "device", "dtype", "torch_threads")}
            for w in workers
        ],
    }


def _cell_metrics(kind: str, stats: dict, b: int) -> dict:
    point = M.aggregate(kind, stats)
    ci = M.bootstrap(kind, stats, b=b, seed=BOOTSTRAP_SEED)
    n = len(next(iter(stats.values()))) if stats else 0
    return {**{k: round(v, 6) for k, v in point.items()}, "n": n, "ci95": {k: _r(v) for k, v in ci.items()}}


def _r(pair) -> list[float]:
    return [round(float(x), 6) for x in pair]


def prefill_summary(exits: list[dict]) -> dict:
    """What a method's own prefill saved (records with `flops_saved`, e.g. DyVTE's): the mean share of prefill
    FLOPs saved, its range, and how many samples exited after each layer ("none": never)."""
    saved = [float(x["flops_saved"]) for x in exits]
    alone = [float(x.get("flops_saved_alone", x["flops_saved"])) for x in exits]
    layers = Counter("none" if x.get("exit_layer") is None else str(x["exit_layer"]) for x in exits)
    return {
        "flops_saved": round(sum(saved) / len(saved), 6),
        "min": round(min(saved), 6),
        "max": round(max(saved), 6),
        "flops_saved_alone": round(sum(alone) / len(alone), 6),
        "exit_layers": dict(sorted(layers.items(), key=lambda kv: (kv[0] == "none", kv[0].zfill(4)))),
        "n": len(saved),
    }


def compute(plan, runs: list[dict]) -> dict:
    """The results dict from the records of every cell (all samples answered)."""
    from mitigation.methods import BASELINE

    spec = plan.spec
    results: dict = {}
    n_samples: dict = {}
    for cell in plan.cells:
        missing = [s.id for s in cell.samples if s.id not in cell.done]
        if missing:
            raise RuntimeError(f"{cell.name}: {len(missing)} samples unanswered (first {missing[0]})")
        for split, kind in cell.suite.splits().items():
            recs = [cell.done[s.id] for s in cell.samples if s.split == split]
            if not recs:
                continue
            task = f"{cell.suite.spec}/{split}"
            entry = _cell_metrics(kind, M.stack(recs), spec.bootstrap)
            entry["kind"] = kind
            if crops := [r["crop"] for r in recs if r.get("crop")]:
                hits = sum(bool(c["hit"]) for c in crops)
                entry["crop"] = {
                    "hit_rate": round(hits / len(crops), 6),
                    "ci95": _r(M.wilson(hits, len(crops))),
                    "target_coverage": round(sum(c["target_coverage"] for c in crops) / len(crops), 6),
                    "kept_fraction": round(sum(c.get("kept_fraction", 1.0) for c in crops) / len(crops), 6),
                    "n": len(crops),
                }
            if exits := [x for r in recs for x in (r.get("extras") or {}).values() if "flops_saved" in x]:
                entry["prefill"] = prefill_summary(exits)
            results.setdefault(task, {}).setdefault(cell.model.name, {})[cell.label] = entry
            n_samples[task] = len(recs)
    # paired comparisons against the baseline, on the same samples
    by_key = {(c.model.name, c.label, c.suite.spec): c for c in plan.cells}
    for cell in plan.cells:
        base = by_key.get((cell.model.name, BASELINE, cell.suite.spec))
        if base is None or cell.label == BASELINE:
            continue
        for split, kind in cell.suite.splits().items():
            ids = [s.id for s in cell.samples if s.split == split]
            if not ids:
                continue
            s_m = M.stack([cell.done[i] for i in ids])
            s_b = M.stack([base.done[i] for i in ids])
            cmp = {
                k: {"diff": round(v["diff"], 6), "ci95": _r(v["ci"]), "p": round(v["p"], 6)}
                for k, v in M.paired(kind, s_m, s_b, b=spec.bootstrap, seed=BOOTSTRAP_SEED).items()
            }
            if kind in CORRECT:
                cmp["mcnemar"] = M.mcnemar_exact(CORRECT[kind](s_m), CORRECT[kind](s_b))
            results[f"{cell.suite.spec}/{split}"][cell.model.name][cell.label]["vs_baseline"] = cmp
    return {
        "results": results,
        "configs": {s.spec: s.config() for s in plan.suites},
        "config": {
            "models": [
                {"name": m.name, "source": m.source, "path": str(m.path), "weights_sha256": m.weights_sha256}
                for m in plan.models
            ],
            "method_sets": [{"label": label, "methods": methods} for label, methods in plan.method_sets],
            "decoding": {"greedy": spec.temperature == 0.0, **spec.sampling()},
            "batch_size": spec.batch_size,
            "workers": spec.workers,
            "cpus_per_worker": spec.cpus_per_worker,
            "gpus_per_worker": spec.gpus_per_worker,
            "torch_threads_per_worker": spec.torch_threads(),
            "device": spec.device,
            "limit": spec.limit,
            "bootstrap": {"resamples": spec.bootstrap, "seed": BOOTSTRAP_SEED, "interval": "percentile, 95 %"},
            "data": {k: (str(v) if v is not None else None) for k, v in vars(spec.data).items()},
            "address": spec.address,
        },
        "environment": environment(runs),
        "throughput": runs,
        "n_samples": n_samples,
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "argv": sys.argv,
    }


def write_results(plan, runs: list[dict]) -> dict:
    res = compute(plan, runs)
    out = plan.spec.out
    if out is not None:
        from vlm.contract import write_output

        try:  # a resumed job keeps the throughput records of the runs that answered the earlier samples
            earlier = json.loads((out / "results.json").read_text()).get("throughput") or []
        except (OSError, ValueError):
            earlier = []
        res["throughput"] = [{**t, "earlier_run": True} for t in earlier] + res["throughput"]

        write_output(out / "results.json", json.dumps(res, indent=1, default=str))
        charts = write_charts(res, out)
        write_output(out / "report.md", markdown(res, charts))
    return res


# ------------------------------------------------------------------------------------------- markdown


def _fmt(v: float) -> str:
    return f"{v:.3f}"


def interval_cell(e: dict, k: str, joiner: str = "<br>") -> str:
    """One metric of a results entry as text: "0.912 [0.880, 0.940]", then (when a baseline was run) the
    paired difference, its interval and p: "+0.012 [-0.004, 0.030] p=0.14"; the report's table cells
    (`joiner` <br>) and `lucid eval`'s summary lines (`joiner` " vs baseline ") both use it."""
    lo, hi = e["ci95"].get(k, (e[k], e[k]))
    text = f"{_fmt(e[k])} [{_fmt(lo)}, {_fmt(hi)}]"
    v = e.get("vs_baseline", {}).get(k)
    if v is not None:
        lo_d, hi_d = v["ci95"]
        text += f"{joiner}{v['diff']:+.3f} [{lo_d:+.3f}, {hi_d:+.3f}] p={v['p']:.3g}"
    return text


def markdown(res: dict, charts: dict[str, str] | None = None) -> str:
    cfg = res["config"]
    lines = ["# Evaluation report", ""]
    models = ", ".join(f"`{m['name']}` (sha256 {m['weights_sha256'][:12]})" for m in cfg["models"])
    git = res["environment"]["git"]
    lines += [
        f"Models: {models}. Decoding: {'greedy' if cfg['decoding']['greedy'] else 'sampling'}, "
        f"seed {cfg['decoding']['seed']}. Batch size {cfg['batch_size']}, {cfg['workers']} worker(s) x "
        f"{cfg['cpus_per_worker']:g} CPU. Limit: {cfg['limit'] or 'none'}. Commit "
        f"`{(git['commit'] or 'unknown')[:10]}`{' (with local changes)' if git['dirty'] else ''}, {res['date']}.",
        "",
        "Each cell: the metric and its 95 % bootstrap interval over samples. Method sets other than the "
        "baseline add the difference to the baseline on the same samples, its paired-bootstrap 95 % interval "
        "and p-value (McNemar's exact p for accuracy where answers are right or wrong). "
        "Full record: `results.json`; every answer: `samples/`.",
        "",
    ]
    tasks = res["results"]
    suites = list(dict.fromkeys(t.rsplit("/", 1)[0] for t in tasks))
    for suite in suites:
        lines += [f"## {suite}", ""]
        if charts and suite in charts:
            lines += [f"![{suite}]({charts[suite]})", ""]
        for task, by_model in tasks.items():
            if task.rsplit("/", 1)[0] != suite:
                continue
            split = task.rsplit("/", 1)[1]
            names = list(next(iter(next(iter(by_model.values())).values()))["ci95"])
            lines += [f"### {split} (n = {res['n_samples'][task]})", ""]
            lines += ["| model | method set | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
            for model, by_label in by_model.items():
                for label, e in by_label.items():
                    cells = [interval_cell(e, k) for k in names]
                    mc = e.get("vs_baseline", {}).get("mcnemar")
                    if mc is not None and cells:
                        cells[0] += f" (McNemar p={mc['p']:.3g})"
                    lines.append(f"| `{model}` | `{label}` | " + " | ".join(cells) + " |")
            lines.append("")
            crops = [(m, lb, e["crop"]) for m, by in by_model.items() for lb, e in by.items() if "crop" in e]
            if crops:
                lines += ["Crop quality (the kept region holds at least half of the target's box):", ""]
                lines += ["| model | method set | hit rate | target coverage | image kept | n |"]
                lines += ["|---|---|---|---|---|---|"]
                for model, label, c in crops:
                    lo, hi = c["ci95"]
                    lines.append(
                        f"| `{model}` | `{label}` | {_fmt(c['hit_rate'])} [{_fmt(lo)}, {_fmt(hi)}] | "
                        f"{_fmt(c['target_coverage'])} | {_fmt(c['kept_fraction'])} | {c['n']} |"
                    )
                lines.append("")
    exits = [
        (t, m, lb, e["prefill"])
        for t, by in tasks.items()
        for m, bl in by.items()
        for lb, e in bl.items()
        if "prefill" in e
    ]
    if exits:
        lines += [
            "## Prefill FLOPs saved",
            "",
            "Share of the prefill decoder FLOPs saved, as run (a batch computes the image tokens until its last row "
            "exits) and at batch size 1 (each row's own exit, which is what its answer reflects in both).",
            "",
            "| task | model | method set | saved as run (mean) | range | saved at batch size 1 (mean) | exit layers "
            "| n |",
        ]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for task, model, label, p in exits:
            layers = ", ".join(f"{k}: {v}" for k, v in p["exit_layers"].items())
            alone = _fmt(p["flops_saved_alone"]) if "flops_saved_alone" in p else "-"
            lines.append(
                f"| {task} | `{model}` | `{label}` | {_fmt(p['flops_saved'])} | {_fmt(p['min'])}-{_fmt(p['max'])} | "
                f"{alone} | {layers} | {p['n']} |"
            )
        lines.append("")
    tp = res.get("throughput") or []
    if tp:
        lines += ["## Throughput", "", "| model | workers | batch size | samples | s | samples/s | start-up s |"]
        lines += ["|---|---|---|---|---|---|---|"]
        for r in tp:
            lines.append(
                f"| `{r['model']}` | {r['workers']} | {r['batch_size']} | {r['samples_answered']} | "
                f"{r['answer_wall_s']} | {r['samples_per_s']} | {r['startup_s']} |"
            )
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- charts


def write_charts(res: dict, out: Path) -> dict[str, str]:
    """One PNG per suite: a panel per (split, primary metric), bars per model x method set with the
    95 % intervals. Returns suite -> path relative to `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlm.contract import atomic_output

    charts = {}
    tasks = res["results"]
    suites = list(dict.fromkeys(t.rsplit("/", 1)[0] for t in tasks))
    (out / "charts").mkdir(parents=True, exist_ok=True)
    for suite in suites:
        panels = []
        for task, by_model in tasks.items():
            if task.rsplit("/", 1)[0] != suite:
                continue
            kind = next(iter(next(iter(by_model.values())).values()))["kind"]
            for metric in M.PRIMARY[kind]:
                panels.append((task.rsplit("/", 1)[1], metric, by_model))
        cols = min(3, len(panels))
        rows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
        for ax, (split, metric, by_model) in zip(axes.flat, panels):
            labels, vals, errs = [], [], [[], []]
            for model, by_label in by_model.items():
                for label, e in by_label.items():
                    labels.append(label if len(by_model) == 1 else f"{model}\n{label}")
                    v = e[metric]
                    lo, hi = e["ci95"].get(metric, (v, v))
                    vals.append(v)
                    errs[0].append(max(0.0, v - lo))
                    errs[1].append(max(0.0, hi - v))
            x = np.arange(len(vals))
            ax.bar(x, vals, yerr=errs, capsize=3, color=["#888888"] + ["#3a7bd5"] * (len(vals) - 1))
            ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
            arrow = (
                "no better direction"
                if metric in M.NO_DIRECTION
                else "lower is better"
                if metric in M.LOWER_IS_BETTER
                else "higher is better"
            )
            ax.set_title(f"{split}: {metric} ({arrow})", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.tight_layout()
        rel = f"charts/{_file(suite)}.png"
        with atomic_output(out / rel) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)
        charts[suite] = rel
    return charts


def _file(text: str) -> str:
    from evals.paths import slug

    return slug(text)

"""A small sweep of the mitigation methods on the testbed, for choosing settings before a measurement.

Each configuration (the baseline, each method at its defaults, a small grid) is evaluated by
`testbed.evaluate` on the same fresh scenes of a *calibration* seed (not the held-out evaluation seed
12345, so settings are not tuned on the numbers that are reported), with only what the mitigation
table needs: the POPE splits, the partner-absent false-yes rate, and caption CHAIR_i / CHAIR_s /
recall / length (CHAIR without length and recall is not to be trusted). Per configuration the wall
time is reported too (same machine, same scenes: comparable within one run).

    python -m testbed.sweep --model testbed --n 60 --grid small --out sweep.json --md sweep.md
    python -m testbed.sweep --config baseline --config "vhr+pai:gamma=1" --n 10

Grids (a configuration is a "+"-joined list of method specs, composed in that order):

* `defaults`: baseline, and each of pai, paint, vhr, var at the papers' defaults;
* `small`: `defaults`, plus pai alpha 0.2 / 1.0 and attention-only (gamma 1); paint uniform heads (the
  official code) and alpha 0.4 / 1.0; vhr alpha 1.5 / 3; var p 0.9 and the official code's semantics.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from testbed.evaluate import EvalConfig, evaluate

CALIBRATION_SEED = 4242
SWEEP_FAMILIES = ("pope_random", "pope_popular", "pope_adversarial", "partner_absent", "caption")
BASELINE = "baseline"

GRIDS: dict[str, tuple[str, ...]] = {
    "defaults": (BASELINE, "pai", "paint", "vhr", "var"),
}
GRIDS["small"] = GRIDS["defaults"] + (
    "pai:alpha=0.2",
    "pai:alpha=1",
    "pai:gamma=1",
    "paint:heads=uniform",
    "paint:alpha=0.4",
    "paint:alpha=1",
    "vhr:alpha=1.5",
    "vhr:alpha=3",
    "var:p=0.9",
    "var:semantics=code,p=0.6,rho=0.5",
)


def parse_config(text: str):
    """ "baseline" -> (); "vhr+pai:gamma=1" -> (VHR(), PAI(gamma=1)) (MethodError on a bad spec)."""
    from mitigation.methods import parse_methods

    text = text.strip()
    if text in (BASELINE, ""):
        return ()
    return parse_methods([part for part in text.split("+") if part.strip()])


def summarise(metrics: dict) -> dict:
    """The sweep's numbers out of an `evaluate` result."""
    row: dict = {}
    for split in ("random", "popular", "adversarial"):
        m = metrics.get(f"pope_{split}")
        if m:
            row[f"pope_{split}"] = {k: m[k] for k in ("accuracy", "f1", "precision", "yes_ratio", "n")}
    if "partner_absent" in metrics:
        row["partner_absent_false_yes"] = metrics["partner_absent"]["false_yes_rate"]
        row["partner_absent_n"] = metrics["partner_absent"]["n"]
    c = metrics.get("caption")
    if c:
        row["caption"] = {
            k: c[k] for k in ("chair_i", "chair_s", "recall", "mean_length_words", "partner_absent_named")
        }
        row["caption_examples"] = c.get("examples", [])[:3]
    return row


def run_sweep(
    vlm,
    configs: Sequence[str],
    n_scenes: int = 60,
    seed: int = CALIBRATION_SEED,
    batch_size: int = 16,
    reference_scenes: int = 2000,
    log=None,
) -> list[dict]:
    """Evaluate each configuration on the same scenes; returns one row per configuration."""
    cfg = EvalConfig(
        n_scenes=n_scenes,
        seed=seed,
        batch_size=batch_size,
        reference_scenes=reference_scenes,
        n_foreign=0,
        where=False,
        families=SWEEP_FAMILIES,
    )
    methods_by_config = [(c, parse_config(c)) for c in configs]  # every spec checked before any work
    rows = []
    for label, methods in methods_by_config:
        t0 = time.perf_counter()
        metrics = evaluate(vlm, cfg, show_progress=False, methods=methods)
        row = {
            "config": label,
            "methods": [m.to_json() for m in methods],
            "seconds": round(time.perf_counter() - t0, 2),
            **summarise(metrics),
        }
        rows.append(row)
        if log is not None:
            log(_line(row))
    return rows


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def _line(row: dict) -> str:
    adv = row.get("pope_adversarial", {})
    cap = row.get("caption", {})
    return (
        f"{row['config']}: POPE-adv acc {_f(adv.get('accuracy'))}, partner-absent false-yes "
        f"{_f(row.get('partner_absent_false_yes'))}, CHAIR_i {_f(cap.get('chair_i'))}, recall {_f(cap.get('recall'))} "
        f"({row['seconds']} s)"
    )


def to_markdown(rows: Sequence[dict], meta: dict | None = None) -> str:
    """One markdown table, a row per configuration: POPE accuracy / F1 per split, the adversarial yes-ratio,
    the partner-absent false-yes rate, caption CHAIR_i / CHAIR_s / recall / words, time."""
    head = (
        "| config | POPE rand acc / F1 | POPE pop acc / F1 | POPE adv acc / F1 | adv yes-ratio "
        "| partner-absent false-yes | CHAIR_i | CHAIR_s | recall | words | time (s) |"
    )
    lines = []
    if meta:
        lines.append(" ".join(f"{k}={v}" for k, v in meta.items()))
        lines.append("")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]

    def pope(r: dict, split: str) -> str:
        m = r.get(f"pope_{split}")
        return f"{m['accuracy']:.3f} / {m['f1']:.3f}" if m else "-"

    for r in rows:
        cap = r.get("caption", {})
        lines.append(
            f"| {r['config']} | {pope(r, 'random')} | {pope(r, 'popular')} | {pope(r, 'adversarial')} "
            f"| {_f(r.get('pope_adversarial', {}).get('yes_ratio'))} | {_f(r.get('partner_absent_false_yes'))} "
            f"| {_f(cap.get('chair_i'))} | {_f(cap.get('chair_s'))} | {_f(cap.get('recall'))} "
            f"| {cap.get('mean_length_words', 0):.1f} | {r['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed", help="'testbed' or a local llava-hf checkpoint directory")
    parser.add_argument("--n", type=int, default=60, help="fresh scenes (the same for every configuration)")
    parser.add_argument("--seed", type=int, default=CALIBRATION_SEED, help="scene seed (a calibration seed, not 12345)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default=None, help="a named grid (default: defaults)")
    parser.add_argument(
        "--config", action="append", default=[], help="a configuration, e.g. 'vhr+pai:gamma=1' (repeatable)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--reference-scenes", type=int, default=2000, help="scenes for POPE popular/adversarial statistics"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    parser.add_argument("--md", type=Path, default=None, help="write a markdown table")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be >= 1")
    from mitigation.methods import MethodError

    configs = list(GRIDS[args.grid]) if args.grid else []
    configs += args.config
    if not configs:
        configs = list(GRIDS["defaults"])
    try:
        for c in configs:
            parse_config(c)
    except MethodError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    from vlm import CheckpointError, load_vlm

    try:
        vlm = load_vlm(args.model)
    except CheckpointError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    rows = run_sweep(
        vlm, configs, args.n, args.seed, args.batch_size, args.reference_scenes, log=lambda s: print(s, file=sys.stderr)
    )
    meta = {"model": vlm.name, "n_scenes": args.n, "seed": args.seed, "device": str(vlm.device)}
    payload = {"meta": meta, "rows": rows}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=1))
    md = to_markdown(rows, meta)
    if args.md is not None:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

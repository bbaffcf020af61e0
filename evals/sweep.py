"""A small sweep of the mitigation methods on the testbed, for choosing settings before a measurement.

Each configuration (the baseline, each method at its defaults, a small grid) is evaluated by the
testbed eval suites (`testbed-pope`, `testbed-chair`: one in-process eval job per configuration,
`evals.testbed_metrics`) on the same fresh scenes of a *calibration* seed (not the held-out evaluation seed
12345, so settings are not tuned on the numbers that are reported), with only what the mitigation
table needs: the POPE splits, the partner-absent false-yes rate, and caption CHAIR_i / CHAIR_s /
recall / length (CHAIR without length and recall is not to be trusted). Per configuration the wall
time is reported too (same machine, same scenes: comparable within one run).

    python -m evals.sweep --model testbed --n 60 --grid small --out sweep.json --md sweep.md
    python -m evals.sweep --config baseline --config "vhr+pai:gamma=1" --n 10
    python -m evals.sweep --table out/mitigation --n-cal 60 --n 200   # the README's method table

`--table DIR` makes the whole measurement: the `small` grid on the calibration seed (DIR/calibration.jsonl),
each method's best setting chosen there (`choose_best`), then baseline, every method at its defaults,
every best setting and the composition of the two best methods on the held-out seed 12345
(DIR/heldout.jsonl), written as DIR/table.md and DIR/table.json. Rows already in a jsonl file (same
configuration, seed and n) are reused, so an interrupted run resumes and several processes can fill the
files (`--append FILE` with `--config`).

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

from evals.testbed_metrics import testbed_metrics
from mitigation.methods.registry import BASELINE
from mitigation.seam.request import CompositionError

CALIBRATION_SEED = 4242
HELDOUT_SEED = 12345
SWEEP_SUITES = ("testbed-pope", "testbed-chair")  # POPE splits + partner-absent, captions

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
    model: str,
    configs: Sequence[str],
    n_scenes: int = 60,
    seed: int = CALIBRATION_SEED,
    batch_size: int = 16,
    log=None,
) -> list[dict]:
    """Evaluate each configuration on the same scenes; returns one row per configuration."""
    methods_by_config = [(c, parse_config(c)) for c in configs]  # every spec checked before any work
    rows = []
    for label, methods in methods_by_config:
        t0 = time.perf_counter()
        specs = [json.dumps(m.to_json()) for m in methods]
        metrics = testbed_metrics(model, n_scenes, seed, specs, SWEEP_SUITES, batch_size, progress=False)
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


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _key(row: dict) -> tuple:
    return (row["config"], row["seed"], row["n_scenes"])


def fill(model: str, path: Path, configs: Sequence[str], n_scenes: int, seed: int, log=None, **kw) -> list[dict]:
    """Rows for `configs` at (seed, n_scenes): those already in the jsonl `path` are reused, the others are
    evaluated and appended one by one (an interrupted run loses at most the configuration in progress)."""
    have = {_key(r): r for r in read_rows(path)}
    out = []
    for config in configs:
        row = have.get((config, seed, n_scenes))
        if row is None:
            (row,) = run_sweep(model, [config], n_scenes, seed, log=log, **kw)
            row.update(seed=seed, n_scenes=n_scenes)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            have[_key(row)] = row
        out.append(row)
    return out


def _objective(row: dict, base: dict) -> float:
    """Relative cut of the partner-absent false-yes rate plus relative cut of CHAIR_i (higher is better)."""

    def cut(a: float, b: float) -> float:
        return (b - a) / b if b > 0 else 0.0

    return cut(row["partner_absent_false_yes"], base["partner_absent_false_yes"]) + cut(
        row["caption"]["chair_i"], base["caption"]["chair_i"]
    )


def admissible(row: dict, base: dict, tolerance: float = 0.01) -> bool:
    """The issue's guard rails: POPE-random accuracy and caption recall drop by at most `tolerance`."""
    return (
        row["pope_random"]["accuracy"] >= base["pope_random"]["accuracy"] - tolerance
        and row["caption"]["recall"] >= base["caption"]["recall"] - tolerance
    )


def choose_best(rows: Sequence[dict]) -> dict[str, str]:
    """Per method, the calibration configuration with the best `_objective` among the `admissible` ones
    (the defaults if none is admissible). Single-method configurations only."""
    base = next(r for r in rows if r["config"] == BASELINE)
    best: dict[str, tuple[float, str]] = {}
    for r in rows:
        if r["config"] == BASELINE or "+" in r["config"]:
            continue
        name = r["config"].split(":")[0]
        score = _objective(r, base) if admissible(r, base) else float("-inf")
        if name not in best or score > best[name][0] or (score == best[name][0] and ":" not in r["config"]):
            best[name] = (score, r["config"])
    return {name: cfg for name, (_, cfg) in sorted(best.items())}


def run_table(model: str, out: Path, n_cal: int, n_heldout: int, log=None) -> dict:
    """The method table (see the module doc). Returns {"chosen", "combination", "rows"}."""
    cal = fill(model, out / "calibration.jsonl", GRIDS["small"], n_cal, CALIBRATION_SEED, log)
    chosen = choose_best(cal)
    base = next(r for r in cal if r["config"] == BASELINE)
    ranked = sorted(chosen.values(), key=lambda c: -_objective(next(r for r in cal if r["config"] == c), base))
    combination: str | None = "+".join(ranked[:2])
    try:
        parse_config(combination)
    except CompositionError as e:  # e.g. two methods guiding by the same image-free stream
        if log is not None:
            log(f"sweep: the two best settings do not compose ({e}); no combination row")
        combination = None
    configs = list(GRIDS["defaults"]) + [c for c in chosen.values() if c not in GRIDS["defaults"]]
    configs += [combination] if combination else []
    rows = fill(model, out / "heldout.jsonl", configs, n_heldout, HELDOUT_SEED, log)
    result = {
        "chosen_on_calibration": chosen,
        "combination": combination,
        "n_calibration": n_cal,
        "n_heldout": n_heldout,
        "rows": rows,
    }
    (out / "table.json").write_text(json.dumps(result, indent=1))
    meta = {
        "model": model,
        "heldout_seed": HELDOUT_SEED,
        "n_scenes": n_heldout,
        "settings_chosen_on": f"seed {CALIBRATION_SEED}, {n_cal} scenes",
    }
    (out / "table.md").write_text(to_markdown(rows, meta))
    return result


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
    parser = argparse.ArgumentParser(prog="python -m evals.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed", help="'testbed' or a local llava-hf checkpoint directory")
    parser.add_argument("--n", type=int, default=60, help="fresh scenes (the same for every configuration)")
    parser.add_argument("--seed", type=int, default=CALIBRATION_SEED, help="scene seed (a calibration seed, not 12345)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default=None, help="a named grid (default: defaults)")
    parser.add_argument(
        "--config", action="append", default=[], help="a configuration, e.g. 'vhr+pai:gamma=1' (repeatable)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    parser.add_argument("--append", type=Path, default=None, help="reuse / append rows in this jsonl file")
    parser.add_argument("--table", type=Path, default=None, help="make the whole method table in this folder")
    parser.add_argument("--n-cal", type=int, default=60, help="--table: calibration scenes")
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
    from vlm import CheckpointError
    from vlm.checkpoint import inspect_checkpoint

    try:
        inspect_checkpoint(args.model)
    except CheckpointError as e:
        print(f"sweep: error: {e}", file=sys.stderr)
        return 2
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    if args.table is not None:
        result = run_table(args.model, args.table, args.n_cal, args.n, log)
        print((args.table / "table.md").read_text())
        print(json.dumps({"chosen": result["chosen_on_calibration"], "combination": result["combination"]}))
        return 0
    if args.append is not None:
        rows = fill(args.model, args.append, configs, args.n, args.seed, log, batch_size=args.batch_size)
    else:
        rows = run_sweep(args.model, configs, args.n, args.seed, args.batch_size, log=log)
    meta = {"model": args.model, "n_scenes": args.n, "seed": args.seed}
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

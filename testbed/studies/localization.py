"""Localization accuracy of attention heads on the shapes world, where the ground truth is exact.

For the query "the {colour} {shape}" of every object whose category is unique in its scene, on fresh
held-out scenes (`scenes(seed, n, WorldConfig())`) and on scenes drawn by other code (`testbed.world.foreign`):

* pointing: the located point (hottest cell of the combined map) lies on the object's visible mask
  (`grounding.scoring.on_mask`; per head: `grounding.scoring.pointing_hit`);
* box accuracy: IoU >= 0.5 of the located box with the object's box;
* a per-(layer, head) pointing table (each head's hottest cell, unsmoothed), and the per-layer head-mean
  baseline of the gaze notes, for both the last prompt row and the phrase's rows.

One prefill per batch records every layer; the combined maps are kept (small), so several `LocateParams`
(smoothing, threshold) are scored on the same run. `python -m testbed.studies.localization --model DIR` runs the
comparison of prompt templates x text rows and prints a JSON report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from grounding.calibration import calibration_from_testbed
from grounding.heads import HeadParams, HeadSelection, load_or_discover
from grounding.location import LocateParams, box_and_point, combine_heads
from grounding.readout import ROWS, iter_attention
from grounding.scoring import box_iou, on_mask, pointing_hits
from testbed.world.foreign import draw_foreign_scene
from testbed.world.scenes import WorldConfig, referable_objects, scenes
from vlm import VLM, ImageLayout, load_vlm

#: Prompt templates compared: the paper's bare phrase, and the two question families the testbed model
#: was trained on that name a single object.
TEMPLATES = ("{query}", "Where is {query}?", "Is there a {noun} in the image?")


@dataclass(frozen=True)
class Item:
    """One query with its ground truth: `mask` [H, W] bool visible pixels, `bbox` (x0, y0, x1, y1)
    exclusive, both in ORIGINAL image pixels; `split` "heldout", "foreign" or "calibration" (the
    calibration scenes themselves, for choosing settings without touching the held-out splits)."""

    image: object = field(repr=False)
    query: str
    mask: np.ndarray = field(repr=False)
    bbox: tuple[int, int, int, int]
    split: str


def eval_items(seed: int = 12345, n_scenes: int = 200, n_foreign: int = 150, split: str = "heldout") -> list[Item]:
    """Scenes `scenes(seed, n_scenes, WorldConfig())` (labelled `split`) and foreign scenes (seeds
    seed + 7919 (i+1), as `testbed.studies.evaluate` draws them); one item per object whose category is unique in
    its scene (the calibration set's rule, so `eval_items(4242, 200, 0, "calibration")` is its ground
    truth)."""
    items = []
    for s in scenes(seed, n_scenes, WorldConfig()):
        for o in referable_objects(s):
            items.append(Item(s.image, f"the {o.color} {o.shape}", o.mask, o.bbox, split))
    for i in range(n_foreign):
        f = draw_foreign_scene(seed + 7919 * (i + 1))
        for o in f.objects:  # foreign categories are distinct within a scene
            items.append(Item(f.image, f"the {o.color} {o.shape}", o.mask, o.bbox, "foreign"))
    return items


@dataclass
class LocalizationRun:
    """Per item: the combined map of the selection's heads, plus head-level pointing tables."""

    selection: HeadSelection
    template: str
    rows: str
    items: list[Item] = field(repr=False)
    combined: list[np.ndarray] = field(repr=False)
    layouts: list[ImageLayout] = field(repr=False)
    head_hits: dict[str, np.ndarray] = field(repr=False)  # rows -> [items, L, H] bool
    layer_mean_hits: dict[str, np.ndarray] = field(repr=False)  # rows -> [items, L] bool

    def score(self, params: LocateParams = LocateParams()) -> dict:
        """Pointing, box accuracy (IoU >= 0.5) and mean IoU per split, and "all" = held-out + foreign."""
        out: dict = {}
        rows = []
        for item, grid_map, layout in zip(self.items, self.combined, self.layouts):
            box, point, _, _ = box_and_point(grid_map, layout, params)
            rows.append((item.split, on_mask(item.mask, point), box_iou(box, item.bbox)))
        for split in ("calibration", "heldout", "foreign", "all"):
            sel = [r for r in rows if r[0] == split or (split == "all" and r[0] in ("heldout", "foreign"))]
            if sel:
                out[split] = {
                    "pointing": round(float(np.mean([r[1] for r in sel])), 4),
                    "box_accuracy": round(float(np.mean([r[2] >= 0.5 for r in sel])), 4),
                    "mean_iou": round(float(np.mean([r[2] for r in sel])), 4),
                    "n": len(sel),
                }
        return out

    def head_table(self, rows: str, split: str = "heldout") -> np.ndarray:
        """[L, H] pointing of every single head (its hottest cell) on one split."""
        idx = [i for i, it in enumerate(self.items) if split == "all" or it.split == split]
        return self.head_hits[rows][idx].mean(0)

    def layer_baseline(self, rows: str, split: str = "heldout") -> np.ndarray:
        """[L] pointing of each layer's head-mean map (the gaze notes' baseline)."""
        idx = [i for i, it in enumerate(self.items) if split == "all" or it.split == split]
        return self.layer_mean_hits[rows][idx].mean(0)


def run_localization(
    vlm: VLM,
    items: list[Item],
    selection: HeadSelection,
    template: str | None = None,
    rows: str | None = None,
    batch_size: int = 16,
) -> LocalizationRun:
    """One pass over `items` (every layer recorded) with the selection's template and rows (or those
    given); keeps each item's combined map and the head-level hits."""
    template = template or selection.params.prompt
    rows = rows or selection.params.rows
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
    combined, layouts = [], []
    head_hits: dict[str, list[np.ndarray]] = {r: [] for r in ROWS}
    layer_hits: dict[str, list[np.ndarray]] = {r: [] for r in ROWS}
    images = [it.image for it in items]
    queries = [it.query for it in items]
    for item, qa in zip(items, iter_attention(vlm, images, queries, template, None, batch_size)):
        combined.append(combine_heads(qa, selection.heads, rows))
        layouts.append(qa.layout)
        for r in ROWS:
            maps = qa.maps(r)  # [L, H, N]
            head_hits[r].append(pointing_hits(maps, qa.layout, item.mask))
            layer_hits[r].append(pointing_hits(maps.mean(1), qa.layout, item.mask))
    return LocalizationRun(
        selection,
        template,
        rows,
        items,
        combined,
        layouts,
        {r: np.stack(v) for r, v in head_hits.items()},
        {r: np.stack(v) for r, v in layer_hits.items()},
    )


def compare_settings(
    vlm: VLM,
    templates: Sequence[str] = TEMPLATES,
    rows_choices: Sequence[str] = ROWS,
    calib_seed: int = 4242,
    calib_scenes: int = 200,
    eval_seed: int = 12345,
    n_scenes: int = 200,
    n_foreign: int = 150,
    variants: dict[str, LocateParams] | None = None,
    cache_dir: str | None = None,
    batch_size: int = 16,
    score_calibration: bool = True,
) -> dict:
    """Discover heads per (template, rows) on calibration scenes, then score them on held-out + foreign
    scenes with each `LocateParams` variant; also the per-head table and per-layer head-mean baselines.
    With `score_calibration` the calibration scenes are scored too (split "calibration"): settings are
    chosen there, and the held-out splits only report."""
    variants = variants or {"default": LocateParams()}
    calibration = calibration_from_testbed(calib_seed, calib_scenes)
    items = eval_items(eval_seed, n_scenes, n_foreign)
    if score_calibration:  # same scenes and phrases as the calibration set, with their ground truth
        items = eval_items(calib_seed, calib_scenes, 0, "calibration") + items
    report: dict = {
        "model": str(vlm.path),
        "calibration": calibration.name,
        "calibration_samples": len(calibration),
        "eval": {"seed": eval_seed, "scenes": n_scenes, "foreign": n_foreign, "items": len(items)},
        "splits": sorted({it.split for it in items}),
        "variants": {k: asdict(v) for k, v in variants.items()},
        "settings": [],
    }
    for template in templates:
        for rows in rows_choices:
            params = HeadParams(prompt=template, rows=rows)
            selection = load_or_discover(vlm, calibration, params, cache_dir=cache_dir, batch_size=batch_size)
            run = run_localization(vlm, items, selection, batch_size=batch_size)
            entry = {
                "prompt": template,
                "rows": rows,
                "heads": [list(h) for h in selection.heads],
                "scores": {name: run.score(v) for name, v in variants.items()},
                "best_single_head": _best_head(run.head_table(rows)),
                "head_pointing_heldout": np.round(run.head_table(rows), 3).tolist(),
                "layer_mean_baseline_heldout": {r: np.round(run.layer_baseline(r), 3).tolist() for r in ROWS},
                "layer_mean_baseline_foreign": {
                    r: np.round(run.layer_baseline(r, "foreign"), 3).tolist() for r in ROWS
                },
            }
            report["settings"].append(entry)
            logging.getLogger(__name__).info("%s / %s: %s", template, rows, entry["scores"])
    return report


def summary_table(report: dict, variant: str | None = None) -> str:
    """Markdown: one line per (prompt, rows) with pointing / box accuracy per split for one variant (the
    first if None), the heads, the best single head and the best per-layer head-mean baseline."""
    variant = variant or next(iter(report["variants"]))
    splits = [s for s in ("calibration", "heldout", "foreign") if s in report.get("splits", ["heldout", "foreign"])]
    head = "| prompt | rows | heads | " + " | ".join(f"{s} point / box" for s in splits)
    lines = [head + " | best single head (held-out) | best layer mean, last / query rows (held-out) |"]
    lines.append("|" + "---|" * (len(splits) + 5))
    for e in report["settings"]:
        sc = e["scores"][variant]
        cells = [f"{sc[s]['pointing']:.3f} / {sc[s]['box_accuracy']:.3f}" for s in splits]
        base = e["layer_mean_baseline_heldout"]
        best = " / ".join(f"{max(base[r]):.3f} (L{int(np.argmax(base[r]))})" for r in ROWS)
        bh = e["best_single_head"]
        lines.append(
            f"| `{e['prompt']}` | {e['rows']} | {e['heads']} | "
            + " | ".join(cells)
            + f" | {bh['head']}: {bh['pointing']:.3f} | {best} |"
        )
    return "\n".join(lines)


def _best_head(table: np.ndarray) -> dict:
    layer, head = np.unravel_index(int(np.argmax(table)), table.shape)
    return {"head": [int(layer), int(head)], "pointing": round(float(table[layer, head]), 4)}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m testbed.studies.localization", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="testbed")
    ap.add_argument("--calib-scenes", type=int, default=200)
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--foreign", type=int, default=150)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=None, help="write the JSON report here (default: stdout)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    vlm = load_vlm(args.model)
    variants = {"paper: sigma 1, > mean, largest": LocateParams()}
    for sigma in (0.5, 1.0):
        for frac in (0.3, 0.5):
            for component in ("largest", "peak"):
                name = f"sigma {sigma}, >= {frac} peak, {component}"
                variants[name] = LocateParams(
                    sigma=sigma, threshold="peak_fraction", peak_fraction=frac, component=component
                )
    variants["sigma 0.5, > mean, largest"] = LocateParams(sigma=0.5)
    report = compare_settings(
        vlm,
        calib_scenes=args.calib_scenes,
        n_scenes=args.scenes,
        n_foreign=args.foreign,
        variants=variants,
        cache_dir=args.cache_dir,
    )
    print(summary_table(report), file=sys.stderr)
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()

"""Quality of a SAM on fresh held-out shapes-world scenes (`lucid testbed eval-sam`).

Prompt kinds, each scored by IoU with the object's exact visible mask at the original resolution:

* `point`: one random interior pixel, three masks, the top-scored one (how SAM is used on a click);
* `point_single`: the same point, one mask;
* `box`: the object's tight box;
* `points`: two interior pixels and one background pixel;
* `point_box`: the point and the box;
* `refine`: the `point` prompt again with its chosen mask's low-res logits fed back as `mask_input`
  (one mask): must not be worse than `point`.

Splits: `heldout` (`WorldConfig()` scenes at independent widths and heights of 64-256 px, seeds never
used in training) and `foreign` (`testbed.world.foreign`, drawn by matplotlib at 64-320 px).

`attention_to_sam` scores the text-query path of `lucid segment` on the localization items of
`testbed.studies.localization.eval_items` ("the {colour} {shape}" for objects unique in their scene): mask mIoU
and box accuracy (the mask's box at IoU >= 0.5 with the object's box) for each attention prompt, beside
the oracle (a ground-truth interior point -> SAM).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
from tqdm import tqdm

from grounding.sam import SamPrompt, Segmenter
from grounding.scoring import average_precision, box_iou, mask_iou, match_detections, on_mask
from grounding.segment import ATTENTION_PROMPTS, attention_prompt
from testbed.world.foreign import draw_foreign_scene
from testbed.world.scenes import WorldConfig, render_scene

log = logging.getLogger(__name__)
KINDS = ("point", "point_single", "box", "points", "point_box", "refine")


def heldout_scenes(seed: int, n: int) -> Iterable[tuple[object, list, str]]:
    """(image, [(label, mask, bbox)], split) for `n` held-out scenes at random sizes."""
    for i in range(n):
        ss = np.random.SeedSequence([seed, i, 17])
        rng = np.random.default_rng(ss)
        w, h = (int(v) for v in rng.integers(64, 257, 2))
        scene = render_scene(int(ss.generate_state(1)[0]), WorldConfig(size=(w, h)))
        yield scene.image, [(o.name, o.mask, o.bbox) for o in scene.objects], "heldout"


def foreign_scenes(seed: int, n: int) -> Iterable[tuple[object, list, str]]:
    for i in range(n):
        f = draw_foreign_scene(seed + 104_729 * (i + 1))
        yield f.image, [(f"{o.color} {o.shape}", o.mask, o.bbox) for o in f.objects if o.mask.any()], "foreign"


def _pixel(rng: np.random.Generator, mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    i = int(rng.integers(len(xs)))
    return float(xs[i]), float(ys[i])


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """The mask pixel nearest the mask's centroid (a ground-truth interior point)."""
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean(), ys.mean()
    i = int(np.argmin((xs - cx) ** 2 + (ys - cy) ** 2))
    return float(xs[i]), float(ys[i])


def prompt_quality(
    segmenter: Segmenter, seed: int = 2024, n_scenes: int = 300, n_foreign: int = 100, progress: bool = True
) -> dict:
    """mIoU per split and prompt kind (and per shape for `point` / `box`), with object counts."""
    rng = np.random.default_rng(seed)
    ious: dict[tuple[str, str], list[float]] = defaultdict(list)
    by_shape: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    embed_s, decode_s = [], []
    items = list(heldout_scenes(seed, n_scenes)) + list(foreign_scenes(seed, n_foreign))
    for image, objects, split in tqdm(items, desc="eval-sam", disable=not progress, mininterval=5):
        if not objects:
            continue
        prompts, meta = [], []
        for label, mask, bbox in objects:
            pt = _pixel(rng, mask)
            box = tuple(float(v) for v in bbox)
            ys, xs = np.nonzero(~mask)
            j = int(rng.integers(len(xs)))
            two = (pt, _pixel(rng, mask), (float(xs[j]), float(ys[j])))
            prompts += [
                SamPrompt((pt,), (1,), multimask=True),
                SamPrompt((pt,), (1,), multimask=False),
                SamPrompt(box=box),
                SamPrompt(two, (1, 1, 0)),
                SamPrompt((pt,), (1,), box),
            ]
            meta.append((label, mask))
        results = segmenter.segment(image, prompts)
        embed_s.append(segmenter.timings["embed"])
        decode_s.append(segmenter.timings["decode"] / len(prompts))
        refine = []
        for k, (label, mask) in enumerate(meta):
            rs = results[5 * k : 5 * k + 5]
            for kind, r in zip(KINDS[:5], rs):
                ious[(split, kind)].append(mask_iou(r.mask, mask))
            by_shape[(split, "point", label.split()[-1])].append(mask_iou(rs[0].mask, mask))
            by_shape[(split, "box", label.split()[-1])].append(mask_iou(rs[2].mask, mask))
            first = prompts[5 * k]
            refine.append(SamPrompt(first.points, (1,), mask_input=rs[0].low_res[rs[0].best], multimask=False))
        for (_label, mask), r in zip(meta, segmenter.segment(image, refine)):
            ious[(split, "refine")].append(mask_iou(r.mask, mask))
    out: dict = {"seed": seed, "n_scenes": n_scenes, "n_foreign": n_foreign}
    for split in ("heldout", "foreign"):
        rows = {kind: round(float(np.mean(ious[(split, kind)])), 4) for kind in KINDS if ious[(split, kind)]}
        rows["objects"] = len(ious[(split, "point")])
        rows["point_iou_ge_0.5"] = round(float(np.mean(np.array(ious[(split, "point")]) >= 0.5)), 4)
        rows["by_shape"] = {
            f"{kind}/{shape}": round(float(np.mean(v)), 4)
            for (s, kind, shape), v in sorted(by_shape.items())
            if s == split
        }
        out[split] = rows
    out["latency_ms"] = {
        "embed_p50": round(1000 * float(np.median(embed_s)), 2),
        "decode_per_prompt_p50": round(1000 * float(np.median(decode_s)), 2),
    }
    return out


def attention_to_sam(
    vlm,
    segmenter: Segmenter,
    selection,
    seed: int = 12345,
    n_scenes: int = 200,
    n_foreign: int = 100,
    locate_params=None,
    progress: bool = True,
) -> dict:
    """mIoU and box accuracy of attention -> SAM per attention prompt, beside the oracle, per split."""
    from grounding.location import LocateParams, locate_batch
    from testbed.studies.localization import eval_items

    items = eval_items(seed, n_scenes, n_foreign)
    params = locate_params or LocateParams()
    scores: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    pointing: dict[str, list[bool]] = defaultdict(list)
    batch = 16
    for start in tqdm(range(0, len(items), batch), desc="attention->sam", disable=not progress, mininterval=5):
        chunk = items[start : start + batch]
        locs = locate_batch(vlm, [it.image for it in chunk], [it.query for it in chunk], selection, params)
        for it, loc in zip(chunk, locs):
            prompts = [attention_prompt(loc, how) for how in ATTENTION_PROMPTS]
            prompts.append(SamPrompt((interior_point(it.mask),), (1,)))
            for how, r in zip((*ATTENTION_PROMPTS, "oracle_point"), segmenter.segment(it.image, prompts)):
                iou = mask_iou(r.mask, it.mask)
                mb = r.boxes()[r.best]
                scores[(it.split, how)].append(
                    (iou, float(box_iou(tuple(mb), tuple(float(v) for v in it.bbox)) >= 0.5))
                )
            x, y = prompts[0].points[0]
            pointing[it.split].append(on_mask(it.mask, (x, y)))
    out: dict = {"seed": seed, "n_scenes": n_scenes, "n_foreign": n_foreign, "locate": params.__dict__}
    for split in sorted(pointing):
        row = {"items": len(pointing[split]), "pointing": round(float(np.mean(pointing[split])), 4)}
        for how in (*ATTENTION_PROMPTS, "oracle_point"):
            v = np.array(scores[(split, how)])
            row[how] = {"miou": round(float(v[:, 0].mean()), 4), "box_acc": round(float(v[:, 1].mean()), 4)}
        out[split] = row
    return out


def read_to_sam(
    vlm,
    segmenter: Segmenter,
    specs: Iterable[str] = ("read",),
    seed: int = 12345,
    n_scenes: int = 200,
    n_foreign: int = 100,
    progress: bool = True,
) -> dict:
    """`attention_to_sam`'s items and scores for READ's similarity-as-points (`grounding.read`), one entry
    per spec ('read', 'read:token=last', ...): mask mIoU, box accuracy, the share of items whose first
    positive point lies on the object ("pointing"), and the map's AUC (`_map_auc`)."""
    from grounding.read import parse_read, read_batch, read_prompt
    from testbed.studies.localization import eval_items

    items = eval_items(seed, n_scenes, n_foreign)
    out: dict = {"seed": seed, "n_scenes": n_scenes, "n_foreign": n_foreign}
    batch = 16
    for spec in specs:
        params = parse_read(spec)
        scores: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        tokens = set()
        for start in tqdm(range(0, len(items), batch), desc=spec, disable=not progress, mininterval=5):
            chunk = items[start : start + batch]
            results = read_batch(vlm, [it.image for it in chunk], [it.query for it in chunk], params)
            for it, res in zip(chunk, results):
                tokens.add(res.token)
                prompt = read_prompt(res, params)
                r = segmenter.segment(it.image, [prompt])[0]
                first = prompt.points[prompt.labels.index(1)]
                box_ok = float(box_iou(tuple(r.boxes()[r.best]), tuple(float(v) for v in it.bbox)) >= 0.5)
                scores[it.split].append(
                    (mask_iou(r.mask, it.mask), box_ok, float(on_mask(it.mask, first)), _map_auc(res, it.mask))
                )
        out[spec] = {"token": sorted(tokens), "params": params.changed(), **_split_rows(scores, "map_auc", np.nanmean)}
    return out


def _split_rows(scores: dict[str, list[tuple]], fourth: str, reduce) -> dict:
    """Per split, from (mask IoU, box hit, pointing hit, a fourth value) per item: the items, mIoU, box
    accuracy, pointing and `fourth` (its mean by `reduce`), rounded to 4 places."""
    rows = {}
    for split in sorted(scores):
        v = np.array(scores[split])
        rows[split] = {
            "items": len(v),
            "miou": round(float(v[:, 0].mean()), 4),
            "box_acc": round(float(v[:, 1].mean()), 4),
            "pointing": round(float(v[:, 2].mean()), 4),
            fourth: round(float(reduce(v[:, 3])), 4),
        }
    return rows


def _map_auc(res, mask: np.ndarray) -> float:
    """How well the similarity map ranks the object's pixels above the rest of the visible image: the
    Mann-Whitney AUC of the map painted onto the original pixels (0.5 = chance, 1 = every object pixel
    above every other pixel; NaN when either side is empty)."""
    from scipy.stats import rankdata

    painted = res.layout.to_original_map(res.values)
    seen = ~np.isnan(painted)
    obj, rest = painted[seen & mask], painted[seen & ~mask]
    if not len(obj) or not len(rest):
        return float("nan")
    ranks = rankdata(np.concatenate([obj, rest]))
    return float((ranks[: len(obj)].sum() - len(obj) * (len(obj) + 1) / 2) / (len(obj) * len(rest)))


def vlsam_to_sam(
    vlm,
    segmenter: Segmenter,
    specs: Iterable[str] = ("vl-sam",),
    seed: int = 12345,
    n_scenes: int = 200,
    n_foreign: int = 100,
    progress: bool = True,
) -> dict:
    """`attention_to_sam`'s referring items ("the {colour} {shape}") and scores for VL-SAM
    (`grounding.vlsam`, referring mode), one entry per spec ('vl-sam', 'vl-sam:iterations=0', ...): mask
    mIoU, box accuracy, the share of items whose final positive point lies on the object ("pointing"),
    and the mean seconds per item (maps + SAM)."""
    import time

    from grounding.vlsam import parse_vlsam, segment_vlsam
    from testbed.studies.localization import eval_items

    items = eval_items(seed, n_scenes, n_foreign)
    out: dict = {"seed": seed, "n_scenes": n_scenes, "n_foreign": n_foreign}
    for spec in specs:
        params = parse_vlsam(spec)
        scores: dict[str, list[tuple[float, float, float, float]]] = defaultdict(list)
        for it in tqdm(items, desc=spec, disable=not progress, mininterval=5):
            t = time.perf_counter()
            objects, _ = segment_vlsam(vlm, segmenter, it.image, it.query, params)
            dt = time.perf_counter() - t
            if not objects:
                scores[it.split].append((0.0, 0.0, 0.0, dt))
                continue
            o = objects[0]
            box_ok = float(box_iou(tuple(o.box), tuple(float(v) for v in it.bbox)) >= 0.5)
            first = next(p for p in o.points if p[2] == 1)
            scores[it.split].append((mask_iou(o.mask, it.mask), box_ok, float(on_mask(it.mask, first[:2])), dt))
        out[spec] = {"params": params.changed(), **_split_rows(scores, "s_per_item", np.mean)}
    return out


def detection_hits(objects, gt: list[tuple[str, np.ndarray, tuple]]) -> dict[str, list[bool]]:
    """Open-ended detections (`.label`, `.score`, `.box`, `.mask`) against a scene's objects (name, mask,
    box): per kind ("box", "mask") whether each detection, in order of decreasing score, is a true positive
    at IoU 0.5 (`grounding.scoring.match_detections`). `vlsam_open_ended` and the `testbed-detect` eval
    suite both score with it."""
    ranked = sorted(objects, key=lambda o: -o.score)
    labels, scores, names = [o.label for o in ranked], [o.score for o in ranked], [g[0] for g in gt]
    out = {}
    for kind in ("box", "mask"):
        iou = np.zeros((len(ranked), len(gt)))
        for i, o in enumerate(ranked):
            for j, (name, mask, bbox) in enumerate(gt):
                if name == o.label:
                    iou[i, j] = box_iou(tuple(o.box), bbox) if kind == "box" else mask_iou(o.mask, mask)
        out[kind] = [m is not None for m in match_detections(labels, scores, names, iou)]
    return out


def vlsam_open_ended(
    vlm,
    segmenter: Segmenter,
    specs: Iterable[str] = ("vl-sam",),
    seed: int = 12345,
    n_scenes: int = 200,
    progress: bool = True,
) -> dict:
    """Open-ended VL-SAM (`lucid segment IMAGE --all`) on the held-out scenes of `attention_to_sam`
    (`scenes(seed, n_scenes, WorldConfig())`), against every visible object. A detection's label is
    matched to a ground-truth category by its exact name ("red circle"); per spec:

    * `box_ap50` / `mask_ap50`: COCO-style AP at IoU 0.5 per category (a detection is a true positive when
      it matches a not-yet-matched object of its category, greedy by score), averaged over the categories
      with ground truth;
    * `recall50`: share of objects matched by a detection of their category at mask IoU >= 0.5;
    * `named_recall`: share of the scenes' (scene, category) pairs the model named at all;
    * `named_absent`: share of the named (scene, label) pairs whose category is not visible in the scene;
    * `s_per_image`: seconds per image (maps + SAM)."""
    import time

    from grounding.sam import image_array
    from grounding.vlsam import merge, object_maps, parse_vlsam, refine
    from testbed.world.scenes import WorldConfig, scenes

    scene_list = list(scenes(seed, n_scenes, WorldConfig()))
    out: dict = {"seed": seed, "n_scenes": n_scenes, "objects": sum(len(s.objects) for s in scene_list)}
    for spec in specs:
        params = parse_vlsam(spec)
        det: dict[str, dict[str, list]] = {"box": defaultdict(list), "mask": defaultdict(list)}
        n_gt: dict[str, int] = defaultdict(int)
        matched = named_hit = named_total = absent = n_pairs = 0
        secs = []
        for s in tqdm(scene_list, desc=spec, disable=not progress, mininterval=5):
            t = time.perf_counter()
            maps = object_maps(vlm, s.image, None, params)
            objects = merge(refine(segmenter, image_array(s.image), maps, params), params) if maps else []
            secs.append(time.perf_counter() - t)
            gt = [(o.name, o.mask, tuple(float(v) for v in o.bbox)) for o in s.objects]
            for name, *_ in gt:
                n_gt[name] += 1
            present = {name for name, *_ in gt}
            labels = {m.label for m in maps}  # what the model named, before NMS
            named_total += len(labels)
            absent += len(labels - present)
            named_hit += len(labels & present)
            n_pairs += len(present)
            for kind, tps in detection_hits(objects, gt).items():
                for o, tp in zip(sorted(objects, key=lambda o: -o.score), tps):
                    det[kind][o.label].append((o.score, tp))
                if kind == "mask":
                    matched += sum(tps)
        row: dict = {"params": params.changed()}
        for kind in ("box", "mask"):
            aps = [average_precision(det[kind].get(c, []), n) for c, n in n_gt.items()]
            row[f"{kind}_ap50"] = round(float(np.nanmean(aps)), 4)
        row["recall50"] = round(matched / max(1, sum(n_gt.values())), 4)
        row["named_recall"] = round(named_hit / max(1, n_pairs), 4)
        row["named_absent"] = round(absent / max(1, named_total), 4)
        row["detections_per_image"] = round(sum(len(v) for v in det["mask"].values()) / max(1, len(scene_list)), 3)
        row["s_per_image"] = round(float(np.mean(secs)), 4)
        out[spec] = row
    return out

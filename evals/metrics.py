"""Metrics of the eval suites, computed from per-sample numbers, vectorised over bootstrap resamples.

Every suite reduces a judged sample to a few numbers (its `stats`, e.g. POPE's `pred_yes`, `label_yes`);
a metric kind aggregates arrays of them. The aggregators take arrays of shape [..., n] and return
metrics of shape [...], so the same code gives the point estimate (one row) and B bootstrap resamples
at once (`stats[..., idx]` with idx [B, n]).

Kinds:

* `binary` (POPE): accuracy, precision, recall, F1 and yes_ratio of the *predictions* ("yes" is the
  positive class); precision / recall / F1 are 0 where undefined (no predicted / no actual yes).
* `false_yes` (questions whose answer is "No"): false_yes_rate.
* `chair`: CHAIR_s (captions with at least one hallucinated object), CHAIR_i (hallucinated object
  mentions / object mentions), recall (ground-truth objects named / ground-truth objects), mean_length
  (words); with `absent_partner` stats also the testbed's partner_absent_named.
* `accuracy`: accuracy of exact answers.
* `box`: box_accuracy (IoU >= 0.5) and mean_iou.
* `locate` (testbed-locate): pointing (the located point on the object's mask), box_accuracy (IoU >= 0.5)
  and mean_iou of the located box.
* `mask` (testbed-segment): miou (mask IoU with the exact mask), iou_ge_0.5 (share of masks at IoU >=
  0.5), box_accuracy of the mask's box, pointing of the prompted pixel.
* `detect` (testbed-detect, one sample per scene): box_ap50 / mask_ap50 (COCO-style AP at IoU 0.5 per
  category over the pooled detections of the samples, `grounding.scoring.average_precision`, averaged
  over the categories with ground truth), recall50 (objects matched at mask IoU >= 0.5), named_recall
  (the scenes' categories the model named), named_absent (named categories not in their scene),
  detections_per_image. Its per-sample stats hold lists (a scene's detections and objects): `stack`
  keeps such a stat as an object array of arrays, and a bootstrap resample pools the resampled scenes'.

Intervals: percentile bootstrap over samples (`bootstrap`). Against the baseline: a *paired* bootstrap
of the difference (both configurations resampled with the same sample indices, so the pairing of
answers to the same question is kept) with a two-sided p-value, and for accuracies McNemar's exact test
on the discordant pairs (`mcnemar_exact`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b != 0)


def binary(s: Arrays) -> dict[str, np.ndarray]:
    p, y = np.asarray(s["pred_yes"], float), np.asarray(s["label_yes"], float)
    n = p.shape[-1]
    tp = (p * y).sum(-1)
    fp = (p * (1 - y)).sum(-1)
    tn = ((1 - p) * (1 - y)).sum(-1)
    fn = ((1 - p) * y).sum(-1)
    precision, recall = _div(tp, tp + fp), _div(tp, tp + fn)
    return {
        "accuracy": _div(tp + tn, n),
        "precision": precision,
        "recall": recall,
        "f1": _div(2 * precision * recall, precision + recall),
        "yes_ratio": _div(tp + fp, n),
    }


def false_yes(s: Arrays) -> dict[str, np.ndarray]:
    return {"false_yes_rate": np.asarray(s["pred_yes"], float).mean(-1)}


def chair(s: Arrays) -> dict[str, np.ndarray]:
    out = {
        "chair_s": np.asarray(s["hallucinated_any"], float).mean(-1),
        "chair_i": _div(np.asarray(s["hallucinated"], float).sum(-1), np.asarray(s["mentions"], float).sum(-1)),
        "recall": _div(np.asarray(s["covered"], float).sum(-1), np.asarray(s["truth"], float).sum(-1)),
        "mean_length": np.asarray(s["words"], float).mean(-1),
    }
    if "absent_partner" in s:  # testbed: of captions of scenes with an absent partner, the share naming one
        has = np.asarray(s["absent_partner"], float)
        out["partner_absent_named"] = _div((has * np.asarray(s["names_absent_partner"], float)).sum(-1), has.sum(-1))
    return out


def accuracy(s: Arrays) -> dict[str, np.ndarray]:
    return {"accuracy": np.asarray(s["correct"], float).mean(-1)}


def box(s: Arrays) -> dict[str, np.ndarray]:
    iou = np.asarray(s["iou"], float)
    return {"box_accuracy": (iou >= 0.5).astype(float).mean(-1), "mean_iou": iou.mean(-1)}


def locate(s: Arrays) -> dict[str, np.ndarray]:
    return {"pointing": np.asarray(s["on_object"], float).mean(-1), **box(s)}


def mask(s: Arrays) -> dict[str, np.ndarray]:
    iou, box_iou = np.asarray(s["mask_iou"], float), np.asarray(s["box_iou"], float)
    return {
        "miou": iou.mean(-1),
        "iou_ge_0.5": (iou >= 0.5).astype(float).mean(-1),
        "box_accuracy": (box_iou >= 0.5).astype(float).mean(-1),
        "pointing": np.asarray(s["on_object"], float).mean(-1),
    }


_DET_LISTS = ("det_label", "det_score", "det_box_tp", "det_mask_tp", "gt_label")


def _pool(arrays) -> np.ndarray:
    """The samples' per-sample arrays end to end (empty ones skipped, so labels stay strings)."""
    parts = [np.asarray(a) for a in arrays if len(a)]
    return np.concatenate(parts) if parts else np.zeros(0)


def detect(s: Arrays) -> dict[str, np.ndarray]:
    """Per row of samples (the leading dimensions of the object arrays): AP pools the row's detections
    (scene order, each scene's best first; stable sort by score), as `testbed.studies.sam_eval.vlsam_open_ended`."""
    from grounding.scoring import average_precision

    lists = {k: np.asarray(s[k], dtype=object) for k in _DET_LISTS}
    lead = lists["gt_label"].shape[:-1]
    out = {k: np.zeros(lead) for k in ("box_ap50", "mask_ap50")}
    for idx in np.ndindex(*lead):
        row = {k: v[idx] for k, v in lists.items()}
        labels, scores, gt = _pool(row["det_label"]), _pool(row["det_score"]).astype(float), _pool(row["gt_label"])
        names, counts = np.unique(gt, return_counts=True) if len(gt) else ([], [])
        for kind in ("box", "mask"):
            tp = _pool(row[f"det_{kind}_tp"]).astype(float)
            aps = [
                average_precision(list(zip(scores[labels == c].tolist(), tp[labels == c].tolist())), int(n))
                for c, n in zip(names, counts)
            ]
            out[f"{kind}_ap50"][idx] = float(np.mean(aps)) if aps else float("nan")
    objects = np.asarray(s["objects"], float).sum(-1)
    return {
        **out,
        "recall50": _div(np.asarray(s["matched"], float).sum(-1), objects),
        "named_recall": _div(np.asarray(s["named_present"], float).sum(-1), np.asarray(s["present"], float).sum(-1)),
        "named_absent": _div(np.asarray(s["named_absent"], float).sum(-1), np.asarray(s["named"], float).sum(-1)),
        "detections_per_image": np.asarray(s["detections"], float).mean(-1),
    }


KINDS = {
    "binary": binary,
    "false_yes": false_yes,
    "chair": chair,
    "accuracy": accuracy,
    "box": box,
    "locate": locate,
    "mask": mask,
    "detect": detect,
}
# which direction is better, per metric (for the report's arrows); unlisted: higher is better
LOWER_IS_BETTER = {"false_yes_rate", "chair_s", "chair_i", "partner_absent_named", "named_absent"}
# metrics with no better direction (POPE's yes-ratio: the share of "Yes" among the labels is right)
NO_DIRECTION = {"yes_ratio", "mean_length", "mean_words", "words", "detections_per_image"}
# a metric per kind that the report charts and tests against the baseline first
PRIMARY = {
    "binary": ("accuracy", "f1", "yes_ratio"),
    "false_yes": ("false_yes_rate",),
    "chair": ("chair_s", "chair_i", "recall"),
    "accuracy": ("accuracy",),
    "box": ("box_accuracy",),
    "locate": ("pointing", "box_accuracy"),
    "mask": ("miou", "iou_ge_0.5"),
    "detect": ("box_ap50", "mask_ap50", "recall50", "named_absent"),
}


def stack(records: list[dict]) -> dict[str, np.ndarray]:
    """Per-sample `stats` dicts -> one array per stat, in record order."""
    keys = records[0]["stats"].keys() if records else ()
    out = {}
    for k in keys:
        vals = [r["stats"][k] for r in records]
        if any(isinstance(v, list) for v in vals):  # a list per sample (testbed-detect): an object array of arrays
            out[k] = np.empty(len(vals), dtype=object)
            for i, v in enumerate(vals):
                out[k][i] = np.asarray(v)
        else:
            out[k] = np.array(vals, dtype=float)
    return out


def aggregate(kind: str, s: Arrays) -> dict[str, float]:
    return {k: float(v) for k, v in KINDS[kind](s).items()}


def _indices(n: int, b: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(b, n))


def bootstrap(kind: str, s: Arrays, b: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, tuple]:
    """Percentile bootstrap interval of every metric of `kind` over the samples."""
    n = len(next(iter(s.values())))
    if n == 0 or b <= 0:
        return {}
    idx = _indices(n, b, seed)
    boot = KINDS[kind]({k: np.asarray(v)[idx] for k, v in s.items()})
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    return {k: (float(np.quantile(v, lo)), float(np.quantile(v, hi))) for k, v in boot.items()}


def paired(kind: str, s: Arrays, base: Arrays, b: int = 1000, seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """Method minus baseline on the same samples (aligned arrays): the difference, its paired bootstrap
    interval and a two-sided bootstrap p-value (twice the share of resampled differences on the far
    side of 0, at least 1/(b+1))."""
    n = len(next(iter(s.values())))
    if n == 0 or b <= 0:
        return {}
    idx = _indices(n, b, seed)
    point_m, point_b = KINDS[kind](s), KINDS[kind](base)
    boot_m = KINDS[kind]({k: np.asarray(v)[idx] for k, v in s.items()})
    boot_b = KINDS[kind]({k: np.asarray(v)[idx] for k, v in base.items()})
    lo, hi = (1 - level) / 2, 1 - (1 - level) / 2
    out = {}
    for k in point_m:
        d = boot_m[k] - boot_b[k]
        diff = float(point_m[k] - point_b[k])
        if np.all(d == 0):
            p = 1.0
        else:
            p = min(1.0, 2 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
            p = max(p, 1 / (b + 1))
        out[k] = {"diff": diff, "ci": (float(np.quantile(d, lo)), float(np.quantile(d, hi))), "p": p}
    return out


def mcnemar_exact(correct: np.ndarray, base_correct: np.ndarray) -> dict[str, float]:
    """McNemar's exact test on paired 0/1 outcomes: b = right only with the method, c = right only with
    the baseline; p = two-sided binomial(b + c, 1/2) tail."""
    m, base = np.asarray(correct, bool), np.asarray(base_correct, bool)
    b = int(np.sum(m & ~base))
    c = int(np.sum(~m & base))
    n, k = b + c, min(b, c)
    p = 1.0 if n == 0 else min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    return {"method_only": b, "baseline_only": c, "p": p}


def wilson(k: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (centre - half, centre + half)

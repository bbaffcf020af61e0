"""How a located place is scored against exact ground truth: one definition of each rule.

* `on_mask`: a point (x, y) in ORIGINAL image pixels is on a [H, W] bool mask when the pixel containing
  it (floor of both coordinates) is inside the image and set;
* `pointing_hit`: a map over the image-token grid points at an object when its hottest cell's centre
  (`ImageLayout.cell_center`, original pixels) is `on_mask` (ties: the first cell in row-major order);
  `pointing_hits` does the same for a stack of maps;
* `box_iou`: IoU of two boxes (x0, y0, x1, y1);
* `mask_iou`: IoU of two bool masks (1.0 when both are empty);
* `match_detections`: labelled detections against labelled ground truth, greedy by score (a detection is
  a true positive when it matches a not-yet-matched object of its label at IoU >= 0.5);
* `average_precision`: COCO-style AP (101-point interpolated precision) of scored detections.

The testbed studies (`testbed.studies.localization`, `gaze`, `sam_eval`, `evaluate`) and the eval suites
(`testbed-locate`, `testbed-segment`, `testbed-detect`, `testbed-where`) all score with these. Pure numpy: no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vlm.layout import ImageView


def on_mask(mask: np.ndarray, xy: tuple[float, float]) -> bool:
    """Whether original pixel (x, y) lies on `mask` [H, W] bool (False outside the image)."""
    x, y = int(np.floor(xy[0])), int(np.floor(xy[1]))
    return 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and bool(mask[y, x])


def cells_on_mask(layout: ImageView, mask: np.ndarray) -> np.ndarray:
    """[rows, cols] bool: the grid cells whose centre (original pixels) lies on `mask` [H, W]."""
    rows, cols = layout.grid
    return np.array([[on_mask(mask, layout.cell_center(r, c)) for c in range(cols)] for r in range(rows)], dtype=bool)


def pointing_hits(
    maps: np.ndarray, layout: ImageView, mask: np.ndarray, *, cells: np.ndarray | None = None
) -> np.ndarray:
    """[..., N] maps over the layout's N = rows x cols cells (row-major) -> [...] bool: `pointing_hit`
    of each map. `cells`: `cells_on_mask(layout, mask)` if already computed (many maps of one object)."""
    maps = np.asarray(maps)
    on = cells_on_mask(layout, mask) if cells is None else np.asarray(cells, dtype=bool)
    best = maps.reshape(-1, maps.shape[-1]).argmax(-1)
    return on.reshape(-1)[best].reshape(maps.shape[:-1])


def pointing_hit(
    values_grid: np.ndarray, layout: ImageView, mask: np.ndarray, *, cells: np.ndarray | None = None
) -> bool:
    """Whether the hottest cell of `values_grid` ([rows, cols], or [N] row-major) has its centre on
    `mask` [H, W] (the object's visible pixels in the original image). `cells` as in `pointing_hits`."""
    return bool(pointing_hits(np.asarray(values_grid).reshape(-1), layout, mask, cells=cells))


def box_iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """IoU of boxes (x0, y0, x1, y1); 0.0 when the union is empty."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks of one shape; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def match_detections(
    labels: Sequence[str], scores: Sequence[float], truth: Sequence[str], iou: np.ndarray, threshold: float = 0.5
) -> list[int | None]:
    """Greedy matching by score: detections in order of decreasing score (ties: input order) each take the
    not-yet-matched ground-truth object of their own label with the highest IoU >= `threshold` (ties: the
    later object). `iou` [n_detections, n_truth] (box or mask IoU). Returns, per detection in input
    order, the index of its object, or None (a false positive)."""
    out: list[int | None] = [None] * len(labels)
    used: set[int] = set()
    for i in sorted(range(len(labels)), key=lambda i: -scores[i]):
        best, best_iou = None, threshold
        for j, name in enumerate(truth):
            if name != labels[i] or j in used:
                continue
            if iou[i, j] >= best_iou:
                best, best_iou = j, iou[i, j]
        if best is not None:
            used.add(best)
        out[i] = best
    return out


def average_precision(scored: Sequence[tuple[float, bool]], n_gt: int) -> float:
    """COCO-style AP (101-point interpolated precision) of detections (score, is_true_positive) against
    `n_gt` ground-truth objects; NaN without ground truth. Ties in score keep their order."""
    if n_gt == 0:
        return float("nan")
    if not len(scored):
        return 0.0
    arr = np.asarray(scored, dtype=float).reshape(-1, 2)
    tp_flags = arr[np.argsort(-arr[:, 0], kind="stable"), 1]
    tp, fp = np.cumsum(tp_flags), np.cumsum(1.0 - tp_flags)
    recall = tp / n_gt
    precision = np.maximum.accumulate((tp / np.maximum(tp + fp, 1e-12))[::-1])[::-1]  # the precision envelope
    k = np.searchsorted(recall, np.linspace(0, 1, 101), side="left")
    vals = np.where(k < len(precision), precision[np.minimum(k, len(precision) - 1)], 0.0)
    return float(sum(vals.tolist()) / 101)


__all__ = [
    "average_precision",
    "box_iou",
    "cells_on_mask",
    "mask_iou",
    "match_detections",
    "on_mask",
    "pointing_hit",
    "pointing_hits",
]

"""`locate`: a referring phrase -> the localization heads' combined map -> a box and a point in the
ORIGINAL image's pixels.

Each chosen head's map (its text rows' attention over the image tokens) is normalised to sum 1 and the
heads are averaged: the combined map holds shares of image attention. It is smoothed with a Gaussian
(sigma in grid cells), upsampled bilinearly to sub-cells, thresholded (the paper: above its mean), and the
largest connected region gives the box; the smoothed map's hottest cell gives the point. Boxes and points
go through the processor's exact geometry (`ImageLayout`), so crops and pads are undone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from grounding.heads import PAPER_PROMPT, Head, HeadSelection
from grounding.maps import connected_components, gaussian_smooth, upsample_bilinear
from grounding.readout import ROWS, QueryAttention, iter_attention, render_prompt
from vlm import VLM, ImageLayout
from vlm.inputs import ImageLike

THRESHOLDS = ("mean", "peak_fraction")
COMPONENTS = ("largest", "peak")


@dataclass(frozen=True)
class LocateParams:
    """The named choices of `locate`.

    Attributes:
        prompt: template for the query (see `readout.render_prompt`); None: the selection's own template
            (the paper's "{query}" for explicit heads).
        rows: "last" or "query" text rows; None: the selection's.
        sigma: Gaussian smoothing of the combined grid map, in grid cells (0: none).
        threshold: "mean": sub-cells above the map's mean (the paper's binarization); "peak_fraction":
            sub-cells at or above `peak_fraction` x the peak.
        peak_fraction: used by threshold="peak_fraction".
        component: which connected region becomes the box: "largest" (by area, the paper's) or "peak"
            (the region holding the hottest sub-cell).
        upsample: sub-cells per grid cell side for the mask (capped at the patch size, where a sub-cell is
            one processed pixel); boxes are exact to a sub-cell.
    """

    prompt: str | None = None
    rows: str | None = None
    sigma: float = 1.0
    threshold: str = "mean"
    peak_fraction: float = 0.5
    component: str = "largest"
    upsample: int = 8

    def __post_init__(self) -> None:
        if self.prompt is not None:
            render_prompt(self.prompt, "the object")
        if self.rows is not None and self.rows not in ROWS:
            raise ValueError(f"rows must be one of {ROWS} or None, got {self.rows!r}")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {self.sigma}")
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {THRESHOLDS}, got {self.threshold!r}")
        if not 0 < self.peak_fraction <= 1:
            raise ValueError(f"peak_fraction must be in (0, 1], got {self.peak_fraction}")
        if self.component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {self.component!r}")
        if self.upsample < 1:
            raise ValueError(f"upsample must be >= 1, got {self.upsample}")


@dataclass(frozen=True)
class Location:
    """Where a phrase is, in the ORIGINAL image's pixels ((x, y), origin top-left).

    Attributes:
        query: the phrase.
        box: (x0, y0, x1, y1) of the thresholded map's chosen region, clipped to the part of the image the
            vision tower saw.
        point: (x, y) centre of the smoothed map's hottest grid cell (moved onto the image if that cell is
            padding).
        score: share of the combined map's mass inside the chosen region (0..1: 1 = every bit of the heads'
            image attention falls inside it).
        heads: the (layer, head) pairs combined.
        values: [rows, cols] the combined, smoothed map: shares of image attention, summing to 1.
        layout: the image's token layout (grid and geometry).
    """

    query: str
    box: tuple[float, float, float, float]
    point: tuple[float, float]
    score: float
    heads: tuple[Head, ...]
    values: np.ndarray = field(repr=False, compare=False)
    layout: ImageLayout = field(repr=False, compare=False)

    @property
    def grid(self) -> tuple[int, int]:
        return self.layout.grid

    def to_json(self) -> dict:
        """{"query", "box": [x0, y0, x1, y1], "point": [x, y], "score", "heads": [[l, h], ...],
        "map": {"grid": [rows, cols], "values": [[...], ...]}} (pixels rounded to 0.01, shares to 1e-6)."""
        return {
            "query": self.query,
            "box": [round(float(v), 2) for v in self.box],
            "point": [round(float(v), 2) for v in self.point],
            "score": round(float(self.score), 6),
            "heads": [[int(a), int(b)] for a, b in self.heads],
            "map": {"grid": list(self.grid), "values": np.round(self.values, 6).tolist()},
        }


def combine_heads(qa: QueryAttention, heads: Sequence[Head], rows: str) -> np.ndarray:
    """[rows, cols]: the heads' maps, each normalised to sum 1 over the image tokens, averaged."""
    maps = qa.maps(rows)
    acc = np.zeros(qa.layout.n_tokens, dtype=np.float64)
    for layer, h in heads:
        m = maps[qa.layer_index(layer), h].astype(np.float64)
        total = m.sum()
        acc += m / total if total > 0 else np.full_like(m, 1.0 / m.size)
    return (acc / len(heads)).reshape(qa.layout.grid)


def box_and_point(
    values: np.ndarray, layout: ImageLayout, params: LocateParams = LocateParams()
) -> tuple[tuple[float, float, float, float], tuple[float, float], float, np.ndarray]:
    """From a [rows, cols] map of shares to a box and a point in ORIGINAL pixels.

    Returns:
        (box (x0, y0, x1, y1), point (x, y), score, smoothed [rows, cols] map summing to 1).
    """
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, None)
    if v.shape != tuple(layout.grid):
        raise ValueError(f"map shape {v.shape} does not match the layout grid {layout.grid}")
    total = v.sum()
    v = v / total if total > 0 else np.full(v.shape, 1.0 / v.size)
    smooth = gaussian_smooth(v, params.sigma)
    smooth /= smooth.sum()
    r, c = np.unravel_index(int(np.argmax(smooth)), smooth.shape)
    point = layout.cell_center(int(r), int(c))
    f = max(1, min(params.upsample, layout.patch_size))
    fine = upsample_bilinear(smooth, f)  # [rows * f, cols * f], sub-cell (i, j) = processed pixels / (p / f)
    if params.threshold == "mean":
        mask = fine > fine.mean()
    else:
        mask = fine >= params.peak_fraction * fine.max()
    labels, n = connected_components(mask, 8)
    if n == 0:  # a constant map: the whole grid
        region = np.ones_like(mask)
    elif params.component == "peak":
        region = labels == labels.ravel()[int(np.argmax(np.where(mask, fine, -np.inf)))]
    else:
        region = labels == int(np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    ys, xs = np.nonzero(region)
    sub = layout.patch_size / f  # processed pixels per sub-cell
    corners = np.array([[xs.min() * sub, ys.min() * sub], [(xs.max() + 1) * sub, (ys.max() + 1) * sub]])
    (x0, y0), (x1, y1) = layout.geometry.to_original(corners)
    vx0, vy0, vx1, vy1 = layout.geometry.visible_box()
    box = (max(float(x0), vx0), max(float(y0), vy0), min(float(x1), vx1), min(float(y1), vy1))
    point = (min(max(point[0], vx0), vx1), min(max(point[1], vy0), vy1))  # a padding cell's centre: onto the image
    score = float(fine[region].sum() / fine.sum())
    return box, point, score, smooth


def _resolve(
    vlm: VLM, selection_or_heads: HeadSelection | Sequence[Head], params: LocateParams
) -> tuple[tuple[Head, ...], str, str]:
    if isinstance(selection_or_heads, HeadSelection):
        heads = selection_or_heads.heads
        prompt = params.prompt or selection_or_heads.params.prompt
        rows = params.rows or selection_or_heads.params.rows
    else:
        heads = tuple((int(a), int(b)) for a, b in selection_or_heads)
        prompt = params.prompt or PAPER_PROMPT
        rows = params.rows or "last"
    if not heads:
        raise ValueError("locate needs at least one (layer, head)")
    for layer, h in heads:
        if not (0 <= layer < vlm.n_layers and 0 <= h < vlm.n_heads):
            raise ValueError(f"head ({layer}, {h}) is outside the model ({vlm.n_layers} layers x {vlm.n_heads} heads)")
    return heads, prompt, rows


def locate_batch(
    vlm: VLM,
    images: Sequence[ImageLike],
    queries: Sequence[str],
    selection_or_heads: HeadSelection | Sequence[Head],
    params: LocateParams = LocateParams(),
    batch_size: int = 16,
) -> list[Location]:
    """`locate` for many (image, query) pairs, `batch_size` pairs per prefill; only the chosen heads'
    layers are recorded."""
    heads, prompt, rows = _resolve(vlm, selection_or_heads, params)
    layers = sorted({layer for layer, _ in heads})
    out = []
    for query, qa in zip(queries, iter_attention(vlm, images, queries, prompt, layers, batch_size)):
        box, point, score, smooth = box_and_point(combine_heads(qa, heads, rows), qa.layout, params)
        out.append(Location(query, box, point, score, heads, smooth, qa.layout))
    return out


def locate(
    vlm: VLM,
    image: ImageLike,
    query: str,
    selection_or_heads: HeadSelection | Sequence[Head],
    params: LocateParams = LocateParams(),
) -> Location:
    """Find `query` ("the red circle") in `image` with the given localization heads.

    Args:
        selection_or_heads: a `HeadSelection` (its prompt template and text rows are used unless `params`
            names others) or explicit (layer, head) pairs.

    Returns:
        A `Location`: box and point in ORIGINAL image pixels, score, heads, and the combined map.

    Raises:
        ImageError: the image cannot be read. ValueError: empty query or a head outside the model.
    """
    return locate_batch(vlm, [image], [query], selection_or_heads, params, batch_size=1)[0]

"""From prompts, or from the VLM's own attention, to SAM masks (`lucid segment`).

Two paths, one result type (`SegmentedObject`):

* explicit prompts: points / boxes given by the user go to SAM as they are;
* a text query ("the red circle"): `grounding.locate` turns the localization heads' map into a box and a
  peak point, and SAM turns those into a mask. Which of them becomes the SAM prompt is
  `AttentionPrompt`: "point" (the peak alone, multimask, best-scored mask), "box" (the located box), or
  "point_box". The default is "point": measured on held-out testbed scenes (README, "Segment
  anything"), the located boxes of today's checkpoint are far too large while its peak point usually lies
  on the object, and a box prompt makes SAM segment the whole region it covers.

Coordinates are ORIGINAL image pixels throughout; masks are full-resolution bool arrays and serialise
as COCO RLE (pycocotools).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from grounding.sam import PromptError, SamMasks, SamPrompt, Segmenter, mask_box

ATTENTION_PROMPTS = ("point", "box", "point_box")


@dataclass(frozen=True)
class SegmentedObject:
    """One segmented object.

    Attributes:
        label: the query, or "prompt N" for explicit prompts.
        score: SAM's predicted IoU of the chosen mask.
        box: tight (x0, y0, x1, y1) box of the mask (x1, y1 exclusive).
        mask: [H, W] bool.
        points: the (x, y, label) points SAM was given.
        prompt_box: the box SAM was given, or None.
        source: "prompt" or "attention".
        location: the `grounding.Location` behind an attention prompt (its map, heads), or None.
        low_res: the chosen mask's low-res logits (to feed back as `mask_input`).
    """

    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray = field(repr=False, compare=False)
    points: tuple[tuple[float, float, int], ...] = ()
    prompt_box: tuple[float, float, float, float] | None = None
    source: str = "prompt"
    location: object | None = field(default=None, repr=False, compare=False)
    low_res: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "score": round(float(self.score), 6),
            "box": [round(float(v), 2) for v in self.box],
            "mask": encode_rle(self.mask),
            "points": [[round(float(x), 2), round(float(y), 2), int(lab)] for x, y, lab in self.points],
            "source": self.source,
        }


def encode_rle(mask: np.ndarray) -> dict:
    """COCO RLE of a [H, W] bool mask: {"size": [H, W], "counts": str}."""
    from pycocotools import mask as coco

    rle = coco.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_rle(rle: dict) -> np.ndarray:
    from pycocotools import mask as coco

    return coco.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def segmented_object(label: str, prompt: SamPrompt, res: SamMasks, source: str, location=None) -> SegmentedObject:
    i = res.best
    pts = tuple((float(x), float(y), int(lab)) for (x, y), lab in zip(prompt.points, prompt.labels))
    return SegmentedObject(
        label,
        float(res.scores[i]),
        mask_box(res.masks[i]),
        res.masks[i],
        pts,
        prompt.box,
        source,
        location,
        res.low_res[i],
    )


def segment_prompts(
    segmenter: Segmenter,
    image,
    points: Sequence[tuple[float, float, int]] = (),
    boxes: Sequence[tuple[float, float, float, float]] = (),
) -> list[SegmentedObject]:
    """SAM on explicit prompts: one object per box (the points, if any, join a single box's prompt), or
    one object from all the points when no box is given."""
    if len(boxes) > 1 and points:
        raise PromptError("give points with at most one box (each box is its own object)")
    pts = tuple((float(x), float(y)) for x, y, _ in points)
    labels = tuple(int(lab) for _, _, lab in points)
    prompts = [SamPrompt(pts, labels, tuple(float(v) for v in b)) for b in boxes] or [SamPrompt(pts, labels)]
    results = segmenter.segment(image, prompts)
    return [segmented_object(f"prompt {i}", p, r, "prompt") for i, (p, r) in enumerate(zip(prompts, results))]


def located_prompt(
    point: Sequence[float], box: Sequence[float], size: tuple[int, int], how: str = "point"
) -> SamPrompt:
    """The SAM prompt made from a located peak `point` and `box` in an image of `size` (w, h) (see the module
    doc for `how`); the point becomes the pixel under it."""
    if how not in ATTENTION_PROMPTS:
        raise PromptError(f"attention prompt must be one of {', '.join(ATTENTION_PROMPTS)}, got {how!r}")
    x, y = point
    w, h = size
    pixel = ((min(float(np.floor(x)), w - 1.0), min(float(np.floor(y)), h - 1.0)),)
    box = tuple(float(v) for v in box)
    if how == "point":
        return SamPrompt(pixel, (1,))
    if how == "box":
        return SamPrompt(box=box)
    return SamPrompt(pixel, (1,), box)


def attention_prompt(location, how: str = "point") -> SamPrompt:
    """The SAM prompt made from a `Location` (see `located_prompt`)."""
    return located_prompt(location.point, location.box, location.layout.geometry.original_size, how)


def segment_query(
    vlm,
    segmenter: Segmenter,
    image,
    queries: Sequence[str],
    selection,
    locate_params=None,
    how: str = "point",
) -> tuple[list[SegmentedObject], dict[str, float]]:
    """Text queries -> localization heads (`selection`: a `HeadSelection` or (layer, head) pairs) -> SAM.
    Returns the objects and timings (seconds)."""
    from grounding.location import LocateParams, locate_batch

    t0 = time.perf_counter()
    locations = locate_batch(vlm, [image] * len(queries), list(queries), selection, locate_params or LocateParams())
    t1 = time.perf_counter()
    prompts = [attention_prompt(loc, how) for loc in locations]
    results = segmenter.segment(image, prompts)
    t2 = time.perf_counter()
    objects = [
        segmented_object(q, p, r, "attention", loc) for q, p, r, loc in zip(queries, prompts, results, locations)
    ]
    timings = {"locate_s": t1 - t0, "sam_s": t2 - t1, **{f"sam_{k}_s": v for k, v in segmenter.timings.items()}}
    return objects, timings

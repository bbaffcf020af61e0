"""Scenes drawn by other code: matplotlib patches (its own anti-aliasing and geometry), other image
sizes, colours offset by up to +-20 per channel from the palette, no clutter.

Used to check that the embedded model recognises the shapes world, not Lucid's renderer: nothing here
shares drawing code with `testbed.world.scenes`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle, Rectangle, RegularPolygon  # noqa: E402
from PIL import Image  # noqa: E402

from testbed.world.scenes import CATEGORIES, PALETTE  # noqa: E402


@dataclass(frozen=True)
class ForeignObject:
    """One drawn patch: `bbox` (x0, y0, x1, y1) in pixels (x1, y1 exclusive) and `mask` [H, W] bool of its
    visible pixels (a later patch drawn over it hides its part)."""

    shape: str
    color: str
    bbox: tuple[int, int, int, int]
    mask: np.ndarray = field(repr=False, compare=False)


@dataclass(frozen=True)
class ForeignScene:
    image: Image.Image
    categories: frozenset[tuple[str, str]]
    colors_by_shape: dict[str, list[str]]
    objects: tuple[ForeignObject, ...] = ()


def _patch(shape: str, x: float, y: float, r: float, color):
    if shape == "circle":
        return Circle((x, y), r, color=color)
    if shape == "square":
        return Rectangle((x - r * 0.85, y - r * 0.85), 1.7 * r, 1.7 * r, color=color)
    # y axis points down: a RegularPolygon with orientation pi is apex-up on screen
    return RegularPolygon((x, y + r * 0.2), 3, radius=r * 1.15, orientation=np.pi, color=color)


def _figure(side: int, face) -> tuple[plt.Figure, plt.Axes]:
    fig = plt.figure(figsize=(1, 1), dpi=side)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.set_xlim(0, 1)
    ax.set_ylim(1, 0)
    ax.axis("off")
    fig.patch.set_facecolor(face)
    return fig, ax


def _render(fig: plt.Figure, side: int) -> Image.Image:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=side, facecolor=fig.get_facecolor())
    plt.close(fig)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _coverage(shape: str, x: float, y: float, r: float, side: int) -> np.ndarray:
    """[H, W] bool: pixels at least half covered by the patch (drawn alone, white on black)."""
    fig, ax = _figure(side, (0.0, 0.0, 0.0))
    ax.add_patch(_patch(shape, x, y, r, (1.0, 1.0, 1.0)))
    return np.asarray(_render(fig, side).convert("L")) >= 128


def draw_foreign_scene(seed: int, size: int | None = None, jitter: int = 20) -> ForeignScene:
    rng = np.random.default_rng(seed)
    side = int(size or rng.choice([64, 128, 160, 224, 320]))
    n = int(rng.integers(1, 4))
    cats = [CATEGORIES[i] for i in rng.choice(len(CATEGORIES), size=n, replace=False)]
    bg = float(rng.uniform(80, 180)) / 255
    fig, ax = _figure(side, (bg, bg, bg))
    placed: list[tuple[float, float, float]] = []
    for color, shape in cats:
        for _ in range(100):
            r = float(rng.uniform(0.1, 0.17))
            x, y = rng.uniform(r + 0.02, 1 - r - 0.02, 2)
            if all(np.hypot(x - px, y - py) > r + pr + 0.02 for px, py, pr in placed):
                break
        placed.append((x, y, r))
        rgb = np.clip(np.array(PALETTE[color]) + rng.integers(-jitter, jitter + 1, 3), 0, 255) / 255
        ax.add_patch(_patch(shape, x, y, r, rgb))
    image = _render(fig, side)
    cover = [_coverage(shape, x, y, r, side) for (_, shape), (x, y, r) in zip(cats, placed)]
    objects = []
    for i, ((color, shape), full) in enumerate(zip(cats, cover)):
        visible = full.copy()
        for later in cover[i + 1 :]:
            visible &= ~later
        if visible.any():
            ys, xs = np.nonzero(visible)
            bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            objects.append(ForeignObject(shape, color, bbox, visible))
    by_shape: dict[str, list[str]] = {}
    for color, shape in cats:
        by_shape.setdefault(shape, []).append(color)
    return ForeignScene(image=image, categories=frozenset(cats), colors_by_shape=by_shape, objects=tuple(objects))
